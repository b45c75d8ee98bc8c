"""`ticketguard demo` with tiny settings: the whole story runs and writes its report with the figures."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import trained_ticket
from rich.progress import Progress

from ticketguard.cli import main
from ticketguard.data import ImageData
from ticketguard.experiments import demo
from ticketguard.protect import protect
from ticketguard.training.loop import TrainConfig


def test_demo_writes_report_with_paper_comparison_and_figures(tmp_path: Path, capsys) -> None:
    out = tmp_path / "demo"
    argv = [
        "demo",
        "--out",
        str(out),
        "--rounds",
        "1",
        "--epochs",
        "2",
        "--finetune-epochs",
        "1",
        "--train-per-class",
        "10",
        "--test-per-class",
        "5",
    ]
    assert main(argv) == 0
    assert str(out / "report.md") in capsys.readouterr().err.replace("\n", "")
    report = (out / "report.md").read_text()
    for heading in ("beside the paper", "19.369 %", "fake3", "V1: retrained accuracy", "robustness.png"):
        assert heading in report
    # the attack grid quotes the paper's Tables 5, 6 and 8 beside each row (its CIFAR-10 numbers on digits)
    for quoted in ("V2 91.25, V3 91.33 (89.0)", "V2 60.87", "91.04 % (19.789 %), decodes, matches"):
        assert quoted in report
    for figure in ("robustness.png", "qr-grid.png"):
        assert (out / figure).read_bytes()[:4] == b"\x89PNG"
    rows = json.loads((out / "grid" / "results.json").read_text())
    assert all(row["error"] is None for row in rows)
    assert {"fake1", "fake2", "fake3", "add-on", "fine-tuning"} <= {row["family"] for row in rows}
    assert (out / "claim.json").is_file() and (out / "protected" / "ticket.json").is_file()


def test_demo_refuses_too_few_epochs(tmp_path: Path, capsys) -> None:
    assert main(["demo", "--out", str(tmp_path), "--epochs", "1"]) == 2
    assert "epochs" in capsys.readouterr().err


def test_the_signature_only_training_is_stored_and_not_repeated_on_the_same_inputs(
    digits: ImageData, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """V2 alone is trained only to measure its cost; a rerun (after a kill, or from a committed campaign) reuses
    the stored numbers for the same ticket and settings, and trains again when the settings change."""
    data = digits.subset(30, 10, 0)
    ticket = trained_ticket(data, seed=3, density=0.5)
    trained: list[bool] = []  # one entry per protect() training: does it carry a trigger set (V3)?

    def counting_protect(*args: Any, **kwargs: Any) -> Any:
        trained.append(kwargs.get("trigger") is not None)
        return protect(*args, **kwargs)

    monkeypatch.setattr(demo, "protect", counting_protect)

    def numbers(epochs: int) -> dict[str, Any]:
        config = TrainConfig(epochs=epochs, seed=0)
        return demo.protect_demo(ticket, data, demo.DEMO, config, torch.device("cpu"), Progress(disable=True),
                                 tmp_path)[2]

    first = numbers(1)
    assert trained == [False, True]
    again = numbers(1)
    assert trained == [False, True, True]
    assert (again["v2_accuracy"], again["unmarked_trigger_accuracy"]) == (
        first["v2_accuracy"], first["unmarked_trigger_accuracy"])
    stored = json.loads((tmp_path / demo.SIGNATURE_ONLY).read_text())
    del stored["inputs"]["train"]["crop_padding"]  # as written before the setting existed: run at its default
    (tmp_path / demo.SIGNATURE_ONLY).write_text(json.dumps(stored))
    numbers(1)
    assert trained == [False, True, True, True]
    numbers(2)
    assert trained == [False, True, True, True, False, True]
