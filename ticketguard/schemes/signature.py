"""Scheme V2 (Algorithm 2, improved): a QR signature written into the (out, in) connectivity of conv layers.

Embedding searches every large-enough conv layer, every offset, the 8 QR mask patterns and the allowed
polarities (kept = dark, the default, or kept = light) for the placement that needs the fewest changes to the
squeezed mask, with one FFT cross-correlation per layer. Only the QR data modules are written; the fixed
patterns follow from version, level and mask pattern and are restored on extraction. Verification reads the
claimed regions back from a suspect's non-zero weights, decodes them, and tests the module match rate against
a random mask of the suspect layer's connection density (corrected for the placement search), so ownership
stays provable after the code no longer decodes.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from scipy.stats import binom

from ticketguard import qr
from ticketguard.data import ImageData
from ticketguard.errors import InputError
from ticketguard.files import atomic_path
from ticketguard.masks import Mask, squeeze
from ticketguard.ticket import Ticket
from ticketguard.training import TrainConfig, state_copy, train
from ticketguard.verify import DEFAULT_ALPHA, Evidence, Verdict

log = logging.getLogger(__name__)

PATTERNS = range(8)
POLARITIES = (True, False)
# kept = dark lets the decoder trust every dark module, since pruning only removes connections; kept = light
# may need fewer changes but turns pruning damage into plain errors (digits ResNet-20: kept = light no longer
# decodes after 5 % magnitude pruning, kept = dark still does after 30 %), so "dark" is the default.
POLARITY_CHOICES = {"any": POLARITIES, "dark": (True,), "light": (False,)}
# With k weights per connection, one-shot magnitude pruning of a fraction f empties the kernel with chance
# about f^k: 3 weights keep ~87 % of the dark modules at f = 0.5, within what the dark-only decoder corrects.
DEFAULT_WEIGHTS_PER_CONNECTION = 3
# Keeping the density exact takes the code's new weights from the rest of the ticket; past this share of it
# the ticket would be gutted rather than signed.
MAX_COMPENSATED_SHARE = 0.25
BLIND_VERSIONS = (1, 2, 3, 4)
_HEADER_BITS = 14  # mode (4) + the longest character count of versions 1-9 (10)


@dataclass(frozen=True)
class Region:
    """Where one copy sits: rows are output channels, columns input channels of ``layer``'s squeezed mask."""

    layer: str
    row: int
    col: int
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Signature:
    """The scheme's part of the owner's claim: payload, QR parameters and the regions holding copies."""

    payload: str
    version: int
    error: str
    mask_pattern: int
    kept_is_dark: bool
    regions: tuple[Region, ...]

    @property
    def spec(self) -> qr.QrSpec:
        return qr.QrSpec(self.version, self.error, self.mask_pattern)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Signature:
        try:
            regions = tuple(
                Region(r["layer"], int(r["row"]), int(r["col"]), tuple(r["shape"])) for r in data["regions"]
            )
            signature = cls(
                str(data["payload"]),
                int(data["version"]),
                str(data["error"]),
                int(data["mask_pattern"]),
                bool(data["kept_is_dark"]),
                regions,
            )
        except (KeyError, TypeError, ValueError) as err:
            raise InputError(f"the claim's signature section is malformed ({err!r})") from None
        if not regions:
            raise InputError("the claim's signature names no region")
        signature.spec  # validates version, level and mask pattern
        return signature


@dataclass(frozen=True)
class Placement:
    """A candidate: layer, offset, QR mask pattern, polarity and the number of (out, in) cells to change."""

    layer: str
    row: int
    col: int
    mask_pattern: int
    kept_is_dark: bool
    changes: int


@dataclass(frozen=True)
class EmbedReport:
    """What embedding changed: cells flipped per copy, weights switched on and off, compensation."""

    changed_cells: int
    weights_added: int
    weights_removed: int
    compensated: int


