"""Step 4 of alignment, units: divide out each channel's scale and let BatchNorm compensate, then assemble the
reference's state_dict.

An owner's magnitude threshold then applies in the reference's units; a folded suspect gets its BatchNorm
rebuilt on the reference's running statistics.
"""

from __future__ import annotations

import torch

from ticketguard.models.symmetries import batchnorm_reading
from ticketguard.verification.align.layout import AlignmentError, Layout, Weights
from ticketguard.verification.align.reference import KernelPrint, Reference


def channel_scales(kernel: torch.Tensor, print_: KernelPrint) -> torch.Tensor:
    """Per output channel, the factor between the suspect's kernel and the reference's: the ratio of norms,
    signed by the pivot weight; 1 where either kernel is empty."""
    rows = kernel.flatten(1)
    norm, ref_norm = rows.norm(dim=1), print_.norm.double()
    sign = torch.sign(rows.gather(1, print_.pivot[:, None]).squeeze(1) * print_.pivot_value.double())
    usable = (norm > 0) & (ref_norm > 0) & (sign != 0)
    return torch.where(usable, sign * norm / ref_norm, torch.ones_like(norm))


def canonicalise(
    tensors: Weights, reference: Reference, layout: Layout, folded: bool
) -> dict[str, torch.Tensor]:
    """Divide each conv's output channels by their scale and give BatchNorm the factor, so that BN'(W/s x)
    equals what the suspect computed: BN(W x) unfolded, W x + b folded (BatchNorm rebuilt on the reference's
    running statistics, which makes it the reference's own BatchNorm when the suspect is the ticket)."""
    scales = {}
    for conv in layout.convs:
        key, bn = f"{conv}.weight", layout.bn_of[conv]
        s = channel_scales(tensors[key], reference.kernels[key])
        tensors[key] = tensors[key] / s.view(-1, 1, 1, 1)
        if folded:
            tensors.update(
                _rebuilt_batchnorm(
                    tensors.pop(f"{conv}.bias"), s, reference.batchnorms[bn], bn, layout.eps[bn]
                )
            )
        else:
            tensors.update(_unscaled_batchnorm(tensors, bn, s, layout.eps[bn]))
        scales[conv] = s
    return scales


def _unscaled_batchnorm(tensors: Weights, bn: str, s: torch.Tensor, eps: float) -> Weights:
    """BN'(y) = BN(s y): the BatchNorm that reads the kernel's output in units s times smaller, exact with eps
    (the inverse of disguises.rescale)."""
    return batchnorm_reading(tensors, bn, eps, 1 / s)


def _rebuilt_batchnorm(
    bias: torch.Tensor, s: torch.Tensor, stats: torch.Tensor, bn: str, eps: float
) -> Weights:
    """The BatchNorm with the reference's running statistics for which BN(y) = s y + bias."""
    mean, var = stats[2].double(), stats[3].double()
    return {
        f"{bn}.weight": s * torch.sqrt(var + eps),
        f"{bn}.bias": bias + s * mean,
        f"{bn}.running_mean": mean,
        f"{bn}.running_var": var,
    }


def state_dict_of(tensors: Weights, layout: Layout) -> Weights:
    """The reference's keys in its order, shapes and dtypes; BatchNorm batch counters start at zero."""
    weights = {}
    for key, (shape, dtype) in layout.state.items():
        if key.endswith("num_batches_tracked"):
            weights[key] = torch.zeros(shape, dtype=dtype)
            continue
        if tuple(tensors[key].shape) != shape:
            raise AlignmentError(
                f"the aligned {key} has shape {tuple(tensors[key].shape)}, not the reference's {shape}"
            )
        weights[key] = tensors[key].to(dtype)
    return weights
