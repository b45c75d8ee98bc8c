"""How a suspect's mask is read: from the suspect alone, the same way for the owner's copy and for an innocent.

A claim says where to look, never how to read. Reading the owner's positions as kept whenever they are
non-zero (and thresholding only the rest) makes any suspect that is non-zero everywhere (every zero set to
1e-8, any dense fine-tuning) read as holding the owner's whole mask, so the reading rules here look at the
suspect's own weights only:

- ``rank_read``: in each layer the ``count`` largest magnitudes are kept, ``count`` being what the owner's
  ticket keeps there (the same number for every suspect), or all non-zero weights when the suspect keeps
  fewer. Weights tied with the first one left out are left out too: tied weights cannot be told apart, so an
  epsilon fill reads as the suspect's real weights, never as a subset of the fill picked by position or by
  channel. A
  dense-fine-tuned copy reads back as its largest weights, which is where a stolen ticket's mask survives.
- for claims that record no per-layer counts, the owner's add-on defence (``defence.defended``): every
  weight below the threshold t is dropped, the owner's positions included.

Magnitudes are read in the units of the BatchNorm that follows a conv (``effective_magnitudes``:
|W| |gamma| / sqrt(var + eps) per output channel), which rescaling channels through BatchNorm and folding
BatchNorm into the conv both leave unchanged, so no scale the thief chose and no scale the claim records
decides which weights count.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ticketguard.core.masks import Weights

FILL_SHARE = 0.01


def rank_read(magnitude: torch.Tensor, count: int, values: torch.Tensor | None = None) -> torch.Tensor:
    """Kept = among the ``count`` largest of ``magnitude`` and strictly above the first value left out.

    ``values``: the weights as stored. A fill is a value that many weights share (FILL_SHARE of the layer):
    when some of them are left out, all are, since per-channel units only spread one stored value over many
    levels and cannot tell them apart. Values that only a few weights share (float16, int8 levels) stay."""
    nonzero = magnitude > 0
    if count >= int(nonzero.sum()):
        return nonzero
    if count <= 0:
        return torch.zeros_like(nonzero)
    flat = magnitude.flatten()
    kept = magnitude > flat.kthvalue(flat.numel() - count).values  # above the (count + 1)-th largest
    if values is not None:
        stored = values.detach().abs()
        shared, sharing = torch.unique(stored[nonzero & ~kept], return_counts=True)
        fills = shared[sharing >= max(2, FILL_SHARE * stored.numel())]
        kept &= ~torch.isin(stored, fills)
    return kept


def effective_magnitudes(
    kernel: torch.Tensor, batchnorm: tuple[torch.Tensor, torch.Tensor, float] | None
) -> torch.Tensor:
    """|W| in the units of the BatchNorm after it, given as (gamma, running var, eps); |W| without one."""
    magnitude = kernel.detach().abs().double()
    if batchnorm is None:
        return magnitude
    gamma, var, eps = batchnorm
    gain = gamma.detach().double().abs() / torch.sqrt(var.detach().double().clamp(min=0) + eps)
    return magnitude * gain.view(-1, *([1] * (kernel.dim() - 1)))


def masked(weights: Mapping[str, torch.Tensor], kept: Mapping[str, torch.Tensor]) -> Weights:
    """The weights with everything outside ``kept`` (for the layers it names) set to zero."""
    result = dict(weights)
    for name, layer_kept in kept.items():
        result[name] = torch.where(layer_kept, weights[name], torch.zeros_like(weights[name]))
    return result


def read_summary(kept: Mapping[str, torch.Tensor], counts: Mapping[str, int]) -> dict[str, object]:
    """What a verdict reports of a reading: the density read, the rule and the counts it used."""
    read = sum(int(m.sum()) for m in kept.values())
    total = sum(m.numel() for m in kept.values())
    return {
        "rule": "the largest weights of each layer, as many as the owner's ticket keeps there or the suspect's "
        "own non-zero count when smaller; ties at the boundary left out",
        "density_read": read / total if total else 0.0,
        "kept_read": read,
        "kept_by_owner": sum(counts.values()),
        "layers_read_below_owner": sum(int(kept[n].sum()) < counts[n] for n in kept),
    }