@dataclass
class Reading:
    """What a suspect's regions show: per-copy and voted data modules, the decode and the match statistics.

    ``p_value`` is corrected for the placement search (``raw_p_value`` times ``placements``, at most 1);
    ``threshold`` is the match rate at which it reaches alpha.
    """

    signature: Signature
    copies: np.ndarray
    voted: np.ndarray
    expected: np.ndarray
    decoded: qr.DecodeResult
    matches: int
    trials: int
    p_value: float
    threshold: float
    densities: list[float]
    raw_p_value: float
    placements: float

    @property
    def match_rate(self) -> float:
        return self.matches / self.trials

    @property
    def mismatch(self) -> bool:
        """A decode that yields another string than the claimed one is never a match."""
        return self.decoded.text is not None and self.decoded.text != self.signature.payload


def qr_codes(payload: str, *, error: str = "H", version: int | None = None) -> list[qr.QrCode]:
    """The payload's code under each of the 8 mask patterns at one version (default: smallest fitting)."""
    version = version or qr.make_qr(payload, error=error).spec.version
    return [qr.make_qr(payload, error=error, version=version, mask_pattern=m) for m in PATTERNS]


def candidate_layers(mask: Mask, size: int, weights_per_connection: int = 1) -> list[str]:
    """Conv layers whose squeezed (out, in) map holds a size x size code; InputError when none does.

    Layers whose kernels hold at least ``weights_per_connection`` weights come first: only they can make a
    connection robust to pruning (a 1x1 kernel has one weight), so the others are used only when none fits.
    """
    convs = [name for name, t in mask.items() if t.dim() == 4]
    layers = [name for name in convs if min(mask[name].shape[:2]) >= size]
    if not layers:
        largest = max((min(mask[n].shape[:2]) for n in convs), default=0)
        raise InputError(
            f"the QR code needs a conv layer with at least {size} input and output channels, but the largest "
            f"has {largest}; use a shorter signature, a lower error level or a wider model"
        )
    robust = [name for name in layers if mask[name][0, 0].numel() >= weights_per_connection]
    return robust or layers


