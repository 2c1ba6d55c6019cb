from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from splitexit.evaluate import ExitOutputs, balance, format_report, summarize, threshold_exits, write_report


def _outputs() -> ExitOutputs:
    # 3 exits, 4 samples, 2 classes; labels all 0
    p = np.array(
        [
            [[0.95, 0.05], [0.40, 0.60], [0.30, 0.70], [0.55, 0.45]],  # exit 1
            [[0.90, 0.10], [0.92, 0.08], [0.20, 0.80], [0.45, 0.55]],  # exit 2
            [[0.99, 0.01], [0.97, 0.03], [0.60, 0.40], [0.10, 0.90]],  # final
        ],
        dtype=np.float32,
    )
    return ExitOutputs(p, np.zeros(4, dtype=np.int64))


def test_summary_on_hand_made_outputs() -> None:
    report = summarize(_outputs(), ["e1", "e2", "final"], threshold=0.9, cumulative_macs=[1.0, 2.0, 4.0], full_macs=3.5)
    assert report.exit_acc == pytest.approx([0.5, 0.5, 0.75])
    assert report.oracle_acc == pytest.approx(1.0)  # sample 4 is right at exit 1 only
    # sample 1 exits at e1, sample 2 at e2, samples 3 and 4 reach the final exit
    assert report.exit_hist == pytest.approx([0.25, 0.25, 0.5])
    # as the deployed maxprob answers: sample 3, sure nowhere, answers with its most confident
    # exit (e2: 0.80 for class 1, wrong; the final exit alone would have been right)
    assert report.threshold_acc == pytest.approx(0.5) and report.fallback_share == pytest.approx(0.25)
    assert report.threshold_macs == pytest.approx(0.25 * 1 + 0.25 * 2 + 0.5 * 4)
    assert "oracle" in format_report(report)


def test_threshold_rule_and_balance() -> None:
    left, answered = threshold_exits(_outputs().probs, 0.99)
    assert left.tolist() == [2, 2, 2, 2] and answered.tolist() == [2, 2, 1, 2]  # each row's most confident exit
    assert threshold_exits(_outputs().probs, 0.99, fallback=False)[1].tolist() == [2, 2, 2, 2]
    assert [a.tolist() for a in threshold_exits(_outputs().probs, 0.0)] == [[0, 0, 0, 0]] * 2
    assert balance([1, 0, 0]) == 0.0
    assert f"{balance([0, 5, 0]):.2f}" == "0.00"  # not "-0.00" in a plot's legend
    assert balance([1, 1, 1, 1]) == pytest.approx(1.0)
    assert 0 < balance([0.7, 0.2, 0.1]) < 1


def test_report_files_and_output_cache_round_trip(tmp_path: Path) -> None:
    report = summarize(_outputs(), ["e1", "e2", "final"])
    json_path, png_path = write_report(report, tmp_path)
    assert json.loads(json_path.read_text())["oracle_acc"] == pytest.approx(1.0)
    assert png_path.stat().st_size > 1000
    _outputs().save(tmp_path / "o.safetensors")
    loaded = ExitOutputs.load(tmp_path / "o.safetensors")
    np.testing.assert_array_equal(loaded.probs, _outputs().probs)
