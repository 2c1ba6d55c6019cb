"""The runtime benchmarks' --quick forms (`wire`, `serve`) run end to end through a real
cloud worker on loopback and write the keys BENCH.md asks for."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from splitexit.cli import main

pytestmark = [pytest.mark.loopback, pytest.mark.slow]

CODECS = ("fp32", "fp16", "int8", "int8-per-channel")




def test_wire_quick_reports_every_codec_through_the_real_path(bench_dirs: tuple[Path, Path], quick_bench) -> None:
    result = quick_bench("wire")
    assert result["input_png_bytes"] > 0 and result["input_jpeg_bytes"] > 0
    fp32 = result["codecs"]["fp32"]
    assert result["fp32_feature_bytes"] == 4 * math.prod(result["feature_shape"])
    for codec in CODECS:
        c = result["codecs"][codec]
        for key in ("bytes_per_sample", "bytes_per_input_sample", "acc", "agreement", "offload_rate", "degraded"):
            assert key in c, (codec, key)
        assert 0 <= c["acc"] <= 1 and 0 < c["offload_rate"] <= 1
        assert c["degraded"] == 0, c["degraded_reasons"]
        # the same rows leave the edge whatever the codec: the policy decides before encoding
        assert c["offloaded"] == fp32["offloaded"]
        assert c["bytes_per_input_sample"] == pytest.approx(c["bytes_per_sample"] * c["offload_rate"], rel=0.01)
    # fp32 is lossless: the split run answers as the whole network in one process
    assert fp32["agreement"] >= 0.999 and result["fp32_agreement_ok"]
    assert fp32["bytes_per_sample"] >= result["fp32_feature_bytes"]  # the feature itself, plus its header
    sizes = [result["codecs"][c]["bytes_per_sample"] for c in ("fp32", "fp16", "int8")]
    assert sizes == sorted(sizes, reverse=True)
    assert result["int8_bytes_ratio"] == pytest.approx(
        fp32["bytes_per_sample"] / result["codecs"]["int8"]["bytes_per_sample"], rel=1e-3)
    assert result["int8_bytes_ratio"] > 3
    assert result["int8_acc_delta_points"] == pytest.approx(
        100 * (result["codecs"]["int8"]["acc"] - fp32["acc"]), abs=1e-3)
    assert (bench_dirs[1] / "wire.png").stat().st_size > 0


@pytest.mark.parametrize("calls", [(), ("--stream", "--codec", "fp16", "--concurrent-batches", "2")],
                         ids=["unary", "stream-fp16-two-batches"])
def test_serve_quick_reports_throughput_ratio_latency_and_batches(bench_dirs: tuple[Path, Path], quick_bench,
                                                                  calls: tuple[str, ...]) -> None:
    result = quick_bench("serve", "--clients", "2", "--inflight", "4", "--server-threads", "1", *calls)
    assert result["settings"]["stream"] == bool(calls)
    assert result["settings"]["concurrent_batches"] == (2 if calls else 1)
    # with batches side by side, the bare tail is also timed side by side
    assert ("ratio_to_parallel_tail" in result) == bool(calls)
    if calls:
        assert result["raw_tail_parallel_sps"] > 0
        assert result["ratio_to_parallel_tail"] == pytest.approx(
            result["served_sps"] / result["raw_tail_parallel_sps"], rel=1e-2, abs=1e-4)
    assert result["codec"] == ("fp16" if calls else "fp32")  # asked for, or the bundle's (fp32)
    for key in ("raw_tail_sps", "served_sps", "ratio", "p50_ms", "p99_ms"):
        assert result[key] > 0, key
    # the ratio is rounded to 4 decimals: tiny on a machine busy with other work
    assert result["ratio"] == pytest.approx(result["served_sps"] / result["raw_tail_sps"], rel=1e-2, abs=1e-4)
    assert result["p99_ms"] >= result["p50_ms"]
    assert not result["errors"]
    assert result["answered_from_cache"] == 0  # each send has a request id of its own: all computed
    settings = result["settings"]
    assert settings["clients"] == 2 and settings["server_threads_effective"] == 1 and settings["batch"] == 32
    hist = result["batch_hist"]
    assert hist and all(0 < int(size) <= settings["batch"] for size in hist)
    assert sum(result["batch_rows_share"].values()) == pytest.approx(1.0, abs=1e-3)
    for key in ("tail_ms", "run_batch_ms", "parse_ms", "respond_ms", "cpu_ms"):
        assert key in result["profile"], key
    assert (bench_dirs[1] / "serve.png").stat().st_size > 0


def test_serve_refuses_bad_settings(bench_dirs: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    cache, out = bench_dirs
    assert main(["bench", "serve", "--quick", "--cache-dir", str(cache), "--out", str(out), "--rows", "64"]) == 2
    assert "exceeds --batch" in capsys.readouterr().err


def test_faults_quick_loses_nothing_and_recovers_within_two_seconds(quick_bench) -> None:
    result = quick_bench("faults", "--outages", "1", "--partition", "1", "--interval-ms", "100",
                         "--overload", "2", "--overload-seconds", "1")
    scenarios = result["scenarios"]
    assert set(scenarios) == {"outage_1s", "partition_1s", "edge_run_sigterm", "edge_run_kill9", "spool_bitflip"}
    assert result["lost"] == 0 and result["sent"] == result["answered"] > 0
    for name in ("outage_1s", "partition_1s", "edge_run_sigterm", "edge_run_kill9"):
        assert scenarios[name]["lost"] == 0, name
    for name in ("outage_1s", "partition_1s"):
        assert scenarios[name]["recovered_s"] is not None and scenarios[name]["recovered_s"] <= 2.0, name
    assert scenarios["outage_1s"]["degraded"] > 0  # the outage was felt, and answered locally
    for name in ("edge_run_sigterm", "edge_run_kill9"):  # the rerun resumed: each input once, the rest kept
        run = scenarios[name]
        assert run["duplicates"] == 0 and run["kept"] > 0 and run["recomputed"] == run["sent"] - run["kept"], run
    spool = scenarios["spool_bitflip"]  # one flipped bit costs its record only, and refine says so
    assert spool["reported"] and spool["damaged_records"] == 1 and 0 < spool["lost"] <= 8, spool
    # overload: every request sent ends under some status, the worker answers some and counts what it saw
    overload = result["overload"]
    assert overload["capacity_rows_s"] > 0 and overload["memory_before"]["rss_mb"] > 0
    twice = overload["2x"]
    assert sum(twice["codes"].values()) == twice["sent"] > 0 and twice["codes"].get("OK", 0) > 0, twice
    assert twice["worker_codes"].get("OK", 0) >= twice["codes"]["OK"] and twice["goodput"] > 0, twice
    assert twice["memory_after"]["peak_rss_mb"] >= twice["memory_after"]["rss_mb"] > 0


def test_e2e_quick_runs_every_strategy_per_link_and_device(quick_bench) -> None:
    result = quick_bench("e2e", "--links", "fios,3g", "--devices", "rpi4", "--inputs", "8")
    assert set(result["profiles"]) == {"fios/rpi4", "3g/rpi4"} and "ncnn" in result["devices"]["rpi4"]
    for key, rows in result["profiles"].items():
        assert {"edge_only", "edge_exits", "cloud_only", "fixed_split", "adaptive"} <= set(rows), key
        for name in ("edge_only", "edge_exits", "cloud_only", "fixed_split", "adaptive"):
            assert rows[name]["answered"] == rows[name]["inputs"] == 8 and rows[name]["mean_ms"] > 0, (key, name)
        assert rows["cloud_only"]["bytes_up"] > 100 and rows["edge_only"]["bytes_up"] == 0
    # the planner's choice (adaptive) keeps a 3G link's 300 ms round trip out of the answer
    assert result["profiles"]["3g/rpi4"]["adaptive"]["mean_ms"] < result["profiles"]["3g/rpi4"]["cloud_only"]["mean_ms"]
    # adaptive is the agent re-planning online (unless the plan sends the input itself)
    for key, rows in result["profiles"].items():
        assert rows["adaptive"]["plan"].endswith("re-planned online") or "cloud_only" in rows["adaptive"]["plan"], key
