"""Where V2 puts its code: every large-enough host (a conv layer, squeezed to its (out, in) connections, or a
2-D weight such as a linear layer or an attention projection), offset, QR mask pattern and polarity is scored
with one FFT cross-correlation per layer, and the placement needing the fewest changes to the connection map
wins.

The same search space prices the match p-value: the owner (and a forger) could have picked any of it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ticketguard.core.errors import InputError
from ticketguard.core.masks import Mask, squeeze
from ticketguard.schemes import qr

PATTERNS = range(8)
POLARITIES = (True, False)
# kept = dark lets the decoder trust every dark module, since pruning only removes connections; kept = light
# may need fewer changes but turns pruning damage into plain errors (digits ResNet-20: kept = light no longer
# decodes after 5 % magnitude pruning, kept = dark still does after 30 %), so "dark" is the default.
POLARITY_CHOICES = {"any": POLARITIES, "dark": (True,), "light": (False,)}


@dataclass(frozen=True)
class Placement:
    """A candidate: layer, offset, QR mask pattern, polarity and the number of (out, in) cells to change."""

    layer: str
    row: int
    col: int
    mask_pattern: int
    kept_is_dark: bool
    changes: int


def qr_codes(payload: str, *, error: str = "H", version: int | None = None) -> list[qr.QrCode]:
    """The payload's code under each of the 8 mask patterns at one version (default: smallest fitting)."""
    version = version or qr.make_qr(payload, error=error).spec.version
    return [qr.make_qr(payload, error=error, version=version, mask_pattern=m) for m in PATTERNS]


def is_host(tensor: torch.Tensor) -> bool:
    """Conv kernels (4-D) and weight matrices (2-D) have (out, in) connections that can carry a code."""
    return tensor.dim() in (2, 4)


def connections(tensor: torch.Tensor) -> torch.Tensor:
    """A host's (out, in) connection map: a conv mask squeezed by "any kernel weight kept"; a 2-D mask as
    it is, since each of its connections is exactly one weight (the paper writes M_s into it directly)."""
    if tensor.dim() == 2:
        return tensor
    if tensor.dim() != 4:
        raise InputError(
            f"a layer of shape {tuple(tensor.shape)} can not hold a QR code: only conv kernels (4-D) and "
            "weight matrices (2-D) have (out, in) connections"
        )
    return squeeze(tensor)


def candidate_layers(mask: Mask, size: int, weights_per_connection: int = 1) -> list[str]:
    """Conv and 2-D layers whose (out, in) map holds a size x size code; InputError when none does.

    Layers whose connections hold at least ``weights_per_connection`` weights come first: only their kernels
    spread a connection over several weights that pruning must all remove, so hosts with one weight per
    connection (2-D weights, 1x1 convs; ``signature.raise_code_weights`` protects their code) are used only
    when none fits. Conv-only models thus keep the placements they always had.
    """
    hosts = [name for name, t in mask.items() if is_host(t)]
    layers = [name for name in hosts if min(mask[name].shape[:2]) >= size]
    if not layers:
        largest = max((min(mask[n].shape[:2]) for n in hosts), default=0)
        raise InputError(
            f"the QR code needs a conv or linear layer with at least {size} input and output channels, but "
            f"the largest has {largest}; use a shorter signature, a lower error level or a wider model"
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

    With S the connection map, P the data positions and D the dark data modules, changes(kept = dark) =
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
            f"{copies} copies need {copies} layers large enough for the code, but only "
            f"{len(layers)} are; use --copies {len(layers)} or fewer"
        )
    n_modules = len(codes[0].data_positions)
    best_cost, best_offset, spectra = [], [], {}
    for name in layers:
        as_dark = placement_costs(connections(mask[name].cpu()), codes, spectra).flatten(1)
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


def placement_count(weights: Mapping[str, torch.Tensor], size: int, copies: int) -> float:
    """Bonferroni factor for the placement search: 16 pattern/polarity choices times the offsets of every
    large-enough host (conv or 2-D weight), per copy. The owner picked the region that already fitted the mask
    best, and a forger would search the same space, so the match p-value is multiplied by this count."""
    offsets = sum(
        (t.shape[0] - size + 1) * (t.shape[1] - size + 1)
        for t in weights.values()
        if is_host(t) and min(t.shape[:2]) >= size
    )
    return float(len(PATTERNS) * len(POLARITIES) * max(offsets, 1) ** copies)
