"""Scheme V2: QR placement, embedding, extraction with and without a claim, statistics and decoding."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import trained_ticket
from hypothesis import given, settings
from hypothesis import strategies as st

from ticketguard.artifacts.ticket import Ticket
from ticketguard.attacks.removal import magnitude_pruning, random_pruning
from ticketguard.core.errors import InputError
from ticketguard.core.evidence import FORGERY_LEVEL
from ticketguard.core.masks import Mask, magnitude_prune, prunable_names, squeeze
from ticketguard.data import ImageData
from ticketguard.models import build_model
from ticketguard.protect import SignatureConfig, protect
from ticketguard.schemes import placement, qr
from ticketguard.schemes import signature as scheme
from ticketguard.schemes.blind_scan import blind_scan
from ticketguard.schemes.signature_figures import save_comparison_image
from ticketguard.training.loop import TrainConfig, state_copy

PAYLOAD = "ACME-R20-2026"


def random_mask(arch: str, density: float, seed: int = 0) -> tuple[Mask, dict[str, torch.Tensor]]:
    torch.manual_seed(seed)
    model = build_model(arch, 1, 10)
    weights = state_copy(model)
    return magnitude_prune(weights, Mask.ones_like(weights, prunable_names(model)), 1 - density), weights


def masked(weights: dict[str, torch.Tensor], mask: Mask) -> dict[str, torch.Tensor]:
    return {n: t * mask[n] if n in mask else t for n, t in weights.items()}


@pytest.fixture(scope="module")
def small_digits(digits: ImageData) -> ImageData:
    return digits.subset(40, 20, 0)


@pytest.fixture(scope="module")
def ticket(small_digits: ImageData) -> Ticket:
    return trained_ticket(small_digits, seed=0)


@pytest.fixture(scope="module")
def protected(ticket: Ticket, small_digits: ImageData) -> tuple[Ticket, scheme.Signature]:
    result = protect(
        ticket, small_digits, signature=SignatureConfig(PAYLOAD, copies=2), train_config=TrainConfig(epochs=1)
    )
    return result.ticket, result.claim.signature


@pytest.mark.parametrize("arch", ["resnet20", "resnet18", "resnet50"])
def test_round_trip_decodes_the_exact_payload_and_keeps_the_density_to_the_weight(arch: str) -> None:
    mask, weights = random_mask(arch, 0.2)
    new, signature, report = scheme.embed_signature(mask, weights, weights, PAYLOAD)
    assert new.kept() == mask.kept()
    assert report.changed_cells > 0 and report.compensated == abs(
        report.weights_added - report.weights_removed
    )
    reading = scheme.extract(masked(weights, new), signature)
    assert reading.decoded.text == PAYLOAD
    assert reading.match_rate == 1.0 and reading.p_value < 1e-30


def test_fft_costs_equal_direct_mismatch_counts() -> None:
    mask, _ = random_mask("resnet20", 0.05)
    codes = placement.qr_codes(PAYLOAD)
    layer = squeeze(mask["blocks.7.conv2.weight"])
    costs = placement.placement_costs(layer, codes)
    positions = torch.from_numpy(codes[0].data_positions.astype(np.int64))
    generator = torch.Generator().manual_seed(0)
    for pattern, row, col in torch.stack(
        [
            torch.randint(0, 8, (20,), generator=generator),
            torch.randint(0, costs.shape[1], (20,), generator=generator),
            torch.randint(0, costs.shape[2], (20,), generator=generator),
        ],
        1,
    ).tolist():
        region = layer[positions[:, 0] + row, positions[:, 1] + col].numpy()
        assert costs[pattern, row, col] == np.count_nonzero(region != codes[pattern].data_modules)


def test_chosen_placement_is_the_cheapest_over_layers_offsets_patterns_and_polarities() -> None:
    mask, _ = random_mask("resnet20", 0.05)
    codes = placement.qr_codes(PAYLOAD)
    n = len(codes[0].data_positions)
    costs = [
        placement.placement_costs(squeeze(mask[name]), codes)
        for name in placement.candidate_layers(mask, codes[0].spec.size)
    ]
    as_dark, as_light = min(float(c.min()) for c in costs), min(n - float(c.max()) for c in costs)
    best = {
        polarity: placement.search_placements(mask, codes, polarity=polarity)[0]
        for polarity in ("any", "dark", "light")
    }
    assert best["any"].changes == min(as_dark, as_light)
    assert (best["dark"].changes, best["dark"].kept_is_dark) == (as_dark, True)
    assert (best["light"].changes, best["light"].kept_is_dark) == (as_light, False)
    with pytest.raises(InputError, match="polarity"):
        placement.search_placements(mask, codes, polarity="grey")


def test_only_data_modules_are_written_and_fixed_pattern_cells_keep_their_connectivity() -> None:
    mask, weights = random_mask("resnet20", 0.2)
    new, signature, _ = scheme.embed_signature(mask, weights, weights, PAYLOAD)
    region, spec = signature.regions[0], signature.spec
    is_function, _ = qr.function_pattern_matrix(spec)
    window = (slice(region.row, region.row + spec.size), slice(region.col, region.col + spec.size))
    before, after = squeeze(mask[region.layer])[window], squeeze(new[region.layer])[window]
    assert torch.equal(before[torch.from_numpy(is_function)], after[torch.from_numpy(is_function)])
    assert not torch.equal(before, after)


def test_written_connections_keep_at_least_the_requested_weights_per_kernel() -> None:
    mask, weights = random_mask("resnet20", 0.05)
    new, signature, _ = scheme.embed_signature(mask, weights, weights, PAYLOAD, weights_per_connection=3)
    region, spec = signature.regions[0], signature.spec
    positions = torch.from_numpy(qr.data_positions(spec).astype(np.int64))
    rows, cols = positions[:, 0], positions[:, 1]
    counts = new[region.layer][rows + region.row, cols + region.col].flatten(1).sum(dim=1)
    kept = counts > 0
    assert (counts[kept] >= 3).all()


def test_vote_over_copies_decodes_when_one_copy_is_wiped_out() -> None:
    mask, weights = random_mask("resnet20", 0.2)
    new, signature, _ = scheme.embed_signature(mask, weights, weights, PAYLOAD, copies=3)
    assert len({r.layer for r in signature.regions}) == 3
    suspect = masked(weights, new)
    wiped = signature.regions[0]
    suspect[wiped.layer] = suspect[wiped.layer].clone()
    suspect[wiped.layer][wiped.row : wiped.row + 25, wiped.col : wiped.col + 25] = 0
    alone = replace(signature, regions=signature.regions[:1])
    assert scheme.extract(suspect, alone).decoded.text != PAYLOAD
    assert scheme.extract(suspect, signature).decoded.text == PAYLOAD


def test_protected_ticket_decodes_after_20pct_magnitude_pruning_and_proves_ownership_at_50pct(
    protected: tuple[Ticket, scheme.Signature],
) -> None:
    ticket, signature = protected
    weights, _ = magnitude_pruning(ticket.weights, ticket.mask, fraction=0.2)
    assert scheme.extract(weights, signature).decoded.text == PAYLOAD
    weights, _ = magnitude_pruning(ticket.weights, ticket.mask, fraction=0.5)
    reading = scheme.extract(weights, signature)
    verdict = scheme.evidence(reading)
    assert verdict.passed and reading.p_value < 1e-6


def test_random_pruning_keeps_the_p_value_tiny(protected: tuple[Ticket, scheme.Signature]) -> None:
    ticket, signature = protected
    weights, _ = random_pruning(ticket.weights, ticket.mask, fraction=0.3, seed=1)
    reading = scheme.extract(weights, signature)
    verdict = scheme.evidence(reading)
    assert verdict.passed and reading.p_value < 1e-6


def test_the_ticket_before_embedding_does_not_verify_despite_the_placement_fitting_it_best(
    ticket: Ticket, protected: tuple[Ticket, scheme.Signature]
) -> None:
    _, signature = protected
    reading = scheme.extract(ticket.weights, signature)
    verdict = scheme.evidence(reading)
    assert not verdict.passed and reading.decoded.text is None
    assert reading.raw_p_value < reading.p_value


def test_unmarked_ticket_never_verifies_and_holds_no_code(
    protected: tuple[Ticket, scheme.Signature], small_digits: ImageData
) -> None:
    _, signature = protected
    other = trained_ticket(small_digits, seed=1)
    reading = scheme.extract(other.weights, signature)
    verdict = scheme.evidence(reading)
    assert not verdict.passed
    assert reading.decoded.text is None and reading.p_value > 1e-3
    assert blind_scan(other.weights).found == ()


def test_blind_extraction_finds_the_code_without_a_claim(protected: tuple[Ticket, scheme.Signature]) -> None:
    ticket, signature = protected
    found = blind_scan(ticket.weights).found
    assert {(f.layer, f.row, f.col, f.text) for f in found} == {
        (r.layer, r.row, r.col, PAYLOAD) for r in signature.regions
    }


def test_a_decode_of_another_string_is_a_mismatch_never_a_match() -> None:
    mask, weights = random_mask("resnet20", 0.2)
    new, signature, _ = scheme.embed_signature(mask, weights, weights, "ACME-R20-2027")
    forged = replace(signature, payload=PAYLOAD)
    reading = scheme.extract(masked(weights, new), forged)
    verdict = scheme.evidence(reading)
    assert reading.decoded.text == "ACME-R20-2027" and reading.mismatch and not verdict.passed


def test_comparison_image_is_a_png(tmp_path: Path) -> None:
    mask, weights = random_mask("resnet20", 0.2)
    new, signature, _ = scheme.embed_signature(mask, weights, weights, PAYLOAD)
    save_comparison_image(tmp_path / "code.png", scheme.extract(masked(weights, new), signature))
    assert (tmp_path / "code.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_zxing_and_reed_solomon_agree_on_every_clean_code() -> None:
    for payload in ("ACME-R20-2026", "owner@example.com", "1234567890", "Ünïcode"):
        for code in placement.qr_codes(payload):
            fast = qr.decode(code.spec, code.data_modules)
            fallback = qr.decode(code.spec, code.data_modules, use_zxing=False)
            assert (fast.method, fallback.method) == ("zxing", "reed-solomon")
            assert fast.text == fallback.text == payload


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 3), st.integers(0, 7), st.booleans(), st.randoms(use_true_random=False))
def test_decoder_never_crashes_nor_invents_text_on_random_modules(
    version: int, pattern: int, kept_is_dark: bool, rng
) -> None:
    spec = qr.QrSpec(version, "H", pattern)
    modules = np.array([rng.random() < 0.5 for _ in range(len(qr.data_positions(spec)))])
    assert scheme.decode_modules(spec, modules, kept_is_dark).text is None


@settings(max_examples=40, deadline=None)
@given(st.floats(0.0, 0.4), st.integers(0, 2**31))
def test_damaged_code_decodes_to_the_payload_or_nothing(loss: float, seed: int) -> None:
    code = qr.make_qr(PAYLOAD)
    rng = np.random.default_rng(seed)
    modules = code.data_modules & (rng.random(len(code.data_modules)) >= loss)
    assert scheme.decode_modules(code.spec, modules, True).text in (None, PAYLOAD)


def test_bad_inputs_get_one_clear_message() -> None:
    mask, weights = random_mask("resnet20", 0.2)
    with pytest.raises(InputError, match="holds 7"):
        scheme.embed_signature(mask, weights, weights, PAYLOAD, version=1)
    with pytest.raises(InputError, match="at least 65 input and output channels"):
        scheme.embed_signature(mask, weights, weights, PAYLOAD, version=12)
    _, signature, _ = scheme.embed_signature(mask, weights, weights, PAYLOAD)
    layer = signature.regions[0].layer
    with pytest.raises(InputError, match="does not have"):
        scheme.extract({k: v for k, v in weights.items() if k != layer}, signature)
    with pytest.raises(InputError, match="shape"):
        scheme.extract({**weights, layer: weights[layer][:, :32]}, signature)


def test_embedding_refuses_to_gut_an_extremely_sparse_ticket(digits: ImageData) -> None:
    ticket = trained_ticket(digits, seed=0, density=0.004)
    with pytest.raises(InputError, match="denser ticket"):
        scheme.embed_signature(ticket.mask, ticket.weights, ticket.rewind, "ACME-R20-2026")


def test_a_match_rate_without_a_decode_must_beat_the_forgery_level() -> None:
    mask, weights = random_mask("resnet20", 0.2)
    new, signature, _ = scheme.embed_signature(mask, weights, weights, PAYLOAD)
    decoded = scheme.extract(masked(weights, new), signature)
    assert decoded.level == 1e-6 and scheme.evidence(dataclasses.replace(decoded, p_value=1e-10)).passed
    undecoded = scheme.extract(masked(weights, mask), signature)  # the mask before embedding: no decode
    assert undecoded.decoded.text is None and undecoded.level == FORGERY_LEVEL
    # a p-value a forger could reach by searching 1e10 payloads does not pass without a decode
    assert not scheme.evidence(dataclasses.replace(undecoded, p_value=1e-10)).passed
    assert scheme.evidence(dataclasses.replace(undecoded, p_value=FORGERY_LEVEL / 2)).passed


def mlp_mask(density: float = 0.3, seed: int = 0) -> tuple[Mask, dict[str, torch.Tensor]]:
    """A random-init MLP whose 2-D weights are magnitude-pruned to ``density``: linear hosts only."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 128), torch.nn.ReLU(),
        torch.nn.Linear(128, 10),
    )
    weights = state_copy(model)
    names = [n for n, t in weights.items() if t.dim() == 2]
    return magnitude_prune(weights, Mask.ones_like(weights, names), 1 - density), weights


