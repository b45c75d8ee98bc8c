"""Scheme V2 without a claim: scan every host layer (conv kernels squeezed, 2-D weights as they are), offset,
QR mask pattern and polarity for a code that decodes.

Four stages, cheapest first. The 14 header bits (mode and character count) of every offset are packed into
one integer map per layer and version, so one table lookup per mask pattern and polarity checks all offsets.
The few plausible offsets get their whole data bit stream gathered at once and must show most of the
terminator and pad codewords (0xEC, 0x11) that their header predicts. Their first Reed-Solomon block must then
be correctable (Berlekamp-Massey and a Chien search, batched over offsets in GF(256)). Only those reach the
full decoder. A time budget ends the scan early with a result that says what was scanned and what was not.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from functools import cache
from typing import Any

import numpy as np
import reedsolo
import torch
from rich.progress import Progress

from ticketguard.core.errors import InputError
from ticketguard.core.threads import one_intra_op_thread
from ticketguard.schemes import qr
from ticketguard.schemes.placement import PATTERNS, POLARITIES, connections, is_host
from ticketguard.schemes.signature import Region, read_region

log = logging.getLogger(__name__)

BLIND_VERSIONS = (1, 2, 3, 4)
# A ResNet-50 takes about 35 s on two CPU cores (benchmarks/blind_scan_speed.py); a far larger model still
# answers within this, saying what it left out.
DEFAULT_BUDGET_S = 120.0
_HEADER_BITS = 14  # mode (4) + the longest character count of versions 1-9 (10)
_COUNT_BITS = {1: 10, 2: 9, 4: 8}  # numeric, alphanumeric, byte mode, versions 1-9
_PAD_CODEWORDS = (0xEC, 0x11)
# Random bits match a predicted terminator/pad bit half the time; a code that still decodes (at most about
# 30 % of its codewords wrong, each with a few wrong bits) keeps far more than this share.
TAIL_AGREEMENT = 0.7
_CHUNK = 4096  # candidates whose data bits are gathered at once: bounds memory on dense, wide layers


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


@dataclass(frozen=True)
class BlindScan:
    """What a blind scan found and how far it got: every (layer, QR version) in ``scanned`` was searched at
    every offset, mask pattern and polarity; ``unscanned`` lists those the time budget left out (empty when
    complete)."""

    found: tuple[Found, ...]
    scanned: tuple[tuple[str, int], ...]
    unscanned: tuple[tuple[str, int], ...]
    seconds: float
    budget_s: float | None

    @property
    def complete(self) -> bool:
        return not self.unscanned

    def summary(self) -> str:
        """One sentence for the user: what was scanned, what was found, and what the budget left out."""
        layers = len({layer for layer, _ in self.scanned + self.unscanned})
        total = len(self.scanned) + len(self.unscanned)
        text = (f"scanned {len(self.scanned)} of {total} (layer, QR version) pairs over {layers} layers in "
                f"{self.seconds:.1f} s, found {len(self.found)} code(s)")
        if self.complete:
            return text
        missing = ", ".join(f"{layer} v{version}" for layer, version in self.unscanned[:5])
        more = f" and {len(self.unscanned) - 5} more" if len(self.unscanned) > 5 else ""
        return (f"{text}; the {self.budget_s:g} s budget ended before {missing}{more}: raise the budget, or "
                "limit the QR versions, to scan them")

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "complete": self.complete}


def _used_bits(n_bits: int) -> np.ndarray:
    """Per 14-bit header value: the bits its segment fills (mode, count, characters), -1 if implausible."""
    value = np.arange(1 << _HEADER_BITS)
    mode = value >> (_HEADER_BITS - 4)
    used = np.full(value.shape, -1)
    for mode_value, count_bits in _COUNT_BITS.items():
        count = (value >> (_HEADER_BITS - 4 - count_bits)) & ((1 << count_bits) - 1)
        payload = {
            1: 10 * (count // 3) + np.array([0, 4, 7])[count % 3],
            2: 11 * (count // 2) + 6 * (count % 2),
            4: 8 * count,
        }[mode_value]
        total = 4 + count_bits + payload
        used = np.where((mode == mode_value) & (count >= 1) & (total <= n_bits), total, used)
    return used


def _tails(n_bits: int) -> tuple[np.ndarray, np.ndarray]:
    """For each count of used bits u: the bits a QR encoder writes after them (a terminator of up to 4
    zeros, zeros to the byte boundary, then pad codewords 0xEC, 0x11, ...), and which bits that fixes: those
    from u on."""
    expected = np.zeros((n_bits + 1, n_bits), dtype=bool)
    known = np.arange(n_bits)[None, :] >= np.arange(n_bits + 1)[:, None]
    for used in range(n_bits + 1):
        start = 8 * math.ceil(min(used + 4, n_bits) / 8)
        for index, byte_start in enumerate(range(start, n_bits, 8)):
            expected[used, byte_start : byte_start + 8] = np.unpackbits(np.uint8(_PAD_CODEWORDS[index % 2]))
    return expected, known


@dataclass(frozen=True)
class _Layout:
    """Per version and level (the mask pattern moves no bit): (row, col) of every data bit in bit-stream
    order, the header's used-bits table, the predicted tails with their known bits, the (row, col) of the
    first RS block's codeword bits (data then EC) and its number of EC codewords."""

    stream: torch.Tensor
    used: torch.Tensor
    expected: torch.Tensor
    known: torch.Tensor
    block: np.ndarray
    ec_len: int


