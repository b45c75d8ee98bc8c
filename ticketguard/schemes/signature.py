"""Scheme V2 (Algorithm 2, improved): a QR signature written into the (out, in) connectivity of a conv layer
or a 2-D weight (linear layers, attention projections).

Embedding searches every large-enough host, every offset, the 8 QR mask patterns and the allowed
polarities (kept = dark, the default, or kept = light) for the placement that needs the fewest changes to the
connection map (conv masks squeezed, 2-D masks as they are), with one FFT cross-correlation per layer. Only
the QR data modules are written; the fixed patterns follow from version, level and mask pattern and are
restored on extraction. Verification reads the claimed regions back from a suspect's non-zero weights, decodes
them, and tests the module match rate against a random mask of the suspect layer's connection density
(corrected for the placement search), so ownership stays provable after the code no longer decodes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ticketguard.core.errors import InputError
from ticketguard.core.evidence import DEFAULT_ALPHA, FORGERY_LEVEL, Evidence
from ticketguard.core.masks import Mask, flatten, unflatten
from ticketguard.core.schema import check_json
from ticketguard.core.stats import match_p_value
from ticketguard.schemes import qr
from ticketguard.schemes.placement import (
    Placement,
    connections,
    placement_count,
    qr_codes,
    search_placements,
)
from ticketguard.schemes.signature_figures import save_comparison_image

if TYPE_CHECKING:  # base.py registers this scheme, so it cannot be imported from here at run time
    from ticketguard.schemes.base import VerifyContext

# With k weights per connection, one-shot magnitude pruning of a fraction f empties the kernel with chance
# about f^k: 3 weights keep ~87 % of the dark modules at f = 0.5, within what the dark-only decoder corrects.
DEFAULT_WEIGHTS_PER_CONNECTION = 3
# Single-weight code connections are raised above what pruning this share of the kept weights would cut
# (benchmarks/linear_signature.py measures the choice).
RAISE_FRACTION = 0.5
RAISE_MARGIN = 1.25
# Keeping the density exact takes the code's new weights from the rest of the ticket; past this share of it
# the ticket would be gutted rather than signed.
MAX_COMPENSATED_SHARE = 0.25
# A claim's copies multiply the placement count (offsets ** copies), which must stay a finite float.
MAX_COPIES = 16
MAX_CHANNELS_PER_LAYER = 1 << 24
SIGNATURE_SCHEMA = {
    "type": "object",
    "required": ["payload", "version", "error", "mask_pattern", "kept_is_dark", "regions"],
    "properties": {
        "payload": {"type": "string", "minLength": 1, "maxLength": 7089},
        "version": {"type": "integer", "minimum": 1, "maximum": 40},
        "error": {"enum": list(qr.ERROR_LEVELS)},
        "mask_pattern": {"type": "integer", "minimum": 0, "maximum": 7},
        "kept_is_dark": {"type": "boolean"},
        "regions": {
            "type": "array",
            "minItems": 1,
            "maxItems": MAX_COPIES,
            "items": {
                "type": "object",
                "required": ["layer", "row", "col", "shape"],
                "properties": {
                    "layer": {"type": "string"},
                    "row": {"type": "integer", "minimum": 0, "maximum": MAX_CHANNELS_PER_LAYER},
                    "col": {"type": "integer", "minimum": 0, "maximum": MAX_CHANNELS_PER_LAYER},
                    "shape": {
                        "type": "array",
                        "items": {"type": "integer", "minimum": 1, "maximum": MAX_CHANNELS_PER_LAYER},
                        "minItems": 2,
                        "maxItems": 4,
                    },
                },
                "additionalProperties": False,
            },
        },
    },
    "additionalProperties": False,
}


@dataclass(frozen=True)
class Region:
    """Where one copy sits: rows are output channels, columns input channels of ``layer``'s connection map."""

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

    def region_cells(self, masks: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per layer of ``masks``, the cells the claimed copies cover (whole kernels in a conv): what an
        alignment must not fit, or the copies' match would count agreement it chose."""
        size = self.spec.size
        cells = {}
        for region in self.regions:
            if region.layer in masks:
                covered = cells.setdefault(region.layer, torch.zeros_like(masks[region.layer], dtype=torch.bool))
                row, col = max(region.row, 0), max(region.col, 0)
                covered[row : row + size, col : col + size] = True
        return cells

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Any) -> Signature:
        """The signature section of a claim, refused unless it fits SIGNATURE_SCHEMA (JSON integers, a boolean
        polarity, a QR version 1..40, offsets >= 0, 1 to MAX_COPIES regions of 2-D to 4-D layers)."""
        check_json(data, SIGNATURE_SCHEMA, "the claim's signature section")
        regions = tuple(Region(r["layer"], r["row"], r["col"], tuple(r["shape"])) for r in data["regions"])
        return cls(
            data["payload"], data["version"], data["error"], data["mask_pattern"], data["kept_is_dark"],
            regions,
        )


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
    ``level`` is the p-value it must reach: alpha when the region decodes to the claimed payload, else the
    stricter forgery level (a forger could search payloads until a match rate alone gets there);
    ``threshold`` is the match rate at which it reaches ``level``.
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
    level: float
    erased: int = 0
    """modules in channels a structurally pruned suspect lacks in every copy: unknown, left out of the test"""

    @property
    def match_rate(self) -> float:
        return self.matches / self.trials

    @property
    def mismatch(self) -> bool:
        """A decode that yields another string than the claimed one is never a match."""
        return self.decoded.text is not None and self.decoded.text != self.signature.payload


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
    weights first), unwanted ones are emptied. A 2-D host's connection is its one weight."""
    rows, cols = _region_cells(placement, code.data_positions)
    wanted = torch.from_numpy(code.data_modules == placement.kept_is_dark)
    kernels = layer_mask[rows, cols].reshape(len(rows), -1)
    score = rewind[rows, cols].reshape(len(rows), -1).abs().float() + kernels.float() * (
        1 + rewind.abs().max().float()
    )
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
    kept = flatten(mask, names)
    free = ~flatten(protected, names)
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
    magnitude = flatten(source, names).detach().abs().float()
    if surplus > 0:
        flip = torch.where(candidates, magnitude, torch.inf).topk(surplus, largest=False).indices
    else:
        flip = torch.where(candidates, magnitude, -torch.inf).topk(-surplus).indices
    kept[flip] = ~kept[flip]
    mask.update(unflatten(kept, mask))


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


