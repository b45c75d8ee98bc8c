"""The evaluation harness: rows per attack, finished points skipped on rerun, failures kept, tables, plots."""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import pytest
import torch

from ticketguard.artifacts.ticket import Ticket
from ticketguard.cli import main
from ticketguard.core.masks import Mask, magnitude_prune, prunable_names
from ticketguard.data import ImageData
from ticketguard.data.triggers import keyed_trigger_set
from ticketguard.experiments import harness, report
from ticketguard.models import build_model
from ticketguard.schemes import signature as v2
from ticketguard.schemes import trigger as v3
from ticketguard.training.loop import TrainConfig, evaluate, state_copy
from ticketguard.verification.claim import Claim, DefenceClaim, save_claim, ticket_hashes
from ticketguard.verification.defence import defence_threshold

PAYLOAD = "ACME-R20-2026"
PNG = b"\x89PNG"


@pytest.fixture(scope="module")
def data(digits: ImageData) -> ImageData:
    return digits.subset(30, 10, 0)


@pytest.fixture(scope="module")
def subject(data: ImageData) -> harness.Subject:
    """A signed, trigger-marked ticket: magnitude-pruned at init, code embedded, 3 epochs with triggers."""
    torch.manual_seed(0)
    model = build_model("resnet20", 1, 10)
    rewind = state_copy(model)
    mask = magnitude_prune(rewind, Mask.ones_like(rewind, prunable_names(model)), 0.6)
    signed_mask, signature, _ = v2.embed_signature(mask, rewind, rewind, PAYLOAD)
    trigger = keyed_trigger_set(7, 30, 10, 1, (8, 8))
    v3.watermark(model, data, trigger, TrainConfig(epochs=3, lr=0.05), signed_mask, per_batch=8)
    ticket = Ticket(
        "resnet20",
        1,
        10,
        (8, 8),
        "digits",
        list(data.classes),
        signed_mask,
        rewind,
        state_copy(model),
        evaluate(model, data),
    )
    claim = Claim(
        signature,
        {},
        v3.TriggerClaim.of(trigger, 10, data.normalization()),
        DefenceClaim(defence_threshold(ticket.weights, ticket.mask), 0.005),
    )
    return harness.Subject(
        ticket, data, claim
    )


POINTS = [
    harness.GridPoint("none", 0.0, "magnitude:fraction=0"),
    harness.GridPoint("magnitude pruning", 0.2, "magnitude:fraction=0.2"),
    harness.GridPoint("add-on + defence", 0.05, "addon:fraction=0.05+defence"),
    harness.GridPoint("fine-tuning", 1, "finetune:epochs=1"),
    harness.GridPoint("fake1", 1.0, "fake1"),
    harness.GridPoint("fake3", 1.0, "fake3"),
]


def test_grid_measures_every_point_and_records_a_failed_one(subject, tmp_path: Path) -> None:
    rows = harness.run_grid(subject, POINTS, tmp_path)
    by_family = {row["family"]: row for row in rows}
    assert [row["spec"] for row in rows] == [p.spec for p in POINTS]
    clean = by_family["none"]
    # the claim has no reference, so every weight below its threshold t is dropped, the owner's weakest too
    assert clean["qr_decodes"] and clean["match_rate"] >= 0.99 and clean["owned"]
    assert clean["accuracy"] == subject.ticket.accuracy and clean["trigger_accuracy"] is not None
    assert by_family["magnitude pruning"]["density"] == pytest.approx(0.8 * clean["density"], rel=1e-3)
    assert "key" in by_family["fake1"]["error"]  # no key size known: reported, the grid goes on
    assert by_family["fake3"]["qr_decodes"] is False and by_family["fake3"]["match_rate"] < 0.8
    assert by_family["fine-tuning"]["error"] is None


def test_rerun_skips_finished_points_and_retries_failed_ones(subject, tmp_path: Path, monkeypatch) -> None:
    harness.run_grid(subject, POINTS[:2] + POINTS[4:5], tmp_path)
    ran = []
    original = harness.run_point
    monkeypatch.setattr(harness, "run_point", lambda s, p: ran.append(p.spec) or original(s, p))
    rows = harness.run_grid(subject, POINTS[:2] + POINTS[4:5], tmp_path)
    assert ran == ["fake1"] and len(rows) == 3


def test_points_measured_on_another_ticket_are_measured_again(subject, tmp_path: Path, monkeypatch) -> None:
    harness.run_grid(subject, POINTS[:2], tmp_path)
    other = dataclasses.replace(
        subject,
        ticket=dataclasses.replace(
            subject.ticket, weights={n: t * 0.5 for n, t in subject.ticket.weights.items()}
        ),
    )
    ran = []
    original = harness.run_point
    monkeypatch.setattr(harness, "run_point", lambda s, p: ran.append(p.spec) or original(s, p))
    harness.run_grid(other, POINTS[:2], tmp_path)
    assert ran == [p.spec for p in POINTS[:2]]


def test_results_are_written_as_json_csv_and_markdown(subject, tmp_path: Path) -> None:
    rows = harness.run_grid(subject, POINTS[:2], tmp_path)
    paths = harness.write_results(rows, tmp_path)
    assert json.loads(paths["json"].read_text()) == rows
    with paths["csv"].open() as handle:
        table = list(csv.DictReader(handle))
    assert [r["spec"] for r in table] == [p.spec for p in POINTS[:2]] and "qr_modules" not in table[0]
    markdown = paths["md"].read_text().splitlines()
    assert markdown[0].startswith("| attack | weights left") and len(markdown) == 4


def test_plots_and_qr_grid_are_png_files(subject, tmp_path: Path) -> None:
    rows = harness.run_grid(subject, POINTS[:3], tmp_path)
    curves = report.plot_curves(rows, tmp_path / "curves.png")
    grid = report.qr_grid(rows, subject.claim.signature, tmp_path / "grid.png")
    assert curves.read_bytes()[:4] == PNG and grid.read_bytes()[:4] == PNG


def test_evaluate_command_runs_the_grid_from_a_ticket_and_claim(subject, tmp_path: Path) -> None:
    folder = subject.ticket.save(tmp_path / "protected")
    claim = dataclasses.replace(subject.claim, ticket_files=ticket_hashes(folder))
    save_claim(tmp_path / "claim.json", claim)
    out = tmp_path / "eval"
    argv = [
        "evaluate",
        str(folder),
        "--claim",
        str(tmp_path / "claim.json"),
        "--out",
        str(out),
        "--prune",
        "0.1",
        "--addon",
        "0.01",
        "--finetune-epochs",
        "1",
        "--train-per-class",
        "10",
        "--test-per-class",
        "5",
        "--device",
        "cpu",
    ]
    assert main(argv) == 0
    rows = json.loads((out / "results.json").read_text())
    assert {r["family"] for r in rows} >= {"none", "magnitude pruning", "add-on + defence", "fake3"}
    assert next(r for r in rows if r["family"] == "none")["qr_decodes"]
    assert (out / "robustness.png").is_file() and (out / "qr-grid.png").is_file()


def test_evaluate_command_refuses_bad_fractions(subject, tmp_path: Path, capsys) -> None:
    folder = subject.ticket.save(tmp_path / "protected")
    save_claim(tmp_path / "claim.json", Claim(subject.claim.signature, ticket_hashes(folder)))
    argv = ["evaluate", str(folder), "--claim", str(tmp_path / "claim.json"), "--prune", "a,b"]
    assert main(argv) == 2
    assert "--prune" in capsys.readouterr().err
