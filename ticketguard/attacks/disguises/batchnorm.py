"""``rescale`` and ``fold_bn``: the disguises that trade a conv's units against the BatchNorm after it.

Both rewrite a conv's kernel together with its BatchNorm so that, in eval mode, the pair computes what it did;
they change weight magnitudes, never positions, so the mask passes through unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from ticketguard.core.errors import InputError
from ticketguard.core.masks import Mask
from ticketguard.models.architecture import (
    BN_PARAMETERS,
    BN_STATE,
    Weights,
    conv_bn_pairs,
    exact_architecture,
    probe,
)
from ticketguard.models.symmetries import batchnorm_reading


def _scales(size: int, spread: float, factor: float | None, generator: torch.Generator) -> torch.Tensor:
    if factor is not None:
        return torch.full((size,), float(factor), dtype=torch.float64)
    log_spread = math.log(spread)
    return torch.exp((torch.rand(size, generator=generator, dtype=torch.float64) * 2 - 1) * log_spread)


def _rescaled_bn(
    weights: Weights, conv: str, bn: str, scale: torch.Tensor, eps: float
) -> dict[str, torch.Tensor]:
    """The conv's output channels scaled by s and the BatchNorm entries for which BN'(s·x) == BN(x) in eval
    mode (``batchnorm_reading``: its gamma absorbs eps, so every entry stays plausible and the result is exact
    up to float rounding)."""
    entries = {f"{bn}.{k}": weights[f"{bn}.{k}"].double() for k in ("weight", "running_mean", "running_var")}
    return {
        f"{conv}.weight": weights[f"{conv}.weight"].double() * scale.view(-1, 1, 1, 1),
        **batchnorm_reading(entries, bn, eps, scale),
    }


def rescale(
    weights: Mapping[str, torch.Tensor],
    mask: Mask,
    *,
    seed: int = 0,
    spread: float = 4.0,
    layer: str | None = None,
    factor: float | None = None,
) -> tuple[Weights, Mask]:
    """Scale each conv's output channels by positive factors that its BatchNorm undoes (see ``_rescaled_bn``).

    Scales are log-uniform in [1/spread, spread], drawn per channel; ``factor`` scales every channel by one
    number instead, and ``layer`` (a conv weight's key) restricts the disguise to that conv: the thief's
    "scale by 100, then add on" move that puts the owner's magnitude threshold in the wrong units.
    """
    if not spread >= 1:
        raise InputError(f"rescale spread must be >= 1 (scales lie in [1/spread, spread]), got {spread}")
    if factor is not None and not factor > 0:
        raise InputError(f"rescale factor must be > 0 so that BatchNorm can undo it, got {factor}")
    architecture = exact_architecture(weights, "rescale")
    model = probe(architecture)
    pairs = conv_bn_pairs(model)
    if layer is not None:
        pairs = [(conv, bn) for conv, bn in pairs if f"{conv}.weight" == layer]
        if not pairs:
            raise InputError(
                f"rescale layer {layer!r} is no conv followed by BatchNorm; use a key like "
                f"{conv_bn_pairs(model)[1][0]}.weight"
            )
    generator = torch.Generator().manual_seed(seed)
    result = dict(weights)
    for conv, bn in pairs:
        scale = _scales(weights[f"{conv}.weight"].shape[0], spread, factor, generator)
        eps = model.get_submodule(bn).eps
        for key, tensor in _rescaled_bn(result, conv, bn, scale, eps).items():
            result[key] = tensor.to(weights[key].dtype)
    return result, mask


def fold_bn(weights: Mapping[str, torch.Tensor], mask: Mask) -> tuple[Weights, Mask]:
    """Fold every BatchNorm into its conv: W·gamma/sqrt(var+eps) and a bias beta - mu·gamma/sqrt(var+eps).

    The BN entries disappear and conv biases appear, the form ONNX exporters produce; exact in eval mode up to
    float rounding, and pruned weights stay zero, so the mask is unchanged.
    """
    model = probe(exact_architecture(weights, "fold-bn"))
    folded: dict[str, Weights] = {}
    dropped: set[str] = set()
    for conv, bn in conv_bn_pairs(model):
        kernel, gamma, beta, mean, var = (
            weights[k].double() for k in (f"{conv}.weight", *(f"{bn}.{e}" for e in BN_PARAMETERS))
        )
        gain = gamma / torch.sqrt(var + model.get_submodule(bn).eps)
        dtype = weights[f"{conv}.weight"].dtype
        folded[f"{conv}.weight"] = {
            f"{conv}.weight": (kernel * gain.view(-1, 1, 1, 1)).to(dtype),
            f"{conv}.bias": (beta - mean * gain).to(dtype),
        }
        dropped.update(f"{bn}.{entry}" for entry in BN_STATE)
    result: Weights = {}
    for key, tensor in weights.items():
        if key in folded:
            result.update(folded[key])
        elif key not in dropped:
            result[key] = tensor
    return result, mask


def take_other_units(
    weights: Mapping[str, torch.Tensor],
    mean: torch.Tensor,
    std: torch.Tensor,
    units: tuple[torch.Tensor, torch.Tensor],
) -> Weights:
    """The network rewritten to take inputs standardised with ``units`` (m', s') instead of the owner's
    (``mean``, ``std``), as a thief bakes his own input pipeline (raw pixels: m' = 0, s' = 1) into a copy:
    x = (s' / s) x' + (m' - m) / s, so the stem is multiplied by s' / s per input channel, and the constant the
    shift adds away from padding borders goes into the first BatchNorm's running mean. The same function on
    the new inputs, up to the stem's padding borders."""
    stem, bn = conv_bn_pairs(probe(exact_architecture(weights, "taking other input units")))[0]
    unit_mean, unit_std = units
    kernel = weights[f"{stem}.weight"]
    constant = (kernel.sum((2, 3)) * (unit_mean - mean) / std).sum(1)
    return {
        **weights,
        f"{stem}.weight": kernel * (unit_std / std).view(1, -1, 1, 1),
        f"{bn}.running_mean": weights[f"{bn}.running_mean"] - constant,
    }
