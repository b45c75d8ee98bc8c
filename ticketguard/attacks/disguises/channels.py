"""``permute`` and ``widen``: the disguises that move channels along the permutation groups.

Both act on every axis of a group at once, which is what keeps the function: ``permute`` reorders the
channels, ``widen`` adds split copies and dummy channels to the hidden groups and then reorders them.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ticketguard.core.errors import InputError
from ticketguard.core.masks import Mask
from ticketguard.models.architecture import PermutationGroup, Weights, exact_architecture, permutation_groups


def _draw_permutations(groups: list[PermutationGroup], generator: torch.Generator) -> dict[str, torch.Tensor]:
    """A random order per group; an option-A stream keeps its parent's order on the carried channels."""
    orders: dict[str, torch.Tensor] = {}
    for group in groups:
        order = torch.randperm(group.size, generator=generator)
        if group.embeds is not None:
            parent, offset = group.embeds
            carried = orders[parent] + offset
            end = offset + len(carried)
            padded = torch.cat([torch.arange(offset), torch.arange(end, group.size)])
            order[offset:end] = carried
            order[padded] = padded[torch.randperm(len(padded), generator=generator)]
        orders[group.name] = order
    return orders


def _reorder(
    tensors: Mapping[str, torch.Tensor], groups: list[PermutationGroup], orders: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """New channel i of a group is old channel order[i], on every axis of the group that ``tensors`` holds."""
    result = dict(tensors)
    for group in groups:
        for key, dim in group.axes:
            if key in result:
                result[key] = result[key].index_select(dim, orders[group.name].to(result[key].device))
    return result


def permute(weights: Mapping[str, torch.Tensor], mask: Mask, *, seed: int = 0) -> tuple[Weights, Mask]:
    """Shuffle the channels of every hidden group and every residual stream, consistently across all layers.

    ResNet-20/32/56 cannot have every stream order: an option-A shortcut places the previous stream's channels
    at a fixed offset between zero channels, so a wider stream keeps its parent's order there and only its
    zero-padded channels are shuffled (the stem's stream is shuffled freely). That is every permutation the
    fixed shortcut allows. ResNet-18/50 streams start afresh at each projection shortcut.
    """
    groups = permutation_groups(exact_architecture(weights, "permute"))
    orders = _draw_permutations(groups, torch.Generator().manual_seed(seed))
    return _reorder(weights, groups, orders), Mask(_reorder(mask, groups, orders))


def _broadcast(values: torch.Tensor, dim: int, ndim: int) -> torch.Tensor:
    """``values`` shaped to multiply a tensor of ``ndim`` dims along ``dim``."""
    return values.view(*([1] * dim), -1, *([1] * (ndim - dim - 1)))


def _dummy_rows(
    kernel: torch.Tensor, kept: torch.Tensor | None, count: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Fresh incoming weights for dummy channels, at the layer's kept-weight scale and mask density."""
    live = kernel[kept] if kept is not None else kernel.flatten()
    spread = float(live.float().std()) if live.numel() > 1 else 0.1
    shape = (count, *kernel.shape[1:])
    rows = torch.randn(shape, generator=generator) * spread
    if kept is None:
        return rows.to(kernel.dtype), None
    rows_kept = torch.rand(shape, generator=generator) < kept.float().mean()
    return (rows * rows_kept).to(kernel.dtype), rows_kept


def _widen_group(
    weights: Weights,
    mask: dict[str, torch.Tensor],
    group: PermutationGroup,
    dummies: int,
    splits: int,
    generator: torch.Generator,
) -> None:
    """Add ``splits`` copies of random channels and ``dummies`` fresh channels to a hidden group, and shuffle.

    A copy computes exactly its source's activation, so source and copy each pass on half the outgoing weight;
    a dummy's outgoing weights are zero, so whatever it computes is ignored. Exact up to float rounding.
    """
    size = group.size
    sources = torch.randperm(size, generator=generator)[:splits]
    donors = torch.randint(size, (dummies,), generator=generator)  # BN statistics the dummies borrow
    index = torch.cat([torch.arange(size), sources, donors])
    outgoing = torch.ones(len(index), dtype=torch.float64)
    outgoing[sources] = outgoing[size : size + splits] = 0.5
    outgoing[size + splits :] = 0
    shuffle = torch.randperm(len(index), generator=generator)
    for key, dim in group.axes:
        tensor = weights[key].index_select(dim, index)
        kept = mask[key].index_select(dim, index) if key in mask else None
        if dim == 1:
            tensor = (tensor.double() * _broadcast(outgoing, 1, tensor.dim())).to(tensor.dtype)
            kept = kept & _broadcast(outgoing != 0, 1, kept.dim()) if kept is not None else None
        elif tensor.dim() > 1 and dummies:
            rows, rows_kept = _dummy_rows(weights[key], mask.get(key), dummies, generator)
            tensor[size + splits :] = rows
            if kept is not None:
                kept[size + splits :] = rows_kept
        weights[key] = tensor.index_select(dim, shuffle)
        if kept is not None:
            mask[key] = kept.index_select(dim, shuffle)


def widen(
    weights: Mapping[str, torch.Tensor], mask: Mask, *, dummies: int = 2, splits: int = 2, seed: int = 0
) -> tuple[Weights, Mask]:
    """Widen every hidden group of every block by ``dummies`` dummy and ``splits`` split channels.

    Dummies get random incoming weights (kept at the layer's density) and zero outgoing ones; splits
    duplicate a channel and halve its outgoing weights. Residual streams keep their width: option-A shortcuts
    fix the stream widths of ResNet-20/32/56. Run the result with ``build_disguised``.
    """
    if dummies < 0 or splits < 0 or dummies + splits == 0:
        raise InputError(f"widen needs dummies >= 0 and splits >= 0, not both 0; got {dummies} and {splits}")
    groups = [g for g in permutation_groups(exact_architecture(weights, "widen")) if g.kind == "hidden"]
    if splits > min(g.size for g in groups):
        raise InputError(
            f"widen can split at most {min(g.size for g in groups)} channels per block, got {splits}"
        )
    generator = torch.Generator().manual_seed(seed)
    result, kept = dict(weights), dict(mask)
    for group in groups:
        _widen_group(result, kept, group, dummies, splits, generator)
    return result, Mask(kept)
