"""Blind V2 scan: codes found without a claim in conv and linear hosts, within a budget, with progress."""

from __future__ import annotations

import pytest
import torch
from rich.progress import Progress, TextColumn
from test_signature import PAYLOAD, masked, mlp_mask, random_mask

from ticketguard.core.errors import InputError
from ticketguard.schemes import signature as scheme
from ticketguard.schemes.blind_scan import blind_scan


def test_finds_a_code_in_a_linear_layer_without_a_claim() -> None:
    mask, weights = mlp_mask()
    new, signature, _ = scheme.embed_signature(mask, weights, weights, PAYLOAD)
    scan = blind_scan(masked(weights, new))
    region = signature.regions[0]
    assert scan.complete and [(f.layer, f.row, f.col, f.text) for f in scan.found] == [
        (region.layer, region.row, region.col, PAYLOAD)
    ]
    assert not blind_scan(masked(weights, mask)).found


def test_budget_ends_the_scan_and_says_what_it_left_out() -> None:
    mask, weights = random_mask("resnet20", 0.2)
    new, _, _ = scheme.embed_signature(mask, weights, weights, PAYLOAD)
    suspect = masked(weights, new)
    full = blind_scan(suspect, budget_s=None)
    cut = blind_scan(suspect, budget_s=1e-9)
    assert full.complete and [f.text for f in full.found] == [PAYLOAD]
    assert not cut.complete and cut.scanned + cut.unscanned == full.scanned
    assert "budget ended before" in cut.summary() and cut.to_json()["complete"] is False
    with pytest.raises(InputError, match="budget"):
        blind_scan(suspect, budget_s=0)


def test_progress_counts_every_layer_and_version() -> None:
    mask, weights = random_mask("resnet20", 0.2)
    with Progress(TextColumn("{task.fields[status]}"), disable=True) as progress:
        scan = blind_scan(masked(weights, mask), versions=(1, 2), progress=progress)
    task = progress.tasks[0]
    assert task.total == task.completed == len(scan.scanned) > 0


def test_dense_and_empty_layers_are_not_scanned() -> None:
    dense = {"fc.weight": torch.ones(64, 64), "empty.weight": torch.zeros(64, 64, 3, 3)}
    scan = blind_scan(dense)
    assert scan.complete and scan.scanned == () and scan.found == ()
