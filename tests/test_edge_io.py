"""Edge inputs and outputs: image files, folders, archives and arrays in; JSON lines and
msgpack traces out; the spool's crash-safe log."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import msgpack
import numpy as np
import pytest
from PIL import Image

from splitexit.edge import Answer, InputError, ResultsError, ResultWriter, Spool, TraceWriter, load_inputs, read_results, read_trace
from splitexit.proto import inference_pb2 as pb

SHAPE = (1, 8, 8)


def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels, "L").save(buf, format="PNG")
    return buf.getvalue()


def _images(n: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, size=(n, 8, 8), dtype=np.uint8)


def test_image_files_folders_and_archives(tmp_path: Path) -> None:
    pixels = _images(3)
    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    names = ["a.png", "b.png", "sub/c.png"]
    for name, p in zip(names, pixels):
        (folder / name).write_bytes(_png(p))
    (folder / "notes.txt").write_text("not an image")
    got = load_inputs(folder, SHAPE)
    assert got.ids == tuple(names) and got.data.shape == (3, 8, 8, 1) and got.data.dtype == np.uint8
    assert np.array_equal(got.data[..., 0], pixels)
    one = load_inputs(folder / "b.png", SHAPE)
    assert one.ids == ("b.png",) and np.array_equal(one.data[0, ..., 0], pixels[1])
    archive = tmp_path / "imgs.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for name in names:
            tar.add(folder / name, arcname=f"set/{name}")
    got = load_inputs(archive, SHAPE)
    assert got.ids == tuple(f"set/{n}" for n in names) and np.array_equal(got.data[..., 0], pixels)
    # RGB images are converted to the bundle's one channel
    rgb = np.stack([pixels[0]] * 3, -1)
    buf = io.BytesIO()
    Image.fromarray(rgb, "RGB").save(buf, format="PNG")
    (tmp_path / "rgb.png").write_bytes(buf.getvalue())
    assert np.array_equal(load_inputs(tmp_path / "rgb.png", SHAPE).data[0, ..., 0], pixels[0])
    # another size: refused unless resized
    (tmp_path / "big.png").write_bytes(_png(np.zeros((16, 16), dtype=np.uint8)))
    with pytest.raises(InputError, match="16x16, the bundle takes 8x8"):
        load_inputs(tmp_path / "big.png", SHAPE)
    assert load_inputs(tmp_path / "big.png", SHAPE, resize=True).data.shape == (1, 8, 8, 1)
    batches = list(load_inputs(folder, SHAPE).batches(2))
    assert [ids for ids, _ in batches] == [("a.png", "b.png"), ("sub/c.png",)]


def test_numpy_inputs(tmp_path: Path) -> None:
    pixels = _images(4)
    np.save(tmp_path / "u8.npy", pixels)  # [N, H, W] with one channel
    got = load_inputs(tmp_path / "u8.npy", SHAPE)
    assert got.ids == tuple(f"u8.npy:{i}" for i in range(4)) and got.data.shape == (4, 8, 8, 1)
    floats = np.random.default_rng(1).normal(size=(4, 1, 8, 8)).astype(np.float64)
    np.save(tmp_path / "f.npy", floats)
    assert load_inputs(tmp_path / "f.npy", SHAPE).data.dtype == np.float32
    np.savez(tmp_path / "x.npz", x=pixels[..., None], ids=np.array(["w", "x", "y", "z"]))
    assert load_inputs(tmp_path / "x.npz", SHAPE).ids == ("w", "x", "y", "z")
    np.save(tmp_path / "bad.npy", np.zeros((4, 3, 8, 8), dtype=np.float32))
    with pytest.raises(InputError, match=r"float inputs must be normalized \[N, 1, 8, 8\]"):
        load_inputs(tmp_path / "bad.npy", SHAPE)
    np.save(tmp_path / "nan.npy", np.full((1, 1, 8, 8), np.nan, dtype=np.float32))
    with pytest.raises(InputError, match="NaN"):
        load_inputs(tmp_path / "nan.npy", SHAPE)
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(InputError, match="not a readable numpy file"):
        load_inputs(tmp_path / "obj.npy", SHAPE)
    np.savez(tmp_path / "two.npz", a=pixels, b=pixels)
    with pytest.raises(InputError, match="no array 'x'"):
        load_inputs(tmp_path / "two.npz", SHAPE)


def test_unreadable_inputs_name_the_file(tmp_path: Path) -> None:
    folder = tmp_path / "imgs"
    folder.mkdir()
    (folder / "good.png").write_bytes(_png(_images(1)[0]))
    (folder / "broken.png").write_bytes(b"\x89PNG not really")
    (folder / "large.png").write_bytes(_png(np.zeros((16, 16), dtype=np.uint8)))
    # the others are still read; each one set aside comes with its reason
    got = load_inputs(folder, SHAPE)
    assert got.ids == ("good.png",) and got.data.shape == (1, 8, 8, 1)
    reasons = dict(got.errors)
    assert set(reasons) == {"broken.png", "large.png"}
    assert "broken.png: not a readable image" in reasons["broken.png"] and "16x16" in reasons["large.png"]
    assert got.without({"good.png"}).ids == () and got.without(set()).ids == ("good.png",)
    # nothing readable at all: the first file's error
    with pytest.raises(InputError, match="broken.png: not a readable image"):
        load_inputs(folder / "broken.png", SHAPE)
    (folder / "good.png").unlink()
    with pytest.raises(InputError, match="broken.png: not a readable image"):
        load_inputs(folder, SHAPE)
    (tmp_path / "junk.tar.gz").write_bytes(b"\x1f\x8b garbage")
    with pytest.raises(InputError, match="corrupt or unreadable archive"):
        load_inputs(tmp_path / "junk.tar.gz", SHAPE)
    with pytest.raises(InputError, match="no such file"):
        load_inputs(tmp_path / "missing", SHAPE)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no images"):
        load_inputs(tmp_path / "empty", SHAPE)
    (tmp_path / "data.csv").write_text("1,2")
    with pytest.raises(InputError, match="not an image, folder"):
        load_inputs(tmp_path / "data.csv", SHAPE)


def _answer(i: int, **kw) -> Answer:
    base = dict(sample_id=f"s{i}", label=i % 10, class_name=f"c{i % 10}", confidence=0.5, exit=2, network="tiny",
                route="edge", latency_ms=1.25)
    base.update(kw)
    return Answer(**base)


def test_results_are_json_lines_written_all_or_nothing(tmp_path: Path) -> None:
    out = tmp_path / "results.jsonl"
    with ResultWriter(out) as writer:
        writer.write(_answer(0))
        writer.write(_answer(1, route="degraded", reason="unavailable", spooled=True, exit=-1, label=-1,
                             class_name=None))
    rows = list(read_results(out))
    assert rows[0] == {"sample_id": "s0", "label": 0, "class_name": "c0", "confidence": 0.5, "exit": 2,
                       "network": "tiny", "route": "edge", "reason": None, "latency_ms": 1.25}
    assert rows[1]["route"] == "degraded" and rows[1]["reason"] == "unavailable" and rows[1]["spooled"] is True
    empty = tmp_path / "empty.jsonl"
    with pytest.raises(RuntimeError):
        with ResultWriter(empty) as writer:
            raise RuntimeError("crash before any answer")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.jsonl"]  # nothing left behind


def test_an_interrupted_run_keeps_its_answers_and_a_rerun_resumes(tmp_path: Path) -> None:
    out = tmp_path / "results.jsonl"
    with pytest.raises(RuntimeError):
        with ResultWriter(out, run="bundle-a") as writer:
            for i in range(3):
                writer.write(_answer(i))
            writer.checkpoint()
            raise RuntimeError("crash mid-run")
    partial = tmp_path / "results.jsonl.partial"
    assert not out.exists() and [r["sample_id"] for r in read_results(partial)] == ["s0", "s1", "s2"]
    with partial.open("a") as f:  # killed in the middle of a line
        f.write('{"sample_id":"s3","lab')
    with pytest.raises(ResultsError, match="left by another run"):
        ResultWriter(out, run="bundle-b")
    with ResultWriter(out, run="bundle-a") as writer:
        assert writer.done == {"s0", "s1", "s2"}  # the torn line is answered again
        for i in (3, 4):
            writer.write(_answer(i))
    assert [r["sample_id"] for r in read_results(out)] == ["s0", "s1", "s2", "s3", "s4"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.jsonl"]
    with ResultWriter(out, run="bundle-a", resume=False) as writer:  # starting over
        assert writer.done == set()


def test_a_results_path_that_is_a_directory_is_refused_before_any_answer(tmp_path: Path) -> None:
    with pytest.raises(ResultsError, match="is a directory"):
        ResultWriter(tmp_path)
    with pytest.raises(ResultsError, match="no such directory"):
        ResultWriter(tmp_path / "missing" / "r.jsonl")


def test_trace_stream_and_reader(tmp_path: Path) -> None:
    path = tmp_path / "trace.msgpack"
    with TraceWriter(path) as trace:
        for i in range(3):
            trace.write({"v": 1, "request_id": f"r{i}", "rows": i, "timings_ms": {"head": 0.5}})
    with TraceWriter(path) as trace:  # appends
        trace.write({"v": 1, "request_id": "r3", "rows": 3})
    assert [r["request_id"] for r in read_trace(path)] == ["r0", "r1", "r2", "r3"]
    with open(path, "ab") as f:  # a record torn by a crash
        f.write(msgpack.packb({"v": 1, "request_id": "torn", "rows": 9})[:-3])
    assert [r["request_id"] for r in read_trace(path)] == ["r0", "r1", "r2", "r3"]
    (tmp_path / "junk").write_bytes(b"\xc1\xc1\xc1")
    with pytest.raises(ValueError, match="corrupt trace"):
        list(read_trace(tmp_path / "junk"))
    atomic = TraceWriter(tmp_path / "atomic.msgpack", atomic=True)
    atomic.write({"v": 1})
    atomic.abort()
    assert not (tmp_path / "atomic.msgpack").exists() and not list(tmp_path.glob(".atomic*"))


def test_spool_survives_a_torn_append_and_compacts(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    requests = [pb.InferRequest(request_id=f"r{i}", bundle_hash="h", sample_ids=[f"s{i}"]) for i in range(3)]
    for r in requests[:2]:
        spool.put(r, reason="unavailable")
    log = tmp_path / "spool" / "spool.log"
    whole = log.stat().st_size
    with open(log, "ab") as f:  # a crash in the middle of an append
        f.write(b"\x40\x00\x00\x00\x12\x34")
    assert [e.request_id for e in Spool(tmp_path / "spool").entries()] == ["r0", "r1"]
    spool.put(requests[2], reason="deadline_exceeded")  # the torn tail is cut off first
    entries = spool.entries()
    assert [e.request_id for e in entries] == ["r0", "r1", "r2"] and log.stat().st_size > whole
    assert entries[2].message() == requests[2] and entries[2].reason == "deadline_exceeded"
    data = bytearray(log.read_bytes())  # a flipped bit inside the last record: caught by its CRC
    data[-2] ^= 0xFF
    log.write_bytes(bytes(data))
    assert [e.request_id for e in spool.entries()] == ["r0", "r1"]
    spool.done(["r0"])
    assert [e.request_id for e in spool.entries()] == ["r1"]
    assert spool.compact() == 1 and len(Spool(tmp_path / "spool")) == 1
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="spool directory"):
        Spool(tmp_path / "file")
    assert json.dumps(_answer(3, update=True).to_dict())  # plain JSON


@pytest.mark.parametrize("where", ["payload", "length"])
def test_a_damaged_record_in_the_middle_of_the_spool_costs_that_record_only(tmp_path: Path, where: str) -> None:
    spool = Spool(tmp_path / "spool")
    feature = np.random.default_rng(0).bytes(4000)  # feature-like bytes, some of them look like headers
    for i in range(5):
        spool.put(pb.InferRequest(request_id=f"r{i}", bundle_hash="h", sample_ids=[f"s{i}"],
                                  raw_input=pb.RawInput(format="u8", items=[feature])), reason="unavailable")
    log = tmp_path / "spool" / "spool.log"
    data = bytearray(log.read_bytes())
    starts = [0]
    while len(starts) < 5:
        starts.append(starts[-1] + 8 + int.from_bytes(data[starts[-1]:starts[-1] + 4], "little"))
    flip = starts[2] + (1 if where == "length" else 500)  # record r2's length field, or its payload
    data[flip] ^= 0x10
    log.write_bytes(bytes(data))
    assert [e.request_id for e in spool.entries()] == ["r0", "r1", "r3", "r4"]
    assert spool.damage.records == 1 and spool.damage.bytes == starts[3] - starts[2]
    size = log.stat().st_size
    spool.put(pb.InferRequest(request_id="r5", bundle_hash="h", sample_ids=["s5"]), reason="unavailable")
    assert log.stat().st_size > size  # appended after the last whole record, nothing cut
    assert [e.request_id for e in spool.entries()] == ["r0", "r1", "r3", "r4", "r5"]
    assert spool.compact() == 5 and spool.damage.records == 1  # counted as read, then dropped
    fresh = Spool(tmp_path / "spool")
    assert [e.request_id for e in fresh.entries()] == ["r0", "r1", "r3", "r4", "r5"] and fresh.damage.records == 0


def test_public_api_lists_existing_names() -> None:
    import splitexit.edge as edge

    assert sorted(edge.__all__) == sorted(set(edge.__all__))
    for name in edge.__all__:
        assert hasattr(edge, name), name
