"""`ticketguard find` options for the held-out matching test and the schedules; `info` shows their numbers."""

import json
from pathlib import Path

import pytest
import torch

from ticketguard.cli import main, output
from ticketguard.search import imp
from ticketguard.training.loop import TrainResult, state_copy

QUICK = ["--epochs", "2", "--rewind-epoch", "1", "--ratios", "0.5,0.25", "--max-rounds", "6", "--train-per-class", "30"]


@pytest.fixture()
def fake_training(monkeypatch) -> None:
    """Rounds keep dense's validation results down to 20 % density and lose half of them below it."""

    def fake_train(model, data, config, mask=None, **kwargs):
        model.fake_density = 1.0 if mask is None else mask.density()
        return TrainResult(accuracy=0.9 if model.fake_density >= 0.2 else 0.4, rewind_state=state_copy(model))

    def fake_correct(split, model):
        correct = torch.ones(split.labels.numel(), dtype=torch.bool)
        correct[: correct.numel() // 2 if model.fake_density < 0.2 else 0] = False
        return correct

    monkeypatch.setattr(imp, "train", fake_train)
    monkeypatch.setattr(imp.HeldOutSplit, "correct", fake_correct)


def _find_and_report(out: Path, options: list[str], capsys) -> dict:
    """Run `find` with the quick settings and these options, then return `info --json` of the ticket."""
    assert main(["find", "--out", str(out), *QUICK, *options]) == 0
    capsys.readouterr()
    assert main(["info", str(out), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_adaptive_find_and_info_show_validation_test_and_the_matching_test(
    fake_training, tmp_path: Path, capsys, monkeypatch
) -> None:
    out = tmp_path / "ticket"
    report = _find_and_report(
        out, ["--pruning-schedule", "adaptive", "--validation-fraction", "0.5", "--confidence", "0.9"], capsys
    )
    assert report["pruning_schedule"] == "adaptive" and report["decide_on"] == "validation"
    assert report["validation"]["images"] == 150 and report["validation"]["confidence"] == 0.9
    assert report["trainings"] == len(report["history"]) and report["seconds"] >= 0
    assert [round(h["density"], 3) for h in report["history"]] == [1.0, 0.5, 0.25, 0.125, 0.188]
    assert report["density"] == pytest.approx(0.25, abs=1e-3) and report["validation_accuracy"] == 1.0
    assert all({"validation_accuracy", "accuracy", "estimate", "bound", "p_value"} <= set(h) for h in report["history"][1:])

    monkeypatch.setattr(output.results, "width", 200)  # one line per table row
    assert main(["info", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "validation accuracy (dense)" in printed and "paired non-inferiority on 150 validation images" in printed
    assert "bisecting down to 0.25" in printed and "valid." in printed and "bound" in printed


def test_find_can_decide_on_test_as_the_paper_does(fake_training, tmp_path: Path, capsys) -> None:
    out = tmp_path / "paper"
    report = _find_and_report(
        out, ["--pruning-schedule", "paper", "--decide-on", "test", "--validation-fraction", "0"], capsys
    )
    assert report["decide_on"] == "test" and report["validation"]["images"] == 0
    assert all(h["validation_accuracy"] is None for h in report["history"])
    assert report["pruning_spec"] == [2, 0]
    assert main(["find", "--out", str(tmp_path / "bad"), *QUICK, "--validation-fraction", "0"]) != 0
    assert "validation-fraction" in capsys.readouterr().err
