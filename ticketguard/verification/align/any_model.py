"""Alignment of a model named by import path, from its traced channel symmetries (``models.symmetries``).

The same steps as for the registered ResNets, on whatever symmetries the model's forward shows: names (under a
wrapper's prefix or none), then per symmetry a linear assignment on mask agreement with the reference, iterated
across layers (weight matching), then units: per rescalable channel the factor between the suspect's writing
weights and the reference's norms is divided out, in forward order, so that each layer is measured in units its
inputs already share with the reference. Folded BatchNorms, widened and structurally pruned copies are the
registered architectures' alone: here the suspect must hold the model's state_dict shapes.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from scipy.optimize import linear_sum_assignment

from ticketguard.artifacts.suspect import Suspect
from ticketguard.core.errors import InputError, shorten
from ticketguard.models import build_model
from ticketguard.models.spec import is_trusted
from ticketguard.models.symmetries import (
    ChannelAxis,
    Symmetry,
    channel_symmetries,
    permute_channels,
    scale_channels,
)
from ticketguard.verification.align.layout import AlignmentError, Architecture, Weights
from ticketguard.verification.align.permutations import pattern_disagreement
from ticketguard.verification.align.reference import KernelPrint, Reference
from ticketguard.verification.align.scales import channel_scales
from ticketguard.verification.align.structure import wrapper_prefix
from ticketguard.verification.reading import effective_magnitudes, rank_read

MAX_ROUNDS = 10


State = dict[str, tuple[tuple[int, ...], torch.dtype]]


def _structure(architecture: Architecture) -> tuple[State, tuple[Symmetry, ...]]:
    """The model's state_dict shapes and its channel symmetries; only for code the caller named, asked on
    every call (what was built under an earlier trust is not reused without it)."""
    name = architecture[0]
    if not is_trusted(name):
        raise AlignmentError(
            f"the reference names the model {shorten(name, 80)!r} by import path, which is imported only when "
            f"you name it: verify --model {shorten(name, 80)} (from Python: verify(..., model=...))"
        )
    try:
        return _built_structure(architecture)
    except InputError as err:
        raise AlignmentError(str(err)) from err


@functools.lru_cache(maxsize=8)
def _built_structure(architecture: Architecture) -> tuple[State, tuple[Symmetry, ...]]:
    """Built on the meta device: structure only, no weights."""
    with torch.device("meta"):
        model = build_model(*architecture)
    return {k: (tuple(t.shape), t.dtype) for k, t in model.state_dict().items()}, tuple(
        channel_symmetries(model)
    )


def align_any_model(
    suspect: Suspect, reference: Reference, held_out: Mapping[str, torch.Tensor]
) -> tuple[Weights, dict[str, torch.Tensor], dict[str, Any]]:
    """The suspect's weights in the reference model's channel order and units, the mask read from them, and
    what was undone; the orders are fitted without the ``held_out`` cells."""
    state, symmetries = _structure(reference.architecture)
    _check_reference(reference, state)
    floats = {k: t for k, t in suspect.weights.items() if t.is_floating_point() and t.dim() > 0}
    wanted = [k for k, (_, dtype) in state.items() if dtype.is_floating_point]
    prefix = wrapper_prefix(floats, wanted)
    if prefix is None:
        raise AlignmentError(
            f"the suspect holds no tensors named as {reference.architecture[0]}'s state_dict"
        )
    tensors = {k: floats[prefix + k].double() for k in wanted}
    for key, tensor in tensors.items():
        if tuple(tensor.shape) != state[key][0]:
            raise AlignmentError(f"the suspect's {key} has shape {tuple(tensor.shape)}, not {state[key][0]}")
    perms, rounds, converged = _recover_permutations(tensors, reference, symmetries, held_out)
    aligned = permute_channels(tensors, symmetries, perms)
    rescaled = {}
    for symmetry in symmetries:
        if symmetry.scaling is not None:
            scale = _scale(aligned, symmetry, reference)
            aligned = scale_channels(aligned, symmetry, 1 / scale)
            rescaled[symmetry.name] = int(((scale - 1).abs() > 1e-6).sum())
    kept = _read(aligned, reference, symmetries)
    weights = {
        key: aligned[key].to(dtype) if key in aligned else torch.zeros(shape, dtype=dtype)
        for key, (shape, dtype) in state.items()
    }
    report = {
        "structure": "names" + (f" under {prefix!r}" if prefix else ""),
        "layers": {key: prefix + key for key in wanted},
        "symmetries": {s.name: {"channels": s.size, "rescalable": s.scaling} for s in symmetries},
        "rounds": rounds,
        "converged": converged,
        "permuted": {name: int((p != torch.arange(len(p))).sum()) for name, p in perms.items()},
        "rescaled": rescaled,
    }
    return weights, kept, report


def _check_reference(reference: Reference, state: State) -> None:
    """A reference read from a claim names tensors and sizes; they must be this model's."""
    for key, mask in reference.masks.items():
        if key not in state or tuple(mask.shape) != state[key][0]:
            raise AlignmentError(f"the reference's mask {key!r} is no weight of {reference.architecture[0]}")
    for key, print_ in reference.kernels.items():
        shape = state.get(key, ((), None))[0]
        if (
            len(shape) < 2
            or len(print_.norm) != shape[0]
            or bool((print_.pivot >= math.prod(shape[1:])).any())
        ):
            raise AlignmentError(f"the reference's kernel {key!r} does not fit {reference.architecture[0]}")


