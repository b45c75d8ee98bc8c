"""protect's file rules and trigger sources, on an untrained ticket: nothing here trains.

The protection itself (one retraining with both schemes) is tested end to end in test_combined_verify and
test_protect_custom_training.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import untrained_ticket
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ticketguard.artifacts.ticket import Ticket
from ticketguard.core.errors import InputError
from ticketguard.protect import (
    Protected,
    SignatureConfig,
    TriggerSource,
    check_destinations,
    sign_mask,
    signature_to_carry,
)
from ticketguard.verification.claim import Claim


@pytest.fixture(scope="module")
def ticket() -> Ticket:
    return untrained_ticket()


@pytest.fixture
def embedded(ticket: Ticket, tmp_path: Path) -> tuple[Path, Path, Claim]:
    """A ticket signed by embed without training, its claim, and the claim as written."""
    signed, found, _ = sign_mask(ticket, SignatureConfig("OWNER-1"))
    claim = Claim(found, {})
    Protected(signed, claim).save(tmp_path / "signed", tmp_path / "claim.json")
    return tmp_path / "signed", tmp_path / "claim.json", claim


def test_a_claim_inside_the_ticket_folder_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="inside the ticket folder"):
        check_destinations(tmp_path / "out", tmp_path / "out" / "claim.json", force=True)


def test_an_existing_claim_is_replaced_only_with_force_or_when_extended(tmp_path: Path) -> None:
    (tmp_path / "claim.json").write_text("{}")
    with pytest.raises(InputError, match="--claim"):
        check_destinations(tmp_path / "out", tmp_path / "claim.json", force=False)
    check_destinations(tmp_path / "out", tmp_path / "claim.json", force=False, extend_claim=True)
    check_destinations(tmp_path / "out", tmp_path / "claim.json", force=True)


def test_watermark_carries_the_signature_of_an_unsigned_claim_of_the_same_ticket(embedded) -> None:
    signed, claim_path, claim = embedded
    assert signature_to_carry(claim_path, signed) == claim.signature
    assert signature_to_carry(claim_path.with_name("none.json"), signed) is None


def test_a_claim_of_another_ticket_is_not_extended(embedded, ticket: Ticket, tmp_path: Path) -> None:
    _, claim_path, _ = embedded
    ticket.save(tmp_path / "other")
    with pytest.raises(InputError, match="made for another ticket"):
        signature_to_carry(claim_path, tmp_path / "other")


def test_a_signed_claim_is_not_extended(embedded, tmp_path: Path) -> None:
    signed, _, claim = embedded
    owner_key = Ed25519PrivateKey.generate()
    Protected(Ticket.load(signed), claim).save(tmp_path / "again", tmp_path / "signed.json", owner_key)
    with pytest.raises(InputError, match="would void its signature"):
        signature_to_carry(tmp_path / "signed.json", tmp_path / "again")


def test_a_trigger_set_comes_from_a_folder_or_a_seed_but_not_both(ticket: Ticket, tmp_path: Path) -> None:
    assert not TriggerSource().given and TriggerSource(seed=3).given
    keyed = TriggerSource(seed=3, count=12).load(ticket)
    assert len(keyed.labels) == 12 and keyed.shape == (1, 8, 8)
    with pytest.raises(InputError, match="give --trigger DIR .* or --trigger-seed N"):
        TriggerSource().load(ticket)
    with pytest.raises(InputError, match="give one of"):
        TriggerSource(folder=tmp_path, seed=3).load(ticket)
