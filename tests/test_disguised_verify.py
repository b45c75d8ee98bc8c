"""A thief's free edits do not hide a protected ticket: verify aligns the suspect to the claim's reference first.

Each disguise keeps the network's function; each is verified from the file a thief would ship, alone and chained
with 20 % magnitude pruning, and an independently trained ticket under the same disguise is not shown.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import QUICK_SEARCH

from ticketguard.artifacts.ticket import Ticket
from ticketguard.attacks import chains, disguises
from ticketguard.cli import main
from ticketguard.core.files import save_tensors
from ticketguard.data import ImageData
from ticketguard.search.config import SearchConfig
from ticketguard.search.imp import find_extreme_ticket
from ticketguard.training.loop import TrainConfig

CHAINS = {
    "permute+rescale": "permute:seed=3+rescale:seed=4",
    "rename": "rename:style=torchvision",
    "fold-bn": "permute:seed=5+fold-bn",
    "widen": "widen:seed=6",
    "scale-then-add-on": "rescale:layer=blocks.6.conv1.weight:factor=100+addon:fraction=0.4:scale=0.05",
}


def disguise(ticket: Ticket, spec: str) -> dict[str, torch.Tensor]:
    """The shipped weights after a chain of disguises and attacks, e.g. ``permute:seed=3+rescale:seed=4``."""
    return chains.attack(dict(ticket.weights), ticket.mask, spec)[0]


@pytest.fixture(scope="module")
def owner(protected_owner: tuple[Ticket, Path, ImageData]) -> tuple[Ticket, Path, ImageData]:
    return protected_owner


def verdict(path: Path, claim: Path, capsys) -> tuple[int, dict]:
    capsys.readouterr()
    code = main(["verify", str(path), "--claim", str(claim), "--json"])
    return code, json.loads(capsys.readouterr().out)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CHAINS))
def test_every_disguise_is_verified_from_the_shipped_file(owner, name: str, tmp_path: Path, capsys) -> None:
    ticket, claim, _ = owner
    save_tensors(tmp_path / "stolen.safetensors", disguise(ticket, CHAINS[name]))
    code, report = verdict(tmp_path / "stolen.safetensors", claim, capsys)
    passed = {e["name"]: e["passed"] for e in report["evidence"]}
    assert code == 0, report
    assert passed["qr-signature"] and passed["fingerprint"], passed


@pytest.mark.slow
@pytest.mark.parametrize("name", ["permute+rescale", "rename", "fold-bn"])
def test_disguise_then_20_percent_pruning_is_still_verified(owner, name: str, tmp_path: Path, capsys) -> None:
    ticket, claim, _ = owner
    pruned = disguise(ticket, f"{CHAINS[name]}+magnitude:fraction=0.2")
    save_tensors(tmp_path / "stolen.safetensors", pruned)
    code, report = verdict(tmp_path / "stolen.safetensors", claim, capsys)
    assert code == 0, report


@pytest.mark.slow
def test_onnx_exports_from_both_exporters_are_verified(owner, tmp_path: Path, capsys) -> None:
    ticket, claim, _ = owner
    model = ticket.build_model().eval()
    for dynamo in (False, True):
        path = tmp_path / f"stolen-{dynamo}.onnx"
        disguises.export_onnx(model, path, (ticket.in_channels, *ticket.input_size), dynamo=dynamo)
        code, report = verdict(path, claim, capsys)
        assert code == 0 and report["alignment"]["structure"] == "onnx graph", report


@pytest.mark.slow
def test_an_independent_ticket_under_the_same_disguise_is_not_shown(owner, tmp_path: Path, capsys) -> None:
    _, claim, data = owner
    other = find_extreme_ticket(data, SearchConfig(**{**QUICK_SEARCH.__dict__, "train": TrainConfig(epochs=4, seed=7)}),
                                tmp_path / "search")
    save_tensors(tmp_path / "other.safetensors", disguise(other, CHAINS["permute+rescale"]))
    code, report = verdict(tmp_path / "other.safetensors", claim, capsys)
    assert code == 1
    fingerprint = next(e for e in report["evidence"] if e["name"] == "fingerprint")
    assert not fingerprint["passed"] and fingerprint["p_value"] > 1e-3


@pytest.mark.slow
def test_a_repackaged_copy_with_a_wrapper_prefix_and_extra_tensors_is_verified(owner, tmp_path: Path, capsys) -> None:
    """The model wrapped as ``net.`` beside a baked-in normalisation and a temperature, every zero set to 1e-8."""
    ticket, claim, _ = owner
    filled = {n: torch.where(t == 0, torch.full_like(t, 1e-8), t) if n in ticket.mask else t
              for n, t in ticket.weights.items()}
    repackaged = {**{f"net.{n}": t for n, t in filled.items()}, "normalize.mean": torch.tensor([0.3]),
                  "normalize.std": torch.tensor([0.4]), "temperature": torch.tensor(1.5)}
    save_tensors(tmp_path / "repackaged.safetensors", repackaged)
    code, report = verdict(tmp_path / "repackaged.safetensors", claim, capsys)
    assert code == 0 and report["alignment"]["structure"] == "names under 'net.'"
    assert next(e for e in report["evidence"] if e["name"] == "qr-signature")["details"]["decodes_to_claim"]