def _features(tensor: torch.Tensor, axis: ChannelAxis) -> torch.Tensor:
    """One row per channel: what it holds along the axis (all its positions), flattened."""
    return tensor.movedim(axis.dim, 0)[axis.positions].flatten(1).float()


def _recover_permutations(
    tensors: Weights,
    reference: Reference,
    symmetries: Sequence[Symmetry],
    held_out: Mapping[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], int, bool]:
    """Per symmetry, the suspect channel for each reference channel: linear assignment on the disagreement
    of kept patterns with the reference mask, the other channel axes in the reference's order where known
    (by the last round's estimate when they belong to the same symmetry, as a layer inside a residual stream
    reads and writes it), summed over them where not yet (the first round), until no order changes."""
    kept, owned = {}, {}
    for key, mask in reference.masks.items():
        fitted = (
            ~held_out[key] if key in held_out and held_out[key].shape == mask.shape else torch.ones_like(mask)
        )
        kept[key] = rank_read(_first_magnitudes(tensors[key]), int(mask.sum())) & fitted
        owned[key] = mask & fitted
    owners = {(a.key, a.dim): s.name for s in symmetries for a in s.axes}
    perms: dict[str, torch.Tensor | None] = {s.name: None for s in symmetries}
    for round_ in range(1, MAX_ROUNDS + 1):
        previous = dict(perms)
        for symmetry in symmetries:
            cost = torch.zeros(symmetry.size, symmetry.size, dtype=torch.float64)
            for axis in symmetry.axes:
                if axis.key in kept:
                    cost += _axis_cost(
                        owned[axis.key], kept[axis.key], axis, symmetry, symmetries, owners, perms
                    )
                elif axis.key in reference.kernels and axis.dim == 0 and axis.positions.shape[1] == 1:
                    cost += _pivot_cost(tensors[axis.key], reference.kernels[axis.key], axis, owners, perms)
            perms[symmetry.name] = torch.from_numpy(linear_sum_assignment(cost.numpy())[1]).long()
        if all(p is not None and torch.equal(p, perms[name]) for name, p in previous.items()):
            return perms, round_, True
    return perms, MAX_ROUNDS, False


