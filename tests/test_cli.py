"""The CLI in-process: happy paths on the embedded digits, and its error paths."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from splitexit.cli import build_parser, main


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    try:
        code = main(list(argv))
    except SystemExit as exc:  # argparse errors
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def test_parser_lists_the_subcommands() -> None:
    help_text = build_parser().format_help()
    for name in ("demo", "train", "eval"):
        assert name in help_text


def test_demo_prints_exit_accuracy_and_histogram(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(capsys, "demo", "--epochs", "3", "--out", str(tmp_path / "demo"),
                        "--cache-dir", str(tmp_path / "cache"))
    assert code == 0
    assert "oracle" in out and "exit@1" in out and "final" in out and "max-prob >= 0.9" in out
    report = json.loads((tmp_path / "demo" / "eval.json").read_text())
    assert len(report["exit_acc"]) == 6 and sum(report["exit_hist"]) == pytest.approx(1.0)
    assert (tmp_path / "demo" / "eval.png").stat().st_size > 1000


def test_train_then_eval_a_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = tmp_path / "tiny.safetensors"
    code, out, err = _run(capsys, "train", "--data", "digits", "--arch", "resnet14_tiny", "--exit-after", "2,4",
                          "--exit-head", "pool", "--epochs", "2", "--batch-size", "64", "--augment-pad", "1",
                          "--no-flip", "--val-size", "300", "--out", str(ckpt), "--cache-dir", str(tmp_path / "c"))
    assert code == 0, err
    assert ckpt.exists() and "exit@2" in out
    code, out, err = _run(capsys, "eval", str(ckpt), "--data", "digits", "--split", "val", "--threshold", "0.5",
                          "--out", str(tmp_path / "ev"), "--cache-dir", str(tmp_path / "c"))
    assert code == 0, err
    assert "val set, 300 samples" in out
    assert json.loads((tmp_path / "ev" / "eval.json").read_text())["threshold"] == 0.5


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train"], "the following arguments are required: --data"),
        (["train", "--data", "digits", "--epochs", "0"], "expected a positive integer"),
        (["train", "--data", "digits", "--exit-after", "2,x"], "comma-separated stage indices"),
        (["demo", "--threshold", "1.5"], "expected a number in [0, 1]"),
        (["fly"], "invalid choice"),
    ],
)
def test_bad_arguments_exit_2_with_one_clear_line(capsys, argv: list[str], message: str) -> None:
    code, _, err = _run(capsys, *argv)
    assert code == 2 and message in err


def test_unreadable_inputs_exit_2_with_one_clear_line(tmp_path: Path, capsys) -> None:
    missing = tmp_path / "missing.tar.gz"
    code, out, err = _run(capsys, "train", "--data", str(missing), "--cache-dir", str(tmp_path))
    assert code == 2 and err.strip() == f"splitexit: error: {missing}: no such file or folder"
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"garbage")
    code, _, err = _run(capsys, "eval", str(bad), "--data", "digits", "--cache-dir", str(tmp_path))
    assert code == 2 and "not a readable safetensors checkpoint" in err and len(err.strip().splitlines()) == 1
    code, _, err = _run(capsys, "train", "--data", "digits", "--arch", "resnet9000", "--cache-dir", str(tmp_path))
    assert code == 2 and "unknown arch 'resnet9000'" in err
    code, _, err = _run(capsys, "train", "--data", "digits", "--arch", "resnet14_tiny", "--exit-after", "7",
                        "--cache-dir", str(tmp_path))
    assert code == 2 and "exit points" in err
    code, _, err = _run(capsys, "train", "--data", "digits", "--freeze-backbone", "--cache-dir", str(tmp_path))
    assert code == 2 and "--init" in err
    code, _, err = _run(capsys, "train", "--data", "digits", "--freeze-backbone", "--init", str(tmp_path / "m"),
                        "--exit-ramp", "0.5", "--cache-dir", str(tmp_path))
    assert code == 2 and "exit_ramp is for joint training" in err and "Traceback" not in err


def test_train_checks_its_arguments_before_reading_any_data(tmp_path: Path, capsys) -> None:
    """A bad exit point or architecture is reported at once, not after the data set is
    decoded: here the data set does not even exist, and the message is about the arguments."""
    missing = str(tmp_path / "huge.tar.gz")
    code, _, err = _run(capsys, "train", "--data", missing, "--arch", "resnet14_tiny", "--exit-after", "2,9")
    assert code == 2 and "resnet14_tiny has exit points 0..5 (default [2, 4]); got [9]" in err
    code, _, err = _run(capsys, "train", "--data", missing, "--arch", "resnet9000")
    assert code == 2 and "unknown arch" in err and "huge.tar.gz" not in err
    code, _, err = _run(capsys, "train", "--data", missing, "--progressive", "0")
    assert code == 2 and "--progressive: expected a number in (0, 1], got 0" in err
    code, _, err = _run(capsys, "train", "--data", missing, "--progressive", "0.5", "--progressive-hold", "0.8",
                        "--progressive-finetune", "0.5")
    assert code == 2 and "shares of the epochs that sum to at most 1" in err and "huge.tar.gz" not in err


def test_train_help_shows_defaults_and_grey_data_trains_without_flips(tmp_path: Path, capsys) -> None:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    help_text = " ".join(sub.choices["train"].format_help().split())  # one line: no wrapping inside a default
    assert "(default: 30)" in help_text and "(default: 0.1)" in help_text and "(default: None)" not in help_text
    code, out, err = _run(capsys, "train", "--data", "digits", "--arch", "resnet14_tiny", "--epochs", "1",
                          "--batch-size", "64", "--cache-dir", str(tmp_path))
    assert code == 0, err
    assert "1 channel(s), no flips; exits after stages [2, 4]" in out  # the architecture's own default exits
    code, _, err = _run(capsys, "train", "--data", "digits", "--arch", "resnet14_tiny", "--epochs", "1",
                        "--alternate-flips", "--cache-dir", str(tmp_path))
    assert code == 2 and "--alternate-flips needs flips" in err and "Traceback" not in err