def test_code_in_a_linear_layer_decodes_after_20pct_magnitude_pruning_once_its_weights_are_raised() -> None:
    mask, weights = mlp_mask()
    new, signature, _ = scheme.embed_signature(mask, weights, weights, PAYLOAD)
    region = signature.regions[0]
    assert new[region.layer].dim() == 2 and new.kept() == mask.kept()
    assert scheme.Signature.from_json(json.loads(json.dumps(signature.to_json()))) == signature
    signed = masked(weights, new)
    assert scheme.extract(signed, signature).decoded.text == PAYLOAD
    # the code switched on pruned, hence small, weights: 20 % pruning takes many of them unless raised
    plain = scheme.extract(masked(signed, magnitude_prune(signed, new, 0.2)), signature)
    raised = scheme.raise_code_weights(signed, new, signature, fraction=0.2)
    kept = scheme.extract(masked(raised, magnitude_prune(raised, new, 0.2)), signature)
    assert plain.match_rate < 0.9
    assert kept.decoded.text == PAYLOAD and kept.match_rate == 1.0
    changed = [n for n in signed if not torch.equal(signed[n], raised[n])]
    assert changed == [region.layer] and torch.equal(raised[region.layer] != 0, signed[region.layer] != 0)
    with pytest.raises(InputError, match="margin"):
        scheme.raise_code_weights(signed, new, signature, margin=0.5)


