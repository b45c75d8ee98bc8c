"""The suspect is read on its own terms: no innocent model reads as holding the owner's mask.

Reading the owner's positions as kept whenever they were non-zero made an independent ticket, pruned sparser
and with every zero set to 1e-8, read as the owner's whole mask: QR p ~ 1e-70 and "ownership shown". These
tests keep that and its dense-fine-tuned variants out, and keep the owner's own dense-fine-tuned copy in.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch
from conftest import QUICK_SEARCH

from ticketguard.artifacts.ticket import Ticket
from ticketguard.attacks import chains
from ticketguard.cli import main
from ticketguard.core.files import save_tensors
from ticketguard.core.masks import Mask
from ticketguard.data import ImageData
from ticketguard.search.config import SearchConfig
from ticketguard.search.imp import find_extreme_ticket
from ticketguard.training.loop import TrainConfig
from ticketguard.verification.defence import defended
from ticketguard.verification.reading import effective_magnitudes, rank_read

FILL = 1e-8


def test_rank_read_keeps_the_largest_and_leaves_out_ties_at_the_boundary() -> None:
    magnitude = torch.tensor([5.0, 4.0, 3.0, 1e-8, 1e-8, 1e-8, 0.0])
    assert rank_read(magnitude, 3).tolist() == [True, True, True, False, False, False, False]
    # 4 wanted, but the 4th and the first left out are tied fill values: none of them counts
    assert rank_read(magnitude, 4).tolist() == [True, True, True, False, False, False, False]
    # a suspect keeping fewer than the count is read as it is, and zeros are never kept
    assert rank_read(magnitude, 100).tolist() == [True] * 6 + [False]
    assert not rank_read(magnitude, 0).any()


def test_rank_read_leaves_out_a_fill_that_per_channel_units_spread_apart() -> None:
    stored = torch.tensor([[5.0, 1e-8, 1e-8], [4.0, 1e-8, 1e-8]])
    units = torch.tensor([[1.0], [100.0]])  # the second channel's fill would outrank the first's
    kept = rank_read(stored.abs() * units, 3, stored)
    assert kept.tolist() == [[True, False, False], [True, False, False]]


def test_rank_read_keeps_low_precision_values_that_few_weights_share() -> None:
    stored = torch.arange(1, 401, dtype=torch.float32).repeat(2).view(8, 100) / 400
    units = torch.linspace(0.5, 2.0, 8)[:, None]  # equal stored values in two channels, different units
    kept = rank_read(stored * units, 400, stored)
    assert int(kept.sum()) == 400


def test_effective_magnitudes_do_not_change_when_a_channel_is_rescaled_through_batchnorm() -> None:
    torch.manual_seed(0)
    kernel, gamma, var = torch.randn(4, 3, 3, 3), torch.rand(4) + 0.5, torch.rand(4) + 0.5
    scale = torch.tensor([0.25, 1.0, 3.0, 4.0])
    eps = 1e-5
    new_var = var * scale**2
    new_gamma = gamma * torch.sqrt(new_var + eps) / (scale * torch.sqrt(var + eps))  # disguises.rescale's rule
    before = effective_magnitudes(kernel, (gamma, var, eps))
    after = effective_magnitudes(kernel * scale.view(-1, 1, 1, 1), (new_gamma, new_var, eps))
    torch.testing.assert_close(after, before)


def test_defence_drops_weak_weights_at_every_position() -> None:
    weights = {"conv.weight": torch.tensor([[0.5, -0.01], [0.02, -2.0]]), "bn.weight": torch.tensor([0.001])}
    read = defended(weights, 0.03)
    assert read["conv.weight"].tolist() == [[0.5, 0.0], [0.0, -2.0]]
    assert torch.equal(read["bn.weight"], weights["bn.weight"])  # only weight tensors are read


@pytest.fixture(scope="module")
def owner(protected_owner: tuple[Ticket, Path, ImageData]) -> tuple[Ticket, Path, ImageData]:
    return protected_owner


@pytest.fixture(scope="module")
def innocent(owner, tmp_path_factory: pytest.TempPathFactory) -> Ticket:
    """A ticket trained independently on the same data, pruned to a quarter of the owner's density."""
    _, _, data = owner
    config = SearchConfig(**{**QUICK_SEARCH.__dict__, "train": TrainConfig(epochs=4, seed=7)})
    ticket = find_extreme_ticket(data, config, tmp_path_factory.mktemp("innocent") / "search")
    weights, mask = chains.attack(dict(ticket.weights), ticket.mask, "magnitude:fraction=0.75")
    return dataclasses.replace(ticket, mask=mask, weights=weights)