def raise_code_weights(
    weights: Mapping[str, torch.Tensor],
    mask: Mask,
    signature: Signature,
    fraction: float = RAISE_FRACTION,
    margin: float = RAISE_MARGIN,
) -> dict[str, torch.Tensor]:
    """The trained weights with every kept code connection that is a single weight (2-D hosts, 1x1 convs)
    raised to ``margin`` times the magnitude that global magnitude pruning of ``fraction`` of the kept weights
    cuts.

    A kernel spreads a connection over several weights that pruning must all remove; a linear layer's
    connection is one weight, so without this its code modules go with the first pruning. Call it after the
    last training, which would otherwise move the raised weights back; signs are kept, and weights already
    larger stay as they are.
    """
    if not 0.0 <= fraction < 1.0 or margin < 1.0:
        raise InputError(
            f"raising needs a pruning fraction in [0, 1) and a margin >= 1, got {fraction} and {margin}"
        )
    kept = mask.kept_values(weights).abs()
    floor = margin * float(kept.kthvalue(max(1, round(fraction * len(kept)))).values)
    positions = qr.data_positions(signature.spec)
    raised = {name: tensor.clone() for name, tensor in weights.items()}
    for region in signature.regions:
        if mask[region.layer][0, 0].numel() != 1:
            continue
        rows, cols = _region_cells(region, positions)
        cells = raised[region.layer][rows, cols]
        sign = torch.where(cells < 0, -1.0, 1.0).to(cells.dtype)
        lifted = torch.where(mask[region.layer][rows, cols], sign * cells.abs().clamp(min=floor), cells)
        raised[region.layer][rows, cols] = lifted
    return raised


def _squeezed_kept(weights: Mapping[str, torch.Tensor], region: Region) -> torch.Tensor:
    """The suspect's (out, in) connectivity in the claimed layer: a weight is kept if it is non-zero (a conv
    connection if any of its kernel weights is)."""
    if region.layer not in weights:
        raise InputError(f"the claim names layer {region.layer!r}, which the suspect does not have")
    tensor = weights[region.layer]
    if tuple(tensor.shape) != tuple(region.shape):
        raise InputError(
            f"the claim expects layer {region.layer!r} with shape {tuple(region.shape)}, but the "
            f"suspect's has shape {tuple(tensor.shape)}"
        )
    return connections(tensor.detach().cpu() != 0)


def read_region(
    squeezed: torch.Tensor, region: Region | Placement, spec: qr.QrSpec, kept_is_dark: bool
) -> np.ndarray:
    """The data modules (True = dark) that a region of a connection map shows."""
    rows, cols = _region_cells(region, qr.data_positions(spec))
    if rows.max() >= squeezed.shape[0] or cols.max() >= squeezed.shape[1]:
        raise InputError(
            f"the claimed region at ({region.row}, {region.col}) does not fit the layer's "
            f"{tuple(squeezed.shape)} channels"
        )
    kept = squeezed[rows, cols].numpy()
    return kept if kept_is_dark else ~kept