@cache
def _layout(version: int, error: str) -> _Layout:
    spec = qr.QrSpec(version, error, 0)
    order = qr.data_codeword_order(spec)
    bits = np.arange(8 * len(order))
    positions = qr.data_positions(spec)
    expected, known = _tails(len(bits))
    ec_len, blocks = qr.block_layout(version, error)
    return _Layout(
        torch.from_numpy(positions[8 * order[bits // 8] + bits % 8].astype(np.int64)),
        torch.from_numpy(_used_bits(len(bits))),
        torch.from_numpy(expected),
        torch.from_numpy(known),
        positions[(8 * blocks[0][:, None] + np.arange(8)).ravel()].astype(np.int64),
        ec_len,
    )


# QR's GF(256) (polynomial 0x11D, generator 2) as reedsolo builds it; exp runs to 2 x 255 so that a product
# of two elements needs no modulo
_LOG, _EXP = (np.array(table, dtype=np.int64) for table in reedsolo.init_tables(prim=0x11D, generator=2)[:2])


def _gf_mul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.where((a == 0) | (b == 0), 0, _EXP[_LOG[a] + _LOG[b]])


def _correctable(codewords: np.ndarray, ec_len: int) -> np.ndarray:
    """Which RS blocks (one per row, data then EC codewords) lie within ec_len // 2 errors of a codeword: the
    error locator that Berlekamp-Massey finds has degree L <= ec_len // 2 and exactly L roots at the block's
    positions. A necessary condition for the decoder (which also bounds miscorrections), batched over rows."""
    rows, n = codewords.shape
    powers = (np.arange(ec_len)[:, None] * np.arange(n - 1, -1, -1)[None, :]) % 255
    terms = np.where(codewords[:, None, :] == 0, 0, _EXP[(_LOG[codewords][:, None, :] + powers) % 255])
    syndromes = np.bitwise_xor.reduce(terms, axis=2)
    locator = np.zeros((rows, ec_len + 1), dtype=np.int64)
    locator[:, 0] = 1
    previous, degree = locator.copy(), np.zeros(rows, dtype=np.int64)
    gap, last = np.ones(rows, dtype=np.int64), np.ones(rows, dtype=np.int64)
    shift = np.arange(ec_len + 1)[None, :]
    for step in range(ec_len):
        discrepancy = np.bitwise_xor.reduce(_gf_mul(locator[:, : step + 1], syndromes[:, step::-1]), axis=1)
        factor = np.where(discrepancy == 0, 0, _EXP[(_LOG[discrepancy] - _LOG[last]) % 255])
        source = shift - gap[:, None]
        moved = np.where(source >= 0, np.take_along_axis(previous, source.clip(min=0), axis=1), 0)
        updated = locator ^ _gf_mul(factor[:, None], moved)
        grow = (discrepancy != 0) & (2 * degree <= step)
        previous = np.where(grow[:, None], locator, previous)
        last = np.where(grow, discrepancy, last)
        degree = np.where(grow, step + 1 - degree, degree)
        gap = np.where(grow, 1, gap + 1)
        locator = updated
    exponents = (-np.arange(n - 1, -1, -1)[:, None] * np.arange(ec_len + 1)[None, :]) % 255
    values = np.where(locator[:, None, :] == 0, 0, _EXP[(_LOG[locator][:, None, :] + exponents) % 255])
    roots = (np.bitwise_xor.reduce(values, axis=2) == 0).sum(axis=1)
    return (degree <= ec_len // 2) & (roots == degree)


def blind_scan(
    weights: Mapping[str, torch.Tensor],
    versions: Sequence[int] = BLIND_VERSIONS,
    error: str = "H",
    *,
    budget_s: float | None = DEFAULT_BUDGET_S,
    progress: Progress | None = None,
) -> BlindScan:
    """Scan every conv and 2-D layer, offset, mask pattern and polarity for a code that decodes (no claim
    needed), smallest QR version first, until done or ``budget_s`` seconds (None: no limit) have passed.

    Damaged codes whose header was hit are missed: the claim-based check covers those.
    """
    if any(not 1 <= v <= 9 for v in versions):
        raise InputError(f"the blind scan covers QR versions 1 to 9, got {list(versions)}")
    if budget_s is not None and not budget_s > 0:
        raise InputError(f"the blind scan's time budget must be a positive number of seconds, got {budget_s}")
    started = time.perf_counter()
    deadline = math.inf if budget_s is None else started + budget_s
    maps = _connection_maps(weights)
    units = [(n, v) for v in sorted(set(versions)) for n, m in maps.items() if min(m.shape) >= 17 + 4 * v]
    task = progress.add_task("blind QR scan", total=len(units), status="") if progress is not None else None
    found: list[Found] = []
    scanned: list[tuple[str, int]] = []
    with one_intra_op_thread():
        for name, version in units:
            if progress is not None:
                progress.update(task, status=f"{name} v{version}")
            hits, finished = _scan_layer(name, maps[name], version, error, deadline)
            found += hits
            if not finished:
                break
            scanned.append((name, version))
            if progress is not None:
                progress.advance(task)
    unscanned = tuple(units[len(scanned) :])
    return BlindScan(tuple(found), tuple(scanned), unscanned, time.perf_counter() - started, budget_s)


def _connection_maps(weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """(out, in) connection maps of the float host layers; a layer with nothing pruned (or nothing kept) can
    hold no code, since a code needs both colours."""
    maps = {}
    for name, tensor in weights.items():
        if is_host(tensor) and tensor.is_floating_point():
            connected = connections(tensor.detach().cpu() != 0)
            if 0 < int(connected.sum()) < connected.numel():
                maps[name] = connected
    return maps


def _scan_layer(
    name: str, connected: torch.Tensor, version: int, error: str, deadline: float
) -> tuple[list[Found], bool]:
    """Codes of one version in one layer, and whether the layer was scanned before the deadline."""
    layout = _layout(version, error)
    size = 17 + 4 * version
    rows, cols = connected.shape[0] - size + 1, connected.shape[1] - size + 1
    header = torch.zeros(rows, cols, dtype=torch.int64)
    for bit, (row, col) in enumerate(layout.stream[:_HEADER_BITS].tolist()):
        header |= connected[row : row + rows, col : col + cols].long() << (_HEADER_BITS - 1 - bit)
    all_ones = (1 << _HEADER_BITS) - 1
    hits = []
    for pattern in PATTERNS:
        stream_flips = torch.from_numpy(qr.MASK_PATTERNS[pattern](*layout.stream.T.numpy()))
        block_flips = qr.MASK_PATTERNS[pattern](*layout.block.T)
        key = int((stream_flips[:_HEADER_BITS].long() << torch.arange(_HEADER_BITS - 1, -1, -1)).sum())
        for kept_is_dark in POLARITIES:
            values = header ^ (key if kept_is_dark else key ^ all_ones)
            offsets = (layout.used[values] >= 0).nonzero()
            for chunk in offsets.split(_CHUNK):
                tails = _tail_survivors(connected, chunk, layout, stream_flips != (not kept_is_dark), values)
                survivors = _block_survivors(connected, tails, layout, block_flips != (not kept_is_dark))
                for row, col in survivors.tolist():
                    if time.perf_counter() > deadline:
                        return hits, False
                    spec = qr.QrSpec(version, error, pattern)
                    modules = read_region(connected, Region(name, row, col, tuple(connected.shape)), spec,
                                          kept_is_dark)
                    result = qr.decode(spec, modules, dark_only_lost=False)
                    if result.text is not None:
                        hits.append(
                            Found(name, row, col, version, pattern, kept_is_dark, result.text, result.method)
                        )
            if time.perf_counter() > deadline:
                return hits, False
    return hits, True


def _tail_survivors(
    connected: torch.Tensor, offsets: torch.Tensor, layout: _Layout, flips: torch.Tensor, values: torch.Tensor
) -> torch.Tensor:
    """The offsets whose data bits (kept XOR ``flips``) show at least TAIL_AGREEMENT of the terminator and pad
    bits that their header ``values`` predict; offsets whose header leaves no room for a tail all pass."""
    row, col = offsets[:, 0], offsets[:, 1]
    bits = connected[row[:, None] + layout.stream[:, 0], col[:, None] + layout.stream[:, 1]] ^ flips
    fills = layout.used[values[row, col]]
    fixed = layout.known[fills]
    agree = ((bits == layout.expected[fills]) & fixed).sum(dim=1)
    return offsets[agree >= TAIL_AGREEMENT * fixed.sum(dim=1)]


def _block_survivors(
    connected: torch.Tensor, offsets: torch.Tensor, layout: _Layout, flips: np.ndarray
) -> torch.Tensor:
    """The offsets whose first RS block (bits: kept XOR ``flips``) lies within correcting distance of a
    codeword."""
    if len(offsets) == 0:
        return offsets
    grid = connected.numpy()
    row, col = offsets[:, 0].numpy(), offsets[:, 1].numpy()
    bits = grid[row[:, None] + layout.block[:, 0], col[:, None] + layout.block[:, 1]] ^ flips
    codewords = np.packbits(bits.reshape(len(offsets), -1, 8), axis=2)[:, :, 0].astype(np.int64)
    return offsets[torch.from_numpy(_correctable(codewords, layout.ec_len))]
