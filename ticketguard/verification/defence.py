"""The owner's answer to the add-on attack: one rule, used by ``verify`` and by the attack grid alike.

An add-on attack switches pruned positions back on with weights far smaller than the ticket's own, so that the
mask no longer reads as the owner's. The owner records a threshold t in the claim (a low quantile of its kept
|W|) and every weight below t is dropped before the mask is read: the attacker's additions go, and the owner
loses at most that quantile of its own weights, which the code survives. The rule looks at the weights only,
never at the claimed positions, so it reads the owner's copy and an innocent model the same way.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ticketguard.core.errors import InputError
from ticketguard.core.masks import Mask, Weights

DEFENCE_QUANTILE = 0.005


def defence_threshold(weights: Mapping[str, torch.Tensor], mask: Mask, quantile: float = DEFENCE_QUANTILE) -> float:
    """t: the ``quantile`` of the protected ticket's kept |W|, recorded in the claim."""
    if not 0.0 <= quantile < 1.0:
        raise InputError(f"defence quantile fraction must be in [0, 1), got {quantile}")
    kept = mask.kept_values(weights).abs()
    return float(torch.quantile(kept, quantile)) if kept.numel() else 0.0


def defended(weights: Mapping[str, torch.Tensor], threshold: float) -> Weights:
    """The weights with every entry of every weight tensor (floating, two or more dims) below t set to zero."""
    if not threshold >= 0:
        raise InputError(f"the defence threshold t must be >= 0, got {threshold}")
    return {
        name: torch.where(t.abs() < threshold, torch.zeros_like(t), t)
        if t.is_floating_point() and t.dim() >= 2
        else t
        for name, t in weights.items()
    }


def magnitude_defence(weights: Mapping[str, torch.Tensor], mask: Mask, *, threshold: float) -> tuple[Weights, Mask]:
    """The defence as an attack-grid step: ``defended`` weights, and the mask without what it dropped."""
    kept = defended(weights, threshold)
    return kept, Mask({name: mask[name] & (kept[name] != 0) for name in mask})
