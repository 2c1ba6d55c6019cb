"""Every benchmark's --quick form runs end to end and writes the keys BENCH.md asks for."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from splitexit.cli import build_parser, main

pytestmark = pytest.mark.slow  # trains quick models and runs whole benchmarks

POLICIES_REQUIRED = ("maxprob", "entropy", "patience", "bof_beta", "msdnet_budget", "eenet", "bolukbasi",
                     "predictive")


def test_bench_is_a_subcommand_with_its_benchmarks() -> None:
    parser = build_parser()
    assert "bench" in parser.format_help()
    with pytest.raises(SystemExit):
        parser.parse_args(["bench", "nonsense"])


def test_tradeoff_quick_writes_every_required_key(bench_dirs: tuple[Path, Path], quick_bench) -> None:
    result = quick_bench("tradeoff")
    assert 0 < result["full"]["acc"] <= 1 and result["full"]["macs"] > 0
    assert result["oracle"]["acc"] >= result["full"]["acc"]
    for name in POLICIES_REQUIRED:
        points = result["policies"][name]
        assert points, name
        for p in points:
            assert {"param", "acc", "macs", "exit_hist", "balance"} <= set(p)
            assert sum(p["exit_hist"]) == pytest.approx(1.0, abs=1e-3)
    assert set(result["at_budget"]) == {"0.3", "0.5", "0.7"}
    for name in ("msdnet_budget", "eenet"):
        assert set(result["calibration"][name]) == {"0.3", "0.5", "0.7"}
    for budget, versus in result["eenet_vs_msdnet"].items():
        eenet, msdnet = result["calibration"]["eenet"][budget], result["calibration"]["msdnet_budget"][budget]
        assert versus["acc_delta_points"] == pytest.approx(100 * (eenet["acc"] - msdnet["acc"]), abs=1e-2)
    assert set(result["eenet_vs_msdnet"]) == {"0.3", "0.5", "0.7"}
    predictive = result["predictive"]
    for key in ("exit_evals", "energy_mj", "per_exit_evals", "per_exit_energy_mj"):
        assert predictive[key] > 0, key
    assert 0 <= predictive["val"]["acc"] - predictive["val"]["per_exit_acc"] <= 0.002 + 1e-9
    assert result["cascade"]["speedup"] > 0 and "acc_delta" in result["cascade"]
    assert len(result["bof_vs_maxprob"]) > 0
    assert len(result["head_macs"]) == len(result["exits"]) - 1
    assert (bench_dirs[1] / "tradeoff.png").stat().st_size > 0
    assert (bench_dirs[1] / "exit_hist.png").stat().st_size > 0


def test_overhead_quick_reports_the_ratio(bench_dirs: tuple[Path, Path], quick_bench) -> None:
    result = quick_bench("overhead", "--repeats", "5")
    for key in ("edge_macs", "exit_macs", "exit_ms", "edge_ms", "ratio"):
        assert result[key] > 0, key
    assert result["ratio"] == pytest.approx(result["exit_ms"] / result["edge_ms"], rel=1e-2)
    assert result["engine"] == "onnx" and result["ratio"] == result["ratio_onnx"] and result["ratio_torch"] > 0
    for by_engine in result["by_batch"].values():  # both engines, the runner's whole overhead beside the heads'
        for engine in ("torch", "onnx"):
            row = by_engine[engine]
            assert row["runtime_ms"] > 0 and row["exit_ms"] > 0
            plain = row.get("runtime_edge_ms", row["edge_ms"])  # onnx: the plain graph timed beside the runner
            assert row["runtime_ratio"] == pytest.approx(row["runtime_ms"] / plain - 1, rel=1e-2, abs=1e-3)
        assert by_engine["onnx_vs_torch_max_prob_diff"] < 1e-4  # the same network on both engines
    assert "weights" not in result


def test_untrained_times_the_same_network_without_training_it(tmp_path: Path) -> None:
    cache, out = tmp_path / "cache", tmp_path / "out"
    assert main(["bench", "overhead", "--quick", "--untrained", "--repeats", "3", "--cache-dir", str(cache),
                 "--out", str(out)]) == 0
    result = json.loads((out / "overhead.json").read_text())
    assert result["weights"].startswith("untrained") and result["ratio"] > 0
    assert not (cache / "runs").exists()  # nothing was trained


def test_models_quick_compares_bof_and_pool_heads(bench_dirs: tuple[Path, Path], quick_bench) -> None:
    result = quick_bench("models")
    for kind in ("bof", "pool"):
        heads = result["heads"][kind]
        assert heads["exit_head"] == kind and len(heads["exit_acc"]) == len(heads["exit_after"]) + 1
        assert heads["train_mode"] == "exits"
    assert result["edge"]["train_seconds"] > 0


def test_full_bench_without_reference_data_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)  # ../shared/data is not beside this folder
    assert main(["bench", "tradeoff", "--cache-dir", str(tmp_path / "c"), "--out", str(tmp_path / "o")]) == 2
    assert "reference data not found" in capsys.readouterr().err


def test_train_quick_times_old_and_new_schedules_side_by_side(bench_dirs: tuple[Path, Path], quick_bench) -> None:
    result = quick_bench("train")
    for name in ("edge", "cloud"):
        row = result[name]
        for key in ("epochs", "train_s", "s_per_epoch", "precision", "acc", "fp32_s_per_epoch", "time_ratio"):
            assert key in row, (name, key)
        assert row["train_s"] > 0 and row["fp32_s_per_epoch"] > 0 and all(0 <= a <= 1 for a in row["acc"])
        expected = row["epochs"] * row["new_s_per_epoch_now"] / (row["legacy_epochs"] * row["fp32_s_per_epoch"])
        assert row["time_ratio"] == pytest.approx(expected, rel=0.01, abs=2e-3)  # rounded to 3 decimals
    assert len(result["edge"]["acc"]) == 6 and len(result["cloud"]["acc"]) == 1  # five exits and the final head
    assert (bench_dirs[1] / "train.png").exists()