def _templates(codes: Sequence[qr.QrCode]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per pattern, template T_m = P - 2 D_m (P: data positions, D_m: dark data modules) and sum D_m."""
    size = codes[0].spec.size
    positions = torch.from_numpy(codes[0].data_positions.astype(np.int64))
    dark = torch.from_numpy(np.stack([code.data_modules for code in codes])).float()
    templates = torch.zeros(len(codes), size, size)
    templates[:, positions[:, 0], positions[:, 1]] = 1.0 - 2.0 * dark
    return templates, dark.sum(dim=1)


def placement_costs(
    squeezed: torch.Tensor,
    codes: Sequence[qr.QrCode],
    spectra: dict[tuple[int, int], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Cells to change for kept = dark at every offset, (8 patterns, rows, cols), from one FFT correlation.

    With S the squeezed map, P the data positions and D the dark data modules, changes(kept = dark) =
    sum D + sum S (P - 2 D) over the code, and changes(kept = light) = n - changes(kept = dark), so one
    cross-correlation of S with the 8 templates P - 2 D scores every offset and pattern (float32 is exact
    after rounding: every sum is a small integer). ``spectra`` caches template spectra per layer shape.
    """
    templates, dark_count = _templates(codes)
    size = templates.shape[-1]
    rows, cols = squeezed.shape
    spectra = {} if spectra is None else spectra
    if (rows, cols) not in spectra:
        spectra[rows, cols] = torch.fft.rfft2(templates, s=(rows, cols)).conj()
    signal = torch.fft.rfft2(squeezed.float())
    sums = torch.fft.irfft2(signal * spectra[rows, cols], s=(rows, cols))[
        :, : rows - size + 1, : cols - size + 1
    ]
    return (sums + dark_count.view(-1, 1, 1)).round_()


def search_placements(
    mask: Mask,
    codes: Sequence[qr.QrCode],
    copies: int = 1,
    weights_per_connection: int = 1,
    polarity: str = "dark",
) -> list[Placement]:
    """The cheapest placements of ``copies`` copies in distinct layers sharing one mask pattern and polarity
    (``polarity``: any, dark or light, the colour that kept connections take)."""
    if polarity not in POLARITY_CHOICES:
        raise InputError(f"polarity must be one of {', '.join(POLARITY_CHOICES)}, got {polarity!r}")
    layers = candidate_layers(mask, codes[0].spec.size, weights_per_connection)
    if copies > len(layers):
        raise InputError(
            f"{copies} copies need {copies} conv layers large enough for the code, but only "
            f"{len(layers)} are; use --copies {len(layers)} or fewer"
        )
    n_modules = len(codes[0].data_positions)
    best_cost, best_offset, spectra = [], [], {}
    for name in layers:
        as_dark = placement_costs(squeeze(mask[name].cpu()), codes, spectra).flatten(1)
        fewest, at_fewest = as_dark.min(dim=1)
        most, at_most = as_dark.max(dim=1)
        best_cost.append(torch.stack([fewest, n_modules - most], dim=1))
        best_offset.append(torch.stack([at_fewest, at_most], dim=1))
    cost = torch.stack(best_cost)  # (layers, 8 patterns, 2 polarities)
    chosen_cost, chosen_layers = cost.topk(copies, dim=0, largest=False)
    total = chosen_cost.sum(dim=0)
    allowed = torch.tensor([kept_is_dark in POLARITY_CHOICES[polarity] for kept_is_dark in POLARITIES])
    pattern, column = divmod(int(torch.where(allowed, total, torch.inf).argmin()), 2)
    size = codes[0].spec.size
    placements = []
    for index in chosen_layers[:, pattern, column].tolist():
        name = layers[index]
        row, col = divmod(int(best_offset[index][pattern, column]), mask[name].shape[1] - size + 1)
        placements.append(
            Placement(name, row, col, pattern, POLARITIES[column], int(cost[index, pattern, column]))
        )
    return placements


def _region_cells(placement: Placement | Region, positions: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    rows = torch.from_numpy(positions[:, 0].astype(np.int64)) + placement.row
    cols = torch.from_numpy(positions[:, 1].astype(np.int64)) + placement.col
    return rows, cols


def _write_code(
    layer_mask: torch.Tensor,
    rewind: torch.Tensor,
    placement: Placement,
    code: qr.QrCode,
    weights_per_connection: int,
) -> torch.Tensor:
    """The layer mask with the code written: wanted connections get their k strongest rewind weights (kept
    weights first), unwanted ones are emptied."""
    rows, cols = _region_cells(placement, code.data_positions)
    wanted = torch.from_numpy(code.data_modules == placement.kept_is_dark)
    kernels = layer_mask[rows, cols].flatten(1)
    score = rewind[rows, cols].flatten(1).abs().float() + kernels.float() * (1 + rewind.abs().max().float())
    k = min(weights_per_connection, kernels.shape[1])
    strongest = torch.zeros_like(kernels)
    strongest.scatter_(1, score.topk(k, dim=1).indices, True)
    written = torch.where(wanted[:, None], kernels | strongest, torch.zeros_like(kernels))
    result = layer_mask.clone()
    result[rows, cols] = written.view_as(layer_mask[rows, cols])
    return result


def _compensate(
    mask: dict[str, torch.Tensor],
    protected: dict[str, torch.Tensor],
    surplus: int,
    weights: Mapping[str, torch.Tensor],
    rewind: Mapping[str, torch.Tensor],
) -> None:
    """Restore the kept count outside the code regions: drop the weakest trained weights when the code added
    weights, switch on the strongest rewind weights when it removed some."""
    names = list(mask)
    kept = torch.cat([mask[n].flatten() for n in names])
    free = ~torch.cat([protected[n].flatten() for n in names])
    candidates = free & (kept if surplus > 0 else ~kept)
    if int(candidates.sum()) < abs(surplus):
        raise InputError(
            "the model has too few weights outside the code regions to keep the density unchanged; "
            "use fewer copies or a larger model"
        )
    if surplus > MAX_COMPENSATED_SHARE * int(candidates.sum()):
        raise InputError(
            f"the code needs {surplus} more kept weights, and taking them from the other "
            f"{int(candidates.sum())} would remove {100 * surplus / int(candidates.sum()):.0f} % of the "
            f"ticket (at most {100 * MAX_COMPENSATED_SHARE:.0f} %); embed into a denser ticket, or use "
            "--weights-per-connection 1 or a shorter signature"
        )
    source = weights if surplus > 0 else rewind
    magnitude = torch.cat([source[n].detach().abs().float().flatten() for n in names])
    if surplus > 0:
        flip = torch.where(candidates, magnitude, torch.inf).topk(surplus, largest=False).indices
    else:
        flip = torch.where(candidates, magnitude, -torch.inf).topk(-surplus).indices
    kept[flip] = ~kept[flip]
    start = 0
    for name in names:
        size = mask[name].numel()
        mask[name] = kept[start : start + size].view_as(mask[name])
        start += size


def embed_signature(
    mask: Mask,
    weights: Mapping[str, torch.Tensor],
    rewind: Mapping[str, torch.Tensor],
    payload: str,
    *,
    error: str = "H",
    version: int | None = None,
    copies: int = 1,
    weights_per_connection: int = DEFAULT_WEIGHTS_PER_CONNECTION,
    polarity: str = "dark",
) -> tuple[Mask, Signature, EmbedReport]:
    """ME(M0, s): the mask with the code in the cheapest regions and exactly as many kept weights."""
    if copies < 1 or weights_per_connection < 1:
        raise InputError(
            f"copies and weights per connection must be >= 1, got {copies} and {weights_per_connection}"
        )
    codes = qr_codes(payload, error=error, version=version)
    placements = search_placements(mask, codes, copies, weights_per_connection, polarity)
    code = codes[placements[0].mask_pattern]
    size = code.spec.size
    new = {name: t.cpu().clone() for name, t in mask.items()}
    protected = {name: torch.zeros_like(t) for name, t in new.items()}
    for placement in placements:
        new[placement.layer] = _write_code(
            new[placement.layer], rewind[placement.layer].cpu(), placement, code, weights_per_connection
        )
        protected[placement.layer][
            placement.row : placement.row + size, placement.col : placement.col + size
        ] = True
    added = sum(int((new[n] & ~mask[n].cpu()).sum()) for n in new)
    removed = sum(int((mask[n].cpu() & ~new[n]).sum()) for n in new)
    _compensate(new, protected, added - removed, weights, rewind)
    result = Mask(new)
    regions = tuple(Region(p.layer, p.row, p.col, tuple(mask[p.layer].shape)) for p in placements)
    signature = Signature(
        payload,
        code.spec.version,
        code.spec.error,
        code.spec.mask_pattern,
        placements[0].kept_is_dark,
        regions,
    )
    report = EmbedReport(sum(p.changes for p in placements), added, removed, abs(added - removed))
    return result, signature, report


def protect_ticket(
    ticket: Ticket,
    payload: str,
    data: ImageData,
    config: TrainConfig,
    *,
    error: str = "H",
    version: int | None = None,
    copies: int = 1,
    weights_per_connection: int = DEFAULT_WEIGHTS_PER_CONNECTION,
    polarity: str = "dark",
    device: torch.device | None = None,
) -> tuple[Ticket, Signature, EmbedReport]:
    """Alg. 2: embed the signature into the ticket's mask, then WE: retrain from W_k with the new mask."""
    mask, signature, report = embed_signature(
        ticket.mask,
        ticket.weights,
        ticket.rewind,
        payload,
        error=error,
        version=version,
        copies=copies,
        weights_per_connection=weights_per_connection,
        polarity=polarity,
    )
    model = ticket.build_model("rewind").to(device or torch.device("cpu"))
    result = train(model, data, config, mask, description="retrain with signature")
    weights = state_copy(model)
    protected = Ticket(
        ticket.architecture,
        ticket.in_channels,
        ticket.num_classes,
        ticket.input_size,
        ticket.dataset,
        ticket.classes,
        mask,
        ticket.rewind,
        weights,
        result.accuracy,
        dict(ticket.metadata),
    )
    return protected, signature, report


def _squeezed_kept(weights: Mapping[str, torch.Tensor], region: Region) -> torch.Tensor:
    """The suspect's (out, in) connectivity in the claimed layer: a weight is kept if it is non-zero."""
    if region.layer not in weights:
        raise InputError(f"the claim names layer {region.layer!r}, which the suspect does not have")
    tensor = weights[region.layer]
    if tuple(tensor.shape) != tuple(region.shape):
        raise InputError(
            f"the claim expects layer {region.layer!r} with shape {tuple(region.shape)}, but the "
            f"suspect's has shape {tuple(tensor.shape)}"
        )
    return squeeze(tensor.detach().cpu() != 0)


def read_region(
    squeezed: torch.Tensor, region: Region | Placement, spec: qr.QrSpec, kept_is_dark: bool
) -> np.ndarray:
    """The data modules (True = dark) that a region of a squeezed mask shows."""
    rows, cols = _region_cells(region, qr.data_positions(spec))
    if rows.max() >= squeezed.shape[0] or cols.max() >= squeezed.shape[1]:
        raise InputError(
            f"the claimed region at ({region.row}, {region.col}) does not fit the layer's "
            f"{tuple(squeezed.shape)} channels"
        )
    kept = squeezed[rows, cols].numpy()
    return kept if kept_is_dark else ~kept


def match_p_value(
    matches: int, dark: Sequence[int], light: Sequence[int], densities: Sequence[float]
) -> tuple[float, np.ndarray]:
    """P(matches >= observed) for random masks: per copy, dark modules match with chance q (the layer's
    connection density) and light ones with 1 - q; returns the p-value and the tail P(X >= m) for every m."""
    pmf = np.ones(1)
    for n_dark, n_light, q in zip(dark, light, densities):
        pmf = np.convolve(pmf, binom.pmf(np.arange(n_dark + 1), n_dark, q))
        pmf = np.convolve(pmf, binom.pmf(np.arange(n_light + 1), n_light, 1 - q))
    tail = np.minimum(np.cumsum(pmf[::-1])[::-1], 1.0)
    return float(tail[matches]), tail


def extract(
    weights: Mapping[str, torch.Tensor], signature: Signature, alpha: float = DEFAULT_ALPHA
) -> Reading:
    """Read every claimed copy, vote module by module, decode, and test the match rate against chance.

    Pruning only removes connections, so a connection kept in any copy was written as kept: the vote keeps a
    module if any copy keeps it, and flags modules where copies disagree as unreliable for the mixed-damage
    retry.
    """
    spec = signature.spec
    code = qr.make_qr(
        signature.payload, error=spec.error, version=spec.version, mask_pattern=spec.mask_pattern
    )
    expected = code.data_modules
    squeezed = [_squeezed_kept(weights, region) for region in signature.regions]
    kept = np.stack([read_region(s, r, spec, True) for s, r in zip(squeezed, signature.regions)])
    copies = kept if signature.kept_is_dark else ~kept
    voted = kept.any(axis=0) if signature.kept_is_dark else ~kept.any(axis=0)
    disagree = kept.any(axis=0) != kept.all(axis=0)
    decoded = decode_modules(spec, voted, signature.kept_is_dark, disagree)
    densities = [float(s.float().mean()) for s in squeezed]
    wanted_kept = expected == signature.kept_is_dark
    n_wanted = int(wanted_kept.sum())
    matches = int((copies == expected).sum())
    raw_p_value, tail = match_p_value(
        matches, [n_wanted] * len(squeezed), [len(expected) - n_wanted] * len(squeezed), densities
    )
    placements = placement_count(weights, spec.size, len(signature.regions))
    corrected = np.minimum(tail * placements, 1.0)
    needed = int(np.argmax(corrected <= alpha)) if (corrected <= alpha).any() else len(tail)
    return Reading(
        signature,
        copies,
        voted,
        expected,
        decoded,
        matches,
        copies.size,
        float(corrected[matches]),
        needed / copies.size,
        densities,
        raw_p_value,
        placements,
    )


def placement_count(weights: Mapping[str, torch.Tensor], size: int, copies: int) -> float:
    """Bonferroni factor for the placement search: 16 pattern/polarity choices times the offsets of every
    large-enough conv layer, per copy. The owner picked the region that already fitted the mask best, and a
    forger would search the same space, so the match p-value is multiplied by this count."""
    offsets = sum(
        (t.shape[0] - size + 1) * (t.shape[1] - size + 1)
        for t in weights.values()
        if t.dim() == 4 and min(t.shape[:2]) >= size
    )
    return float(len(PATTERNS) * len(POLARITIES) * max(offsets, 1) ** copies)


def decode_modules(
    spec: qr.QrSpec, modules: np.ndarray, kept_is_dark: bool, unreliable: np.ndarray | None = None
) -> qr.DecodeResult:
    """Decode; when kept = dark, pruning only turns dark modules light, so try that model first."""
    if kept_is_dark:
        found = qr.decode(spec, modules)
        if found.text is not None:
            return found
    return qr.decode(spec, modules, erasures=unreliable, dark_only_lost=False)


def evidence(reading: Reading, alpha: float = DEFAULT_ALPHA) -> Evidence:
    """V(...) for V2: the match rate with its search-corrected binomial p-value; a decode of another string
    never passes."""
    return Evidence(
        name="qr-signature",
        score=reading.match_rate,
        threshold=reading.threshold,
        passed=reading.p_value <= alpha and not reading.mismatch,
        p_value=reading.p_value,
        details={
            "decoded": reading.decoded.text,
            "decode_method": reading.decoded.method,
            "claimed": reading.signature.payload,
            "decodes_to_claim": reading.decoded.text == reading.signature.payload,
            "mismatch": reading.mismatch,
            "matches": reading.matches,
            "uncorrected_p_value": reading.raw_p_value,
            "placements_searched": reading.placements,
            "modules": reading.trials,
            "layer_densities": reading.densities,
            "regions": [asdict(r) for r in reading.signature.regions],
        },
    )


def verify(
    weights: Mapping[str, torch.Tensor], signature: Signature, alpha: float = DEFAULT_ALPHA
) -> tuple[Verdict, Reading]:
    reading = extract(weights, signature, alpha)
    return Verdict((evidence(reading, alpha),), alpha), reading


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


def save_comparison_image(path: str | Path, reading: Reading) -> None:
    """PNG of the extracted code (voted, fixed patterns restored; modules that differ in red) next to the
    expected one."""
    spec = reading.signature.spec
    figure = Figure(figsize=(6, 3.2))
    expected = np.pad(qr.assemble(spec, reading.expected), 2)
    extracted = np.pad(qr.assemble(spec, reading.voted), 2)
    red = np.array([0.85, 0.1, 0.1])
    panels = (("extracted", extracted, extracted != expected), ("expected", expected, np.zeros_like(expected)))
    for index, (title, modules, wrong) in enumerate(panels, start=1):
        image = np.where(modules[..., None], 0.0, 1.0) * np.ones(3)
        image[wrong] = red
        axes = figure.add_subplot(1, 2, index)
        axes.imshow(image, interpolation="nearest")
        axes.set_title(title)
        axes.set_axis_off()
    decoded = reading.decoded.text if reading.decoded.text is not None else "no decode"
    figure.suptitle(f"{decoded!s} | match {100 * reading.match_rate:.1f} % | p = {reading.p_value:.2g}")
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=120)
    log.info("wrote %s", path)
