"""`splitexit calibrate`: fits a policy on validation outputs to a budget or a setting,
writes plain JSON that loads back, and refuses what cannot be met."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import splitexit_tests_edge_support as S  # registered by conftest.py
from splitexit.cli import main
from splitexit.policies import policy_from_dict


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("calibrate")
    ckpt = root / "digits.safetensors"
    assert main(["train", "--data", "digits", "--arch", "resnet14_tiny", "--exit-after", "1,2,3,4",
                 "--epochs", "3", "--batch-size", "64", "--lr", "0.05", "--augment-pad", "1", "--no-flip",
                 "--cache-dir", str(root / "cache"), "--out", str(ckpt)]) == 0
    return ckpt, root / "cache"


def _calibrate(checkpoint: tuple[Path, Path], out: Path, *args: str) -> int:
    ckpt, cache = checkpoint
    return main(["calibrate", str(ckpt), "--data", "digits", "--cache-dir", str(cache), "--out", str(out), *args])


@pytest.mark.parametrize("policy", ["maxprob", "entropy", "patience", "bof_beta", "msdnet_budget", "bolukbasi",
                                    "eenet", "predictive"])
def test_budget_is_met_on_validation_and_the_policy_loads_back(policy: str, checkpoint, tmp_path: Path) -> None:
    out = tmp_path / "policy.json"
    assert _calibrate(checkpoint, out, "--policy", policy, "--budget", "0.8") == 0
    entry = json.loads(out.read_text())
    assert entry["name"] == policy
    assert entry["validation"]["cost_frac"] <= 0.8 + 1e-9
    assert sum(entry["validation"]["exit_hist"]) == pytest.approx(1.0, abs=1e-3)
    assert policy_from_dict(entry).name == policy


def test_a_setting_instead_of_a_budget(checkpoint, tmp_path: Path) -> None:
    out = tmp_path / "policy.json"
    assert _calibrate(checkpoint, out, "--policy", "bof_beta", "--beta", "0.9", "--statistic", "margin") == 0
    assert json.loads(out.read_text())["params"]["beta"] == 0.9


def test_budget_below_the_cheapest_exit_is_refused_and_nothing_written(checkpoint, tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "policy.json"
    assert _calibrate(checkpoint, out, "--policy", "msdnet_budget", "--budget", "0.05") == 2
    assert "below the cheapest exit" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("args, message", [
    (("--policy", "oracle", "--budget", "0.5"), "needs each sample's label"),
    (("--policy", "maxprob"), "needs --threshold or --budget"),
])
def test_impossible_requests_say_why(checkpoint, tmp_path: Path, capsys: pytest.CaptureFixture[str], args,
                                     message: str) -> None:
    assert _calibrate(checkpoint, tmp_path / "p.json", *args) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("args", [("--policy", "magic"), ("--policy", "maxprob", "--budget", "abc"),
                                  ("--policy", "maxprob", "--budget", "-1")])
def test_bad_arguments_are_usage_errors(checkpoint, tmp_path: Path, args) -> None:
    with pytest.raises(SystemExit) as exc:
        _calibrate(checkpoint, tmp_path / "p.json", *args)
    assert exc.value.code == 2


def test_export_writes_a_bundle_both_sides_load(checkpoint, tmp_path: Path, capsys) -> None:
    from splitexit.bundle import load_bundle

    policy = tmp_path / "policy.json"
    assert _calibrate(checkpoint, policy, "--policy", "maxprob", "--budget", "0.8") == 0
    out = tmp_path / "bundle"
    assert main(["export", str(checkpoint[0]), "--policy", str(policy), "--split", "2", "--codec", "fp16",
                 "--out", str(out)]) == 0
    edge, cloud = load_bundle(out, "edge"), load_bundle(out, "cloud")
    assert edge.hash == cloud.hash and edge.split == 2 and edge.codec == "fp16"
    assert edge.input_shape == (1, 8, 8)
    assert edge.manifest.calibration["cost_frac"] <= 0.8 + 1e-9
    printed = capsys.readouterr().out
    assert edge.hash in printed
    # the feature after stage 2 is larger than the 64-byte 8x8 input: the operator is told
    import re

    assert re.search(r"note: an offloaded row carries [\d,]+ bytes \(fp16 feature \d+x\d+x\d+ after stage 2\), "
                     r"[\d.]+x the 64-byte raw input", printed), printed
    (tmp_path / "bad.json").write_text("{not json")
    assert main(["export", str(checkpoint[0]), "--policy", str(tmp_path / "bad.json"), "--out", str(tmp_path / "b2")]) == 2
    assert not (tmp_path / "b2").exists()


@pytest.mark.slow
def test_eval_policy_gives_what_the_deployed_system_answers(checkpoint, tmp_path: Path, capsys) -> None:
    """`eval --policy` on the test split against the deployed system (export, a real `cloud
    serve` process, `edge run` over gRPC) on the same test images: the same accuracy and
    the same answering exits, SDN's fallback answers included (issue 20)."""
    from collections import Counter

    import numpy as np

    from splitexit.bundle import read_manifest
    from splitexit.data import load_dataset

    ckpt, cache = checkpoint
    policy = tmp_path / "policy.json"
    # fitted to a budget, so that answers come from several exits whatever the training
    # gave (fallback answers, where an earlier exit was the most confident of an unsure
    # row's, are labelled by the exit they came from: tested in test_edge_agent)
    assert _calibrate(checkpoint, policy, "--policy", "maxprob", "--budget", "0.9") == 0
    threshold = json.loads(policy.read_text())["params"]["threshold"]
    assert main(["eval", str(ckpt), "--data", "digits", "--policy", str(policy), "--out", str(tmp_path / "ev"),
                 "--cache-dir", str(cache)]) == 0
    assert "policy maxprob: accuracy" in capsys.readouterr().out
    figures = json.loads((tmp_path / "ev" / "eval.json").read_text())["policy"]
    assert 0 < figures["answer_hist"][-1] < 1, ("the test needs answers from edge and cloud exits", figures)
    bundle = tmp_path / "bundle"
    assert main(["export", str(ckpt), "--policy", str(policy), "--split", "2", "--edge-engine", "torch",
                 "--out", str(bundle)]) == 0
    test = load_dataset("digits").test
    np.save(tmp_path / "test.npy", test.images)
    with S.cloud_worker(bundle) as address:
        out = tmp_path / "answers.jsonl"
        assert main(["edge", "run", str(bundle), "--input", str(tmp_path / "test.npy"), "--worker", address,
                     "--out", str(out)]) == 0
    answers = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(answers) == len(test.labels) and not any(a["route"] == "degraded" for a in answers)
    labels = {a["sample_id"]: a["label"] for a in answers}
    acc = float(np.mean([labels[f"test.npy:{i}"] == y for i, y in enumerate(test.labels.tolist())]))
    assert acc == pytest.approx(figures["acc"], abs=1.5 / len(answers))
    stages = list(read_manifest(bundle).exits)  # the stage of each ladder exit
    deployed = Counter(a["exit"] for a in answers)
    for k, share in enumerate(figures["answer_hist"]):
        assert abs(deployed.get(stages[k], 0) - share * len(answers)) <= 1.5, (k, deployed, figures["answer_hist"])
    # and the same cost: an answer sure enough left at its own exit, a fallback at the last
    # one (it evaluated them all); each exit costs its cumulative MACs (eval's c_k)
    cumulative = json.loads((tmp_path / "ev" / "eval.json").read_text())["cumulative_macs"]
    sure = (lambda k: threshold[k]) if isinstance(threshold, list) else (lambda k: threshold)  # noqa: E731
    left = [stages.index(a["exit"]) if a["confidence"] >= sure(stages.index(a["exit"])) else len(stages) - 1
            for a in answers]
    cost = float(np.mean([cumulative[k] for k in left]))
    assert cost == pytest.approx(figures["cost"], rel=0.01), (cost, figures["cost"])


def test_calibrate_says_which_exits_a_policy_leaves_idle(checkpoint, tmp_path: Path, capsys) -> None:
    """Threshold 0: every sample leaves at the first exit; the others answer none, and
    calibrate says so instead of leaving the user to find the unused heads (issue 20)."""
    assert _calibrate(checkpoint, tmp_path / "p.json", "--policy", "maxprob", "--threshold", "0") == 0
    out = capsys.readouterr().out
    assert "note: exit@2, exit@3, exit@4 answer(s) under 0.5% of the validation samples" in out, out
