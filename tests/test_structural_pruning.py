"""Structurally pruned copies: a thief removes whole channels with Torch-Pruning (L1 importance), may
fine-tune, and ships a smaller network; verify matches each remaining channel to one of the owner's and
reads the rest as unknown.

On the owner's protected digits ticket every level (10, 25, 50 % of the hidden channels, with and without two
epochs of fine-tuning) is "ownership shown": the QR match rate over the modules whose channels survive and the
fingerprint over the matched channels both pass; the code itself decodes only while few of its rows are gone.
An independent ticket pruned the same way is never shown.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import sparse_model, trained_ticket

from ticketguard.artifacts.suspect import Suspect, load_suspect
from ticketguard.artifacts.ticket import Ticket
from ticketguard.attacks.chains import attack
from ticketguard.attacks.disguises import export_onnx, widen
from ticketguard.attacks.structural import prune_channels
from ticketguard.core.errors import InputError
from ticketguard.core.masks import Mask
from ticketguard.data import ImageData
from ticketguard.models import build_from_state, build_model
from ticketguard.models.architecture import BN_PARAMETERS, permutation_groups
from ticketguard.schemes import trigger as v3
from ticketguard.verification.align import AlignmentError, Reference, align
from ticketguard.verification.claim import load_claim
from ticketguard.verification.verify import verify

FRACTIONS = (0.1, 0.25, 0.5)
TUNING = {"as pruned": "", "fine-tuned 2 epochs": "+finetune:epochs=2"}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def owner(protected_owner: tuple[Ticket, Path, ImageData]) -> tuple[Ticket, Path, ImageData]:
    return protected_owner


def logits(model: torch.nn.Module, in_channels: int) -> torch.Tensor:
    inputs = torch.randn(4, in_channels, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model.eval()(inputs)


@pytest.mark.slow
def test_pruned_resnet18_streams_and_hidden_channels_align_to_the_owners_channels() -> None:
    """Torch-Pruning removes stream channels consistently across every layer of a ResNet-18 stage; each
    remaining channel finds its own reference channel, and the aligned network computes the suspect's function
    with the missing channels as zeros."""
    _, weights, mask = sparse_model("resnet18", 1, seed=0)
    reference = Reference.of("resnet18", 1, 10, weights, mask)
    pruned, _ = attack(weights, mask, "permute:seed=3+channels:fraction=0.25")
    alignment = align(Suspect.from_weights(pruned, "zeros"), reference)
    assert alignment.report["pruned"]["stream.0"] == {"missing": 16, "kept": 48}
    assert alignment.report["pruned"]["layers.6.hidden1"] == {"missing": 128, "kept": 384}
    assert alignment.observed is not None
    assert all(bool((alignment.mask[k] == (mask[k] & alignment.observed[k])).all()) for k in mask)
    aligned = build_model("resnet18", 1, 10)
    aligned.load_state_dict(alignment.weights)
    thief, _ = build_from_state(pruned, "running the pruned copy")
    expected = logits(thief, 1)
    assert float((logits(aligned, 1) - expected).abs().max() / expected.abs().max()) < 1e-4


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning", "ignore::FutureWarning")
def test_an_onnx_export_of_a_pruned_copy_aligns_with_its_batchnorm_folded(tmp_path: Path) -> None:
    _, weights, mask = sparse_model("resnet20", 1, seed=0)
    reference = Reference.of("resnet20", 1, 10, weights, mask)
    pruned, _ = attack(weights, mask, "permute:seed=2+channels:fraction=0.25")
    thief, _ = build_from_state(pruned, "exporting the pruned copy")
    export_onnx(thief.eval(), tmp_path / "thief.onnx", (1, 8, 8), dynamo=False)
    alignment = align(load_suspect(tmp_path / "thief.onnx"), reference)
    assert alignment.report["structure"] == "onnx graph" and alignment.observed is not None
    assert all(bool((alignment.mask[k] == (mask[k] & alignment.observed[k])).all()) for k in mask)
    aligned = build_model("resnet20", 1, 10)
    aligned.load_state_dict(alignment.weights)
    expected = logits(thief, 1)
    assert float((logits(aligned, 1) - expected).abs().max() / expected.abs().max()) < 1e-4


COPIES = [  # fine-tuning takes seconds: only the 25 % copy's runs in the quick set
    pytest.param(fraction, tuning, marks=[pytest.mark.slow] if TUNING[tuning] and fraction != 0.25 else [])
    for fraction in FRACTIONS
    for tuning in TUNING
]


@pytest.mark.parametrize(("fraction", "tuning"), COPIES)
def test_the_owners_ticket_pruned_structurally_is_shown(owner, fraction: float, tuning: str) -> None:
    ticket, claim, data = owner
    chain = f"channels:fraction={fraction}{TUNING[tuning]}"
    stolen, _ = attack(dict(ticket.weights), ticket.mask, chain, data=data)
    verdict = verify(stolen, claim)
    found = {e.name: e for e in verdict.evidence}
    qr, fingerprint = found["qr-signature"], found["fingerprint"]
    print(f"{fraction:.0%} {tuning}: QR match {qr.score:.3f} p {qr.p_value:.2g} erased "
          f"{qr.details['modules_erased']} decoded {qr.details['decoded']!r}; "
          f"fingerprint {fingerprint.score:.3f}")
    assert verdict.owned, verdict
    assert qr.passed and fingerprint.passed
    assert verdict.details["alignment"]["pruned"] and qr.details["modules_erased"] > 0
    assert not verdict.unavailable


@pytest.fixture(scope="module")
def innocent(owner) -> Ticket:
    """A ticket trained independently on the owner's data, at the owner's density."""
    return trained_ticket(owner[2], seed=11, density=0.5)


@pytest.mark.parametrize("fraction", FRACTIONS)
def test_an_independent_ticket_pruned_the_same_way_is_not_shown(
    owner, innocent: Ticket, fraction: float
) -> None:
    _, claim, _ = owner
    suspect, _ = prune_channels(dict(innocent.weights), innocent.mask, fraction=fraction)
    verdict = verify(suspect, claim)
    assert not verdict.owned
    assert not any(e.passed for e in verdict.evidence), verdict


def test_the_trigger_check_runs_the_pruned_copy_at_its_own_widths(owner) -> None:
    """Without alignment the trigger set is asked of the suspect as shipped (its layers as narrow as their
    weights); the answers are those of the aligned network verify runs."""
    ticket, claim_path, _ = owner
    stolen, _ = attack(dict(ticket.weights), ticket.mask, "channels:fraction=0.25")
    model, _ = build_from_state(stolen, "checking the trigger set in process")
    assert model.get_submodule("blocks.8.conv1").out_channels == 48
    claim = load_claim(claim_path)
    alone = v3.verify_weights(stolen, claim.trigger)
    found = {e.name: e for e in verify(stolen, claim).evidence}
    assert alone.details["agreed"] == found["trigger"].details["agreed"]


def test_more_channels_in_one_group_and_fewer_in_another_are_refused_in_one_line(owner) -> None:
    ticket, claim, _ = owner
    widened, _ = widen(dict(ticket.weights), Mask({}), dummies=2, splits=0)
    mixed = dict(widened)
    for key in ["blocks.8.conv1.weight", *(f"blocks.8.bn1.{e}" for e in BN_PARAMETERS)]:
        mixed[key] = ticket.weights[key][:40]
    mixed["blocks.8.conv2.weight"] = ticket.weights["blocks.8.conv2.weight"][:, :40]
    reference = load_claim(claim).reference
    refusal = "more channels than the reference in blocks.0.hidden1 and fewer in blocks.8.hidden1"
    with pytest.raises(AlignmentError, match=refusal) as refused:
        align(Suspect.from_weights(mixed, "zeros"), reference)
    assert "\n" not in str(refused.value)
    verdict = verify(mixed, claim)
    assert not verdict.owned
    assert any("fewer in blocks.8.hidden1" in u.reason for u in verdict.unavailable)


def test_a_narrower_option_a_stream_is_refused_with_its_reason(owner) -> None:
    """ResNet-20's shortcuts carry each stream at a fixed offset: a copy with fewer stream channels does not
    run, so alignment names the stream and why."""
    ticket, claim, _ = owner
    stream = next(g for g in permutation_groups(("resnet20", 1, 10)) if g.name == "stream.0")
    narrow = dict(ticket.weights)
    for key, dim in stream.axes:
        narrow[key] = narrow[key].narrow(dim, 0, 12)
    with pytest.raises(AlignmentError, match="stream.0 .* option-A shortcut"):
        align(Suspect.from_weights(narrow, "zeros"), load_claim(claim).reference)
    with pytest.raises(InputError, match="widths do not fit together"):
        build_from_state(narrow, "checking the trigger set in process")


@pytest.mark.parametrize("fraction", [1.0, -0.1])
def test_channel_pruning_refuses_a_fraction_outside_0_to_1(fraction: float) -> None:
    _, weights, mask = sparse_model("resnet20", 1)
    with pytest.raises(InputError, match="fraction must be in"):
        prune_channels(weights, mask, fraction=fraction)
