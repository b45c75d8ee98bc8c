"""Scheme V2 without a claim: scan every conv layer, offset, QR mask pattern and polarity for a code that decodes.

A vectorised header check (mode and length plausible) over all offsets picks the few candidates worth a full
decode, so the scan ends in bounded time even on wide layers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ticketguard import qr
from ticketguard.errors import InputError
from ticketguard.masks import squeeze
from ticketguard.schemes.placement import PATTERNS, POLARITIES
from ticketguard.schemes.signature import Region, read_region

BLIND_VERSIONS = (1, 2, 3, 4)
_HEADER_BITS = 14  # mode (4) + the longest character count of versions 1-9 (10)


@dataclass(frozen=True)
class Found:
    """A code found without a claim: where, with which QR parameters, and its text."""

    layer: str
    row: int
    col: int
    version: int
    mask_pattern: int
    kept_is_dark: bool
    text: str
    method: str


def _header_positions(spec: qr.QrSpec) -> np.ndarray:
    """(row, col) of the first bit-stream bits (mode indicator and character count)."""
    order = qr.data_codeword_order(spec)
    bits = np.arange(_HEADER_BITS)
    return qr.data_positions(spec)[8 * order[bits // 8] + bits % 8]


def _plausible_headers(bits: torch.Tensor, spec: qr.QrSpec) -> torch.Tensor:
    """Offsets whose unmasked header names a known mode with a character count that fits the version."""
    weights = 2 ** torch.arange(_HEADER_BITS - 1, -1, -1)
    value = (bits.long() * weights.view(-1, 1, 1)).sum(dim=0)
    mode = value >> (_HEADER_BITS - 4)
    capacity_bits = 8 * qr.byte_capacity(spec.version, spec.error) + 8  # + mode/count bits byte mode spares
    plausible = torch.zeros_like(value, dtype=torch.bool)
    for mode_value, (count_bits, bits_per_char) in {1: (10, 10 / 3), 2: (9, 5.5), 4: (8, 8.0)}.items():
        count = (value >> (_HEADER_BITS - 4 - count_bits)) & ((1 << count_bits) - 1)
        plausible |= (mode == mode_value) & (count >= 1) & (count * bits_per_char <= capacity_bits)
    return plausible


def blind_extract(
    weights: Mapping[str, torch.Tensor], versions: Sequence[int] = BLIND_VERSIONS, error: str = "H"
) -> list[Found]:
    """Scan every conv layer, offset, mask pattern and polarity for a code that decodes (no claim needed).

    A vectorised header check (mode and length plausible) over all offsets picks the few candidates worth a
    full decode. Damaged codes whose header was hit are missed: the claim-based check covers those.
    """
    if any(not 1 <= v <= 9 for v in versions):
        raise InputError(f"the blind scan covers QR versions 1 to 9, got {list(versions)}")
    found = []
    layers = [n for n, t in weights.items() if t.dim() == 4 and t.is_floating_point()]
    for name in layers:
        squeezed = squeeze(weights[name].detach().cpu() != 0)
        for version in versions:
            size = 17 + 4 * version
            if min(squeezed.shape) < size:
                continue
            found += _scan_layer(name, squeezed, version, error)
    return found


def _scan_layer(name: str, squeezed: torch.Tensor, version: int, error: str) -> list[Found]:
    size = 17 + 4 * version
    rows, cols = squeezed.shape[0] - size + 1, squeezed.shape[1] - size + 1
    hits = []
    for pattern in PATTERNS:
        spec = qr.QrSpec(version, error, pattern)
        header = _header_positions(spec)
        flip = torch.from_numpy(qr.MASK_PATTERNS[pattern](header[:, 0], header[:, 1]))
        shifted = torch.stack([squeezed[r : r + rows, c : c + cols] for r, c in header])
        for kept_is_dark in POLARITIES:
            dark = shifted if kept_is_dark else ~shifted
            plausible = _plausible_headers(dark ^ flip.view(-1, 1, 1), spec)
            for row, col in plausible.nonzero().tolist():
                placement = Region(name, row, col, tuple(squeezed.shape))
                modules = read_region(squeezed, placement, spec, kept_is_dark)
                result = qr.decode(spec, modules, dark_only_lost=False)
                if result.text is not None:
                    hits.append(
                        Found(name, row, col, version, pattern, kept_is_dark, result.text, result.method)
                    )
    return hits