def extract(
    weights: Mapping[str, torch.Tensor],
    signature: Signature,
    alpha: float = DEFAULT_ALPHA,
    forgeable: bool = True,
    observed: Mapping[str, torch.Tensor] | None = None,
) -> Reading:
    """Read every claimed copy, vote module by module, decode, and test the match rate against chance.

    ``forgeable``: a forger could have searched payloads after the fact (no trusted time older than the
    suspect), so a match without a decode must reach FORGERY_LEVEL.

    ``observed``: per layer, the cells whose channels a structurally pruned suspect still has. A module in a
    lost channel is unknown, not empty: it joins no vote, is an erasure to the decoder, and the match rate,
    its null and the layer density count observed modules only.

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
    seen = np.stack([_observed_modules(observed, r, spec) for r in signature.regions])
    kept &= seen
    copies = kept if signature.kept_is_dark else ~kept
    voted = kept.any(axis=0) if signature.kept_is_dark else ~kept.any(axis=0)
    erased = ~seen.any(axis=0)
    disagree = (kept.any(axis=0) != (kept | ~seen).all(axis=0)) & ~erased
    decoded = decode_modules(spec, voted, signature.kept_is_dark, disagree | erased)
    densities = [_observed_density(s, observed, r) for s, r in zip(squeezed, signature.regions)]
    wanted_kept = expected == signature.kept_is_dark
    trials = int(seen.sum())
    if trials == 0:
        raise InputError("every module of the claimed regions lies in channels the suspect no longer has")
    matches = int(((copies == expected) & seen).sum())
    raw_p_value, tail = match_p_value(
        matches,
        [int((wanted_kept & observed_here).sum()) for observed_here in seen],
        [int((~wanted_kept & observed_here).sum()) for observed_here in seen],
        densities,
    )
    placements = placement_count(weights, spec.size, len(signature.regions))
    corrected = np.minimum(tail * placements, 1.0)
    level = alpha if decoded.text == signature.payload or not forgeable else min(alpha, FORGERY_LEVEL)
    needed = int(np.argmax(corrected <= level)) if (corrected <= level).any() else len(tail)
    return Reading(
        signature,
        copies,
        voted,
        expected,
        decoded,
        matches,
        trials,
        float(corrected[matches]),
        needed / trials,
        densities,
        raw_p_value,
        placements,
        level,
        int(erased.sum()),
    )


def _observed_modules(
    observed: Mapping[str, torch.Tensor] | None, region: Region, spec: qr.QrSpec
) -> np.ndarray:
    """Which data modules of ``region`` lie in channels the suspect still has (all without ``observed``)."""
    if observed is None or region.layer not in observed:
        return np.ones(len(qr.data_positions(spec)), dtype=bool)
    rows, cols = _region_cells(region, qr.data_positions(spec))
    return connections(observed[region.layer].cpu())[rows, cols].numpy()


def _observed_density(
    squeezed: torch.Tensor, observed: Mapping[str, torch.Tensor] | None, region: Region
) -> float:
    """The connection density of a layer over the cells whose channels the suspect still has."""
    if observed is None or region.layer not in observed:
        return float(squeezed.float().mean())
    return float(squeezed[connections(observed[region.layer].cpu())].float().mean())


def decode_modules(
    spec: qr.QrSpec, modules: np.ndarray, kept_is_dark: bool, unreliable: np.ndarray | None = None
) -> qr.DecodeResult:
    """Decode; when kept = dark, pruning only turns dark modules light, so try that model first."""
    if kept_is_dark:
        found = qr.decode(spec, modules)
        if found.text is not None:
            return found
    return qr.decode(spec, modules, erasures=unreliable, dark_only_lost=False)


def evidence(reading: Reading) -> Evidence:
    """V(...) for V2: the match rate with its search-corrected binomial p-value, judged at the reading's
    level; a decode of another string never passes."""
    return Evidence(
        name="qr-signature",
        score=reading.match_rate,
        threshold=reading.threshold,
        passed=reading.p_value <= reading.level and not reading.mismatch,
        p_value=reading.p_value,
        details={
            "decoded": reading.decoded.text,
            "decode_method": reading.decoded.method,
            "claimed": reading.signature.payload,
            "decodes_to_claim": reading.decoded.text == reading.signature.payload,
            "mismatch": reading.mismatch,
            "matches": reading.matches,
            "uncorrected_p_value": reading.raw_p_value,
            "level": reading.level,
            "placements_searched": reading.placements,
            "modules": reading.trials,
            "modules_erased": reading.erased,
            "voted_modules": "".join("1" if m else "0" for m in reading.voted),
            "layer_densities": reading.densities,
            "regions": [asdict(r) for r in reading.signature.regions],
        },
    )


class SignatureScheme:
    """V2 as a claim-carrying scheme (``ticketguard.schemes.base``): the signature section sits at the claim's top
    level, and its evidence is the match rate of the claimed regions in the suspect's mask as read."""

    claim_key = "signature"
    top_level = True
    evidence_name = "qr-signature"
    description = "a QR signature"
    schema = SIGNATURE_SCHEMA

    def section_to_json(self, section: Signature) -> dict[str, Any]:
        return section.to_json()

    def section_from_json(self, data: Any) -> Signature:
        return Signature.from_json(data)

    def evidence(self, section: Signature, context: VerifyContext) -> Evidence:
        """Read the regions from what the suspect keeps; also draw the code at ``context.qr_image``."""
        reading = extract(
            context.readable, section, context.alpha, not context.trusted_time, context.observed
        )
        found = evidence(reading)
        if context.qr_image is not None:
            save_comparison_image(context.qr_image, reading)
        return found


SIGNATURE_SCHEME = SignatureScheme()