def _pivot_cost(
    tensor: torch.Tensor,
    print_: KernelPrint,
    axis: ChannelAxis,
    owners: Mapping[tuple[str, int], str],
    perms: Mapping[str, torch.Tensor | None],
) -> torch.Tensor:
    """For a layer the mask leaves dense (a stem, a first linear layer): a channel whose largest incoming
    weight sits elsewhere than the reference's costs a whole row of disagreement. The largest weight's place
    survives positive rescaling and the pruning of small weights; it is compared only once the inputs are in
    the reference's order (always for the model's own inputs)."""
    reader = owners.get((axis.key, 1))
    if reader is not None and perms[reader] is None:
        return torch.zeros(len(print_.pivot), tensor.shape[0], dtype=torch.float64)
    if reader is not None:
        tensor = tensor.index_select(1, perms[reader])
    rows = tensor[axis.positions[:, 0]].abs().flatten(1)
    return rows.shape[1] * (print_.pivot[:, None] != rows.argmax(1)[None, :]).double()


def _first_magnitudes(tensor: torch.Tensor) -> torch.Tensor:
    """|W| relative to each output row's norm: the row's own scale, which alignment has not undone yet,
    cannot decide which of its weights are read as kept."""
    rows = tensor.abs().flatten(1)
    norm = rows.norm(dim=1, keepdim=True)
    return (rows / torch.where(norm > 0, norm, torch.ones_like(norm))).view_as(tensor)


def _axis_cost(
    reference_mask: torch.Tensor,
    suspect_mask: torch.Tensor,
    axis: ChannelAxis,
    symmetry: Symmetry,
    symmetries: Sequence[Symmetry],
    owners: Mapping[tuple[str, int], str],
    perms: Mapping[str, torch.Tensor | None],
) -> torch.Tensor:
    ref, sus = reference_mask.float(), suspect_mask.float()
    known = True
    for dim in range(min(ref.dim(), 2)):
        owner = owners.get((axis.key, dim))
        if dim == axis.dim or owner is None:
            continue
        if perms[owner] is None:
            ref, sus, known = ref.sum(dim, keepdim=True), sus.sum(dim, keepdim=True), False
    if known:
        ordered = [s for s in symmetries if perms[s.name] is not None]
        sus = _reordered(sus, axis.key, axis.dim, ordered, perms)
    return pattern_disagreement(_features(ref, axis), _features(sus, axis), known)


def _reordered(
    tensor: torch.Tensor,
    key: str,
    dim: int,
    symmetries: Sequence[Symmetry],
    perms: Mapping[str, torch.Tensor | None],
) -> torch.Tensor:
    """``tensor`` (the weight ``key``) with the known orders applied on its other axes."""
    on_other_axes = [
        Symmetry(s.name, s.size, tuple(a for a in s.axes if a.key == key and a.dim != dim))
        for s in symmetries
    ]
    return permute_channels({key: tensor}, on_other_axes, perms)[key]


def _scale(tensors: Weights, symmetry: Symmetry, reference: Reference) -> torch.Tensor:
    """Per channel, the factor between the suspect's writing kernel and the reference's (signed through a
    BatchNorm, positive where only ReLU and pooling follow); 1 where the reference has no record of it."""
    writer = next(a for a in symmetry.writers() if a.key.endswith("weight"))
    print_ = reference.kernels.get(writer.key)
    if print_ is None or writer.dim != 0 or writer.positions.shape[1] != 1:
        return torch.ones(symmetry.size, dtype=torch.float64)
    scale = channel_scales(tensors[writer.key][writer.positions[:, 0]], print_)
    return scale if symmetry.scaling == "batchnorm" else scale.abs()


def _read(tensors: Weights, reference: Reference, symmetries: Sequence[Symmetry]) -> dict[str, torch.Tensor]:
    """Each masked layer's kept weights, by rank in the units of the BatchNorm that reads it directly where
    there is one, as many as the reference keeps there."""
    batchnorm_of = {a.key: s.batchnorm for s in symmetries if s.batchnorm is not None for a in s.writers()}
    kept = {}
    for key, owned in reference.masks.items():
        stats = None
        if key in batchnorm_of:
            name, eps = batchnorm_of[key]
            stats = (tensors[f"{name}.weight"], tensors[f"{name}.running_var"], eps)
        kept[key] = rank_read(effective_magnitudes(tensors[key], stats), int(owned.sum()), tensors[key])
    return kept
