"""The KServe v2 protocol on a real worker, called by Triton's own client (`tritonclient`):
readiness, metadata, ModelInfer on a split feature with the same answers as
`splitexit.v1`, and clear errors for malformed v2 requests.

tritonclient's generated protocol module and the worker's define the same protobuf
package (`inference`), which one process cannot load twice: the worker runs in a process
of its own, and so does the tritonclient script (this test process may have loaded the
worker's modules through other tests)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch

import splitexit_tests_edge_support as S  # registered by conftest.py
from splitexit.policies import MaxProb
from splitexit.proto import inference_pb2 as pb
from splitexit.proto import inference_pb2_grpc as pb_grpc

pytestmark = pytest.mark.slow

_CLIENT = textwrap.dedent('''
    import json, sys
    import numpy as np
    import tritonclient.grpc as tc
    from tritonclient.utils import InferenceServerException

    address, model, feature_path = sys.argv[1:4]
    feature = np.load(feature_path)
    client = tc.InferenceServerClient(url=address)
    out = {"live": client.is_server_live(), "ready": client.is_server_ready(),
           "model_ready": client.is_model_ready(model), "other_ready": client.is_model_ready("nope")}
    meta = client.get_model_metadata(model, as_json=True)
    out["meta"] = {"name": meta["name"], "versions": meta["versions"], "platform": meta["platform"],
                   "inputs": meta["inputs"], "outputs": [o["name"] for o in meta["outputs"]]}

    def infer(name="feature", data=feature, datatype="FP32", outputs=("label", "exit", "confidence", "probs")):
        x = tc.InferInput(name, list(data.shape), datatype)
        x.set_data_from_numpy(data)
        result = client.infer(model, [x], outputs=[tc.InferRequestedOutput(o) for o in outputs], request_id="r1")
        return {o: result.as_numpy(o).tolist() for o in outputs}

    out["answer"] = infer()
    out["answer_fp16"] = infer(data=feature.astype(np.float16), datatype="FP16", outputs=("label",))
    errors = {}
    for case, call in {
        "wrong_input": lambda: infer(name="image"),
        "wrong_shape": lambda: infer(data=np.ascontiguousarray(feature[:, :1])),
        "wrong_dtype": lambda: infer(data=feature.astype(np.int32), datatype="INT32"),
        "nan": lambda: infer(data=np.full_like(feature, np.nan)),
        "unknown_output": lambda: infer(outputs=("logits",)),
        "unknown_model": lambda: client.get_model_metadata("nope"),
    }.items():
        try:
            call()
            errors[case] = None
        except InferenceServerException as exc:
            errors[case] = [exc.status(), exc.message()]
    out["errors"] = errors
    print(json.dumps(out))
''')


def _v1_answers(address: str, bundle: Path, feature: np.ndarray) -> list[tuple[int, int]]:
    """(label, exit stage) per row through splitexit.v1, no policy state (a fresh policy)."""
    from splitexit.bundle import read_manifest

    manifest = read_manifest(bundle)
    request = pb.InferRequest(request_id="v1", bundle_hash=manifest.hash, model=manifest.name, split=manifest.split,
                              sample_ids=[str(i) for i in range(len(feature))],
                              feature=pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=feature.shape,
                                                data=feature.astype("<f4").tobytes()))
    with grpc.insecure_channel(address) as channel:
        response = pb_grpc.SplitInferenceStub(channel).Infer(request, timeout=30)
    return [(r.label, r.exit_index) for r in response.rows]


def test_tritonclient_calls_the_worker_over_kserve_v2(tmp_path: Path) -> None:
    model, meta = S.tiny_model()
    pixels, x = S.batch(meta, 12)
    policy = MaxProb(S.exit_thresholds(model, x))
    split = 2
    bundle = S.export(tmp_path, model, meta, policy, split=split)
    with torch.inference_mode():
        feature = x
        for stage in list(model.stages)[: split + 1]:
            feature = stage(feature)
    feature_np = feature.numpy().astype(np.float32)
    np.save(tmp_path / "feature.npy", feature_np)
    with S.cloud_worker(bundle) as address:
        client = subprocess.run([sys.executable, "-c", _CLIENT, address, "tiny", str(tmp_path / "feature.npy")],
                                capture_output=True, text=True, timeout=120)
        assert client.returncode == 0, client.stderr[-3000:]
        got = json.loads(client.stdout)
        v1 = _v1_answers(address, bundle, feature_np)
    assert got["live"] and got["ready"] and got["model_ready"] and not got["other_ready"]
    from splitexit.bundle import read_manifest

    manifest = read_manifest(bundle)
    assert got["meta"]["name"] == "tiny" and got["meta"]["versions"] == [manifest.hash]
    assert got["meta"]["inputs"] == [{"name": "feature", "datatype": "FP32",
                                      "shape": [str(d) for d in (-1, *manifest.feature_shape)]}]
    assert got["meta"]["outputs"] == ["probs", "label", "confidence", "exit"]
    answer = got["answer"]
    assert list(zip(answer["label"], answer["exit"])) == v1  # the same answers as splitexit.v1
    probs = np.asarray(answer["probs"])
    assert probs.shape == (12, len(S.CLASSES)) and np.allclose(probs.sum(1), 1, atol=1e-4)
    assert answer["label"] == probs.argmax(1).tolist()
    assert np.allclose(answer["confidence"], probs.max(1), atol=1e-6)
    assert got["answer_fp16"]["label"] == answer["label"]
    errors = got["errors"]
    for case in ("wrong_input", "wrong_shape", "wrong_dtype", "nan", "unknown_output"):
        assert errors[case] is not None and errors[case][0] == "StatusCode.INVALID_ARGUMENT", (case, errors[case])
    assert "one input named 'feature'" in errors["wrong_input"][1]
    assert "INT32" in errors["wrong_dtype"][1] and "logits" in errors["unknown_output"][1]
    assert errors["unknown_model"][0] == "StatusCode.NOT_FOUND" and "served: tiny@" in errors["unknown_model"][1]
