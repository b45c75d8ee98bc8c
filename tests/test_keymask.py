"""Scheme V1: split into locked ticket and key, merge bit for bit, refuse bad input, verify by accuracy."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch

from ticketguard.artifacts.ticket import MASK_FILE, REWIND_FILE, WEIGHTS_FILE, Ticket
from ticketguard.cli import main
from ticketguard.core.errors import InputError
from ticketguard.core.masks import Mask, magnitude_prune, prunable_names
from ticketguard.data import ImageData
from ticketguard.models import build_model
from ticketguard.schemes.keymask import (
    forge_random_key,
    load_pair,
    merge_key,
    save_split,
    split_key,
)
from ticketguard.schemes.scores import SCORES
from ticketguard.training.loop import TrainConfig, state_copy, train
from ticketguard.verification.verify import verify_key


@functools.cache
def _ticket(architecture: str, density: float, in_channels: int = 3) -> Ticket:
    """A ticket of a freshly built model: W_k its initial state, W the same weights magnitude-pruned."""
    torch.manual_seed(0)
    model = build_model(architecture, in_channels, 10)
    rewind = state_copy(model)
    mask = magnitude_prune(rewind, Mask.ones_like(rewind, prunable_names(model)), 1 - density)
    mask.apply_(model)
    return Ticket(
        architecture, in_channels, 10, (8, 8), "digits", [str(c) for c in range(10)], mask, rewind,
        state_copy(model), accuracy=0.9, metadata={"dense_accuracy": 0.95},
    )


def _same_bits(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(
        a[n].dtype == b[n].dtype
        and torch.equal(a[n].flatten().view(torch.uint8), b[n].flatten().view(torch.uint8))
        for n in a
    )


@pytest.fixture(scope="module")
def trained_ticket(tmp_path_factory: pytest.TempPathFactory, digits: ImageData) -> Path:
    """A digits ResNet-20 trained 3 epochs, magnitude-pruned to 5 % and saved: a small real ticket."""
    torch.manual_seed(0)
    data = digits.subset(60, 20)
    model = build_model("resnet20", 1, 10)
    result = train(model, data, TrainConfig(epochs=3, batch_size=64), rewind_epoch=1)
    weights = state_copy(model)
    mask = magnitude_prune(weights, Mask.ones_like(weights, prunable_names(model)), 0.95)
    mask.apply_(model)
    ticket = Ticket(
        "resnet20", 1, 10, (8, 8), "digits", list(digits.classes), mask, result.rewind_state, state_copy(model),
        accuracy=result.accuracy, metadata={"dense_accuracy": result.accuracy},
    )
    return ticket.save(tmp_path_factory.mktemp("ticket") / "ticket")


DENSITIES = {"resnet20": 0.2, "resnet18": 0.01, "resnet50": 0.002}


@pytest.mark.slow
@pytest.mark.parametrize("score_name", list(SCORES))
@pytest.mark.parametrize("architecture", list(DENSITIES))
def test_merge_of_split_restores_ticket_bit_for_bit(architecture: str, score_name: str) -> None:
    ticket = _ticket(architecture, DENSITIES[architecture])
    locked, key = split_key(ticket, 0.05, score_name)
    merged = merge_key(locked, key)
    assert merged.mask == ticket.mask
    assert _same_bits(merged.weights, ticket.weights)
    assert _same_bits(merged.rewind, ticket.rewind)


def test_key_holds_the_highest_scores_and_the_locked_mask_the_rest() -> None:
    ticket = _ticket("resnet20", 0.2)
    locked, key = split_key(ticket, 0.1, "omp")
    secret = key.mask(ticket.mask)
    assert key.size() == round(0.1 * ticket.mask.kept())
    assert locked.mask.kept() + key.size() == ticket.mask.kept()
    for name in ticket.mask:
        assert not (locked.mask[name] & secret[name]).any()
        assert torch.equal(locked.mask[name] | secret[name], ticket.mask[name])
        assert (locked.weights[name][secret[name]] == 0).all()
        assert (locked.rewind[name][secret[name]] == 0).all()
    weakest_key = min(ticket.weights[n][secret[n]].abs().min() for n in secret if secret[n].any())
    strongest_left = max(locked.weights[n].abs().max() for n in locked.mask)
    assert weakest_key >= strongest_left


def test_cli_split_then_merge_writes_identical_tensor_files(trained_ticket: Path, tmp_path: Path) -> None:
    assert main(["split", str(trained_ticket), "--score", "ewp", "--key-density", "0.05", "--out", str(tmp_path / "s")]) == 0
    key_manifest = json.loads((tmp_path / "s" / "key" / "key.json").read_text())
    assert key_manifest["score"] == "ewp" and key_manifest["key_density"] == 0.05
    assert main(["merge", str(tmp_path / "s" / "locked"), str(tmp_path / "s" / "key"), "--out", str(tmp_path / "m")]) == 0
    for name in (MASK_FILE, REWIND_FILE, WEIGHTS_FILE):
        assert (tmp_path / "m" / name).read_bytes() == (trained_ticket / name).read_bytes()
    assert Ticket.load(tmp_path / "m").accuracy == Ticket.load(trained_ticket).accuracy


def test_merge_refuses_a_key_of_another_locked_ticket(trained_ticket: Path, tmp_path: Path) -> None:
    ticket = Ticket.load(trained_ticket)
    save_split(*split_key(ticket, 0.05, "omp"), tmp_path / "a")
    save_split(*split_key(ticket, 0.05, "random"), tmp_path / "b")
    out = tmp_path / "merged"
    assert main(["merge", str(tmp_path / "a" / "locked"), str(tmp_path / "b" / "key"), "--out", str(out)]) == 2
    assert not out.exists()


def test_split_refuses_a_key_density_outside_the_unit_interval(trained_ticket: Path, tmp_path: Path) -> None:
    for density in ("0", "1", "-0.1", "1.5"):
        out = tmp_path / f"split{density}"
        assert main(["split", str(trained_ticket), "--key-density", density, "--out", str(out)]) == 2
        assert not out.exists()


def test_merge_refuses_a_locked_mask_that_overlaps_the_key() -> None:
    ticket = _ticket("resnet20", 0.2)
    _, key = split_key(ticket, 0.05, "omp")
    with pytest.raises(InputError, match="already keeps key positions"):
        merge_key(ticket, key)


def test_tampered_key_file_is_refused(trained_ticket: Path, tmp_path: Path) -> None:
    locked_folder, key_folder = save_split(*split_key(Ticket.load(trained_ticket), 0.05, "omp"), tmp_path / "s")
    manifest = json.loads((key_folder / "key.json").read_text())
    manifest["files"]["key.safetensors"] = "0" * 64
    (key_folder / "key.json").write_text(json.dumps(manifest))
    with pytest.raises(InputError, match="does not match"):
        load_pair(locked_folder, key_folder)


def test_fake1_key_has_the_key_size_and_avoids_the_locked_mask() -> None:
    ticket = _ticket("resnet20", 0.2)
    locked, key = split_key(ticket, 0.05, "ewp")
    forged = forge_random_key(locked.mask, locked.rewind, key.size(), seed=1)
    assert forged.size() == key.size()
    merged = merge_key(locked, forged)
    assert merged.mask.kept() == ticket.mask.kept()
    assert merged.mask != ticket.mask


@pytest.mark.slow
def test_verify_key_reports_the_accuracy_gap_and_the_cli_agrees(
    trained_ticket: Path, digits: ImageData, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    locked, key = split_key(Ticket.load(trained_ticket), 0.9, "omp")
    config = TrainConfig(epochs=3, batch_size=64)
    verdict = verify_key(locked, key, digits.subset(60, 20), config, 0.01, torch.device("cpu"), fake1=True)
    evidence = verdict.evidence[0]
    assert evidence.details["accuracy_with_key"] > evidence.details["accuracy_without_key"]
    gap = evidence.details["accuracy_with_key"] - evidence.details["accuracy_without_key"]
    assert evidence.score == pytest.approx(gap)
    save_split(locked, key, tmp_path / "s")
    capsys.readouterr()
    args = ["verify-key", str(tmp_path / "s" / "locked"), "--key-mask", str(tmp_path / "s" / "key"), "--epochs", "3",
            "--batch-size", "64", "--train-per-class", "60", "--test-per-class", "20", "--device", "cpu", "--fake1",
            "--json"]
    assert main(args) == (0 if verdict.owned else 1)
    report = json.loads(capsys.readouterr().out)
    assert report["owned"] == verdict.owned
    assert report["evidence"][0]["details"] == pytest.approx(evidence.details)
