"""One attack chain on a suspect on disk: what the ticket and the claim supply, and when data are loaded."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import untrained_ticket

from ticketguard.artifacts.ticket import Ticket
from ticketguard.attacks.chains import parse_chain
from ticketguard.core.errors import InputError
from ticketguard.core.files import save_tensors
from ticketguard.experiments.suspect_attack import attack_suspect
from ticketguard.verification.claim import Claim, DefenceClaim


@pytest.fixture(scope="module")
def ticket_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return untrained_ticket().save(tmp_path_factory.mktemp("suspect") / "ticket")


def _median_kept_magnitude(folder: Path) -> float:
    ticket = Ticket.load(folder)
    return float(torch.cat([ticket.weights[name][ticket.mask[name]].abs() for name in ticket.mask]).median())


def test_the_defence_takes_the_claims_threshold_unless_one_is_given(ticket_folder: Path) -> None:
    claim = Claim(None, {}, defence=DefenceClaim(_median_kept_magnitude(ticket_folder), 0.005))
    defended = attack_suspect(ticket_folder, parse_chain("defence"), claim=claim)
    assert defended.mask.density() == pytest.approx(defended.density_before / 2, rel=0.01)
    untouched = attack_suspect(ticket_folder, parse_chain("defence"), claim=claim, threshold=0.0)
    assert untouched.mask.density() == untouched.density_before
    with pytest.raises(InputError, match="threshold"):
        attack_suspect(ticket_folder, parse_chain("defence"))


def test_fine_tuning_a_bare_model_file_needs_a_data_set(ticket_folder: Path, tmp_path: Path) -> None:
    save_tensors(tmp_path / "model.safetensors", Ticket.load(ticket_folder).weights)
    pruned = attack_suspect(tmp_path / "model.safetensors", parse_chain("magnitude:fraction=0.5"))
    assert pruned.mask.density() == pytest.approx(pruned.density_before / 2, rel=0.01)
    with pytest.raises(InputError, match="needs a data set"):
        attack_suspect(tmp_path / "model.safetensors", parse_chain("finetune:epochs=1"))


def test_transfer_to_parity_trains_on_the_tickets_own_data_set(ticket_folder: Path) -> None:
    moved = attack_suspect(ticket_folder, parse_chain("transfer:epochs=1"), transfer_data="parity",
                           train_per_class=3, device="cpu")
    assert [tensor.shape[0] for tensor in moved.weights.values() if tensor.ndim == 2] == [2]  # even / odd
