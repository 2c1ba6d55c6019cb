"""The wire protocol: committed gencode is fresh, descriptors are what clients expect,
and the pins in pyproject.toml satisfy the gencode's own version checks."""

from __future__ import annotations

import re
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from splitexit.proto import PROTOCOL_VERSION
from splitexit.proto import generate as gen
from splitexit.proto import inference_pb2 as pb

ROOT = Path(__file__).resolve().parents[1]
PROTO_DIR = ROOT / "protos" / "splitexit" / "proto"


def _requirements() -> dict[str, Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    reqs = [Requirement(r) for r in project["dependencies"] + extras["full"] + extras["test"]]
    return {r.name: r for r in reqs}


def _pinned_tools_version() -> str:
    spec = [s for s in _requirements()["grpcio-tools"].specifier if s.operator == "=="]
    assert len(spec) == 1, "grpcio-tools must be pinned exactly (==) so regeneration is reproducible"
    return spec[0].version


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    installed = metadata.version("grpcio-tools")
    pinned = _pinned_tools_version()
    assert installed == pinned, (
        f"grpcio-tools {installed} is installed but pyproject pins {pinned}: "
        "reinstall the test extra (pip install -e '.[test]') before comparing gencode"
    )
    written = gen.generate(tmp_path)
    names = sorted(p.name for p in written)
    assert names == ["inference_pb2.py", "inference_pb2.pyi", "inference_pb2_grpc.py",
                     "kserve_v2_pb2.py", "kserve_v2_pb2.pyi", "kserve_v2_pb2_grpc.py"]
    stale = [n for n in names if (tmp_path / n).read_bytes() != (PROTO_DIR / n).read_bytes()]
    assert not stale, f"committed gencode is stale: {stale}; run `make protos` and commit the result"


def test_generate_cli_writes_where_told(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert gen.main(["--out", str(tmp_path)]) == 0
    assert (tmp_path / "inference_pb2_grpc.py").is_file()
    assert str(tmp_path / "inference_pb2.py") in capsys.readouterr().out


def test_generated_grpc_module_imports_package_absolute() -> None:
    text = (PROTO_DIR / "inference_pb2_grpc.py").read_text()
    assert "from splitexit.proto import inference_pb2 as" in text
    assert not re.search(r"^import inference_pb2", text, flags=re.M)


def test_check_imports_rejects_bare_import(tmp_path: Path) -> None:
    bad = tmp_path / "x_pb2_grpc.py"
    bad.write_text("import grpc\nimport inference_pb2 as inference__pb2\n")
    with pytest.raises(gen.GenerateError, match="not from splitexit.proto"):
        gen._check_imports(bad)


def test_descriptors() -> None:
    fd = pb.DESCRIPTOR
    assert fd.package == "splitexit.v1"
    assert fd.name == "splitexit/proto/inference.proto"  # the path mirrors the import path
    service = fd.services_by_name["SplitInference"]
    assert service.full_name == "splitexit.v1.SplitInference"
    methods = {m.name: m for m in service.methods}
    assert set(methods) == {"Infer", "InferStream", "GetModelInfo"}
    streaming = {name: (m.client_streaming, m.server_streaming) for name, m in methods.items()}
    assert streaming == {"Infer": (False, False), "InferStream": (True, True), "GetModelInfo": (False, False)}
    for name in ("Infer", "InferStream"):
        assert methods[name].input_type.full_name == "splitexit.v1.InferRequest"
        assert methods[name].output_type.full_name == "splitexit.v1.InferResponse"
    assert methods["GetModelInfo"].input_type.full_name == "splitexit.v1.ModelInfoRequest"
    assert methods["GetModelInfo"].output_type.full_name == "splitexit.v1.ModelInfo"


def test_enums_reject_an_unset_value() -> None:
    # proto3 defaults every enum to 0: 0 must mean "unset" (dtype) or "nothing" (scheme).
    assert pb.DType.Name(0) == "DTYPE_UNSPECIFIED"
    assert set(pb.DType.keys()) == {"DTYPE_UNSPECIFIED", "DTYPE_FLOAT32", "DTYPE_FLOAT16", "DTYPE_INT8", "DTYPE_UINT8"}
    assert pb.QuantScheme.Name(0) == "QUANT_SCHEME_NONE"
    assert set(pb.QuantScheme.keys()) == {"QUANT_SCHEME_NONE", "QUANT_SCHEME_PER_TENSOR", "QUANT_SCHEME_PER_CHANNEL"}


def test_fields_an_edge_agent_relies_on() -> None:
    def fields(message: str) -> set[str]:
        return set(pb.DESCRIPTOR.message_types_by_name[message].fields_by_name)

    assert {"dtype", "shape", "data", "quant"} <= fields("Tensor")
    assert {"scheme", "axis", "scale", "zero_point"} <= fields("Quantization")
    assert {
        "request_id", "bundle_hash", "model", "split", "sample_ids", "feature",
        "edge_exits", "want_probabilities", "top_k", "raw_input",
    } <= fields("InferRequest")  # fmt: skip
    assert {"exits_evaluated", "best_exit", "best_confidence", "best_label"} <= fields("EdgeExitInfo")
    assert {"format", "items"} <= fields("RawInput")
    assert {"request_id", "rows", "timing", "error"} <= fields("InferResponse")
    assert {"sample_id", "label", "top_k", "exit_index", "network", "degraded", "confidence"} <= fields("RowResult")
    assert {"queue_ms", "compute_ms", "batch_size"} <= fields("ServerTiming")
    assert {"protocol_version", "models", "limits"} <= fields("ModelInfo")
    assert {
        "name", "bundle_hash", "arch", "splits", "input_shape", "classes", "codecs", "raw_formats",
    } <= fields("ModelSpec")  # fmt: skip
    assert {"max_message_bytes", "max_batch_rows"} <= fields("Limits")


def test_request_round_trips_through_bytes() -> None:
    req = pb.InferRequest(
        request_id="r-1",
        bundle_hash="sha256:abc",
        model="resnet20",
        split=1,
        sample_ids=["a", "b"],
        feature=pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[2, 1], data=bytes(8)),
        edge_exits=[pb.EdgeExitInfo(exits_evaluated=1, best_exit=0, best_confidence=0.5, best_label=3)] * 2,
        want_probabilities=True,
        top_k=3,
    )
    back = pb.InferRequest.FromString(req.SerializeToString())
    assert back == req
    assert back.HasField("feature") and not back.HasField("raw_input")


def test_grpc_module_exposes_stub_and_servicer() -> None:
    from splitexit.proto import inference_pb2_grpc as pb_grpc

    assert hasattr(pb_grpc, "SplitInferenceStub")
    assert hasattr(pb_grpc, "SplitInferenceServicer")
    assert hasattr(pb_grpc, "add_SplitInferenceServicer_to_server")


def test_pins_satisfy_gencode_version_checks() -> None:
    reqs = _requirements()
    # inference_pb2.py: the protobuf runtime may not be older than the gencode, and
    # protobuf supports gencode within one major version only.
    text = (PROTO_DIR / "inference_pb2.py").read_text()
    match = re.search(r"ValidateProtobufRuntimeVersion\(\s*\S+,\s*(\d+),\s*(\d+),\s*(\d+),", text)
    assert match, "gencode without a runtime version check: regenerate with the pinned grpcio-tools"
    gencode = Version(".".join(match.groups()))
    protobuf = reqs["protobuf"].specifier
    floor = [Version(s.version) for s in protobuf if s.operator == ">="]
    assert floor and floor[0] >= gencode, f"protobuf floor must be >= the gencode's {gencode}"
    assert gencode in protobuf
    assert not protobuf.contains(Version(f"{gencode.major + 1}.0.0")), "protobuf needs an upper bound <next major"
    assert Version(metadata.version("protobuf")) in protobuf
    # inference_pb2_grpc.py raises at import on grpcio older than the generator.
    grpc_text = (PROTO_DIR / "inference_pb2_grpc.py").read_text()
    generated = re.search(r"GRPC_GENERATED_VERSION = '([^']+)'", grpc_text)
    assert generated
    assert generated.group(1) == _pinned_tools_version()
    for name in ("grpcio", "grpcio-health-checking", "grpcio-reflection"):
        floor = [Version(s.version) for s in reqs[name].specifier if s.operator == ">="]
        assert floor and floor[0] >= Version(generated.group(1)), f"{name} floor below the gencode's grpcio"


def test_protocol_version_is_documented_in_the_proto() -> None:
    text = (PROTO_DIR / "inference.proto").read_text()
    assert f"{PROTOCOL_VERSION} for this file" in text


def test_proto_and_stubs_are_package_data() -> None:
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert {"*.proto", "*.pyi"} <= set(data["splitexit.proto"])