def code_mask(mask: dict[str, torch.Tensor], layer: str, row: int, col: int, code: qr.QrCode) -> Mask:
    """``mask`` with ``code``'s data modules (dark = kept) in ``layer``'s connections at (row, col)."""
    written = {n: t.clone() for n, t in mask.items()}
    rows, cols = (torch.from_numpy(code.data_positions[:, i].astype(np.int64)) for i in (0, 1))
    cells = torch.from_numpy(code.data_modules)
    target = written[layer]
    target[rows + row, cols + col] = cells.view(-1, *([1] * (target.dim() - 2))).expand_as(target[rows, cols])
    return Mask(written)


def test_placement_search_picks_the_cheapest_among_conv_and_linear_hosts() -> None:
    generator = torch.Generator().manual_seed(0)
    base = {
        "conv.weight": torch.rand(48, 40, 3, 3, generator=generator) < 0.1,
        "fc.weight": torch.rand(64, 96, generator=generator) < 0.5,
        "head.weight": torch.rand(10, 64, generator=generator) < 0.5,
    }
    codes = placement.qr_codes(PAYLOAD)
    assert placement.candidate_layers(Mask(base), codes[0].spec.size, 3) == ["conv.weight"]
    assert placement.candidate_layers(Mask(base), codes[0].spec.size) == ["conv.weight", "fc.weight"]
    for layer, row, col in (("fc.weight", 30, 50), ("conv.weight", 5, 9)):
        mask = code_mask(base, layer, row, col, codes[2])
        best = placement.search_placements(mask, codes, weights_per_connection=1)[0]
        assert (best.layer, best.row, best.col, best.mask_pattern, best.changes) == (layer, row, col, 2, 0)
    # multi-weight kernels come first: the conv hosts the code even though the linear layer holds it already
    held_by_linear = code_mask(base, "fc.weight", 30, 50, codes[2])
    assert placement.search_placements(held_by_linear, codes, 1, 3)[0].layer == "conv.weight"
    size = codes[0].spec.size  # 25: conv offsets 24 x 16, linear 40 x 72, the 10-row head none
    assert placement.placement_count(base, size, 1) == 16 * ((48 - size + 1) * (40 - size + 1) + 40 * 72)