def filled(weights: dict[str, torch.Tensor], mask: Mask) -> dict[str, torch.Tensor]:
    return {n: torch.where(t == 0, torch.full_like(t, FILL), t) if n in mask else t for n, t in weights.items()}


def verdict(weights: dict[str, torch.Tensor], claim: Path, tmp_path: Path, capsys) -> tuple[int, dict]:
    save_tensors(tmp_path / "suspect.safetensors", weights)
    capsys.readouterr()
    code = main(["verify", str(tmp_path / "suspect.safetensors"), "--claim", str(claim), "--json"])
    return code, json.loads(capsys.readouterr().out)


def evidence(report: dict, name: str) -> dict:
    return next(e for e in report["evidence"] if e["name"] == name)


@pytest.mark.slow
def test_a_sparser_innocent_with_every_zero_filled_is_not_shown(owner, innocent: Ticket, tmp_path: Path,
                                                                  capsys) -> None:
    _, claim, _ = owner
    code, report = verdict(filled(dict(innocent.weights), innocent.mask), claim, tmp_path, capsys)
    assert code == 1
    # read as what it keeps (a quarter of the owner's density), never as the owner's mask
    assert report["reading"]["density_read"] == pytest.approx(innocent.mask.density(), rel=0.02)
    assert evidence(report, "qr-signature")["p_value"] > 1e-3
    assert not evidence(report, "fingerprint")["passed"]


@pytest.mark.slow
def test_a_filled_and_permuted_innocent_is_not_shown(owner, innocent: Ticket, tmp_path: Path, capsys) -> None:
    _, claim, _ = owner
    weights, mask = chains.attack(dict(innocent.weights), innocent.mask, "permute:seed=3+rescale:seed=4")
    code, report = verdict(filled(weights, mask), claim, tmp_path, capsys)
    assert code == 1
    assert evidence(report, "qr-signature")["p_value"] > 1e-3
    assert not evidence(report, "fingerprint")["passed"]


@pytest.mark.slow
@pytest.mark.parametrize("optimizer, lr", [("sgd", 1e-3), ("adam", 1e-4)])
def test_a_sparser_innocent_fine_tuned_densely_is_not_shown(owner, innocent: Ticket, optimizer: str, lr: float,
                                                              tmp_path: Path, capsys) -> None:
    _, claim, data = owner
    spec = f"finetune:epochs=2:lr={lr}:optimizer={optimizer}:free=true"
    weights, _ = chains.attack(dict(innocent.weights), innocent.mask, spec, data=data)
    code, report = verdict(weights, claim, tmp_path, capsys)
    assert code == 1
    assert evidence(report, "qr-signature")["p_value"] > 1e-3
    assert not evidence(report, "fingerprint")["passed"]


@pytest.mark.slow
def test_the_owners_copy_fine_tuned_densely_with_adam_is_verified(owner, tmp_path: Path, capsys) -> None:
    ticket, claim, data = owner
    spec = "permute:seed=1+finetune:epochs=5:lr=0.001:optimizer=adam:free=true"
    weights, mask = chains.attack(dict(ticket.weights), ticket.mask, spec, data=data)
    assert mask.density() > 0.99  # every weight moved: the mask is no longer visible as zeros
    code, report = verdict(weights, claim, tmp_path, capsys)
    assert code == 0
    assert evidence(report, "qr-signature")["passed"]


@pytest.mark.slow
def test_the_table_shows_what_was_read_and_no_share_above_100_percent(owner, innocent: Ticket, tmp_path: Path,
                                                                       capsys) -> None:
    _, claim, _ = owner
    save_tensors(tmp_path / "suspect.safetensors", filled(dict(innocent.weights), innocent.mask))
    capsys.readouterr()
    assert main(["verify", str(tmp_path / "suspect.safetensors"), "--claim", str(claim)]) == 1
    table = " ".join(capsys.readouterr().out.split())
    assert "mask read on its own terms: 12.50 % of the weights" in table
    shares = [float(number) for number in re.findall(r"(\d+(?:\.\d+)?) ?%", table)]
    assert shares and max(shares) <= 100.0

