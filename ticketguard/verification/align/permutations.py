"""Steps 2 and 3 of alignment, widths and order: merge split channels, drop dummies, recover permutations.

Per permutation group a linear assignment on mask agreement with the reference, iterated across layers as in
weight matching (Ainsworth et al., Git Re-Basin); option-A shortcuts keep their parent stream's order. A group
that structural pruning left with fewer channels gets a rectangular assignment, and the reference channels
no suspect channel matches are recorded as missing.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping

import torch
from scipy.optimize import linear_sum_assignment

from ticketguard.models.architecture import PermutationGroup
from ticketguard.verification.align.layout import (
    AlignmentError,
    Axis,
    Layout,
    Weights,
    axis_owners,
    group_axes,
    group_width,
)
from ticketguard.verification.align.reference import Reference

MAX_ROUNDS = 10


def narrow(tensors: Weights, group: PermutationGroup) -> dict[str, int]:
    """Merge split channels of a widened hidden group: channels with identical incoming weights and
    BatchNorm compute the same activation, so one of them can carry their summed outgoing weights and the
    others none. Channels left with no outgoing weight are then left out by the assignment."""
    axes = group_axes(group, tensors)
    writers = [key for key, dim in axes if dim == 0]
    incoming = torch.cat(
        [tensors[k].flatten(1) if tensors[k].dim() > 1 else tensors[k][:, None] for k in writers], 1
    )
    _, copy_of = torch.unique(incoming, dim=0, return_inverse=True)
    width = len(copy_of)
    first = torch.full((width,), width).scatter_reduce(0, copy_of, torch.arange(width), "amin")
    for key, dim in axes:
        if dim == 1:
            tensors[key] = torch.zeros_like(tensors[key]).index_add_(1, first[copy_of], tensors[key])
    merged = width - int(copy_of.max()) - 1
    return {"merged": merged, "dropped": width - merged - group.size}


def _droppable(tensors: Mapping[str, torch.Tensor], group: PermutationGroup) -> torch.Tensor:
    """Channels whose outgoing weights are all zero: leaving them out does not change the function."""
    readers = [tensors[key].movedim(1, 0).flatten(1) for key, dim in group_axes(group, tensors) if dim == 1]
    droppable = torch.stack([(reader == 0).all(1) for reader in readers]).all(0)
    if int((~droppable).sum()) > group.size:
        raise AlignmentError(
            f"{int((~droppable).sum())} channels of {group.name} carry outgoing weights and duplicate no "
            f"other, but the reference has {group.size}: removing any would change the function"
        )
    return droppable


def recover_permutations(
    tensors: Weights, kept: Mapping[str, torch.Tensor], reference: Reference, layout: Layout
) -> tuple[dict[str, torch.Tensor], int, bool]:
    """Per group, the suspect channel for each reference channel, by linear assignment on disagreement
    between the suspect's read mask ``kept`` and the reference's. A group with fewer channels than the
    reference's (structural pruning) gets a rectangular assignment; its unmatched reference channels are
    ``missing``: their index is the suspect's width, which ``take_channels`` reads as an all-zero channel.

    A channel's incoming and outgoing patterns depend on the orders of the neighbouring groups, so groups are
    solved in turn until no order changes (weight matching). The first round knows no neighbour yet and
    compares kept counts per kernel position instead, which no neighbour's order changes.
    """
    owner = axis_owners(layout, tensors)
    droppable = {g.name: _droppable(tensors, g) for g in layout.groups if group_width(tensors, g) > g.size}
    missing_cost = {
        g.name: _empty_channel_cost(g, kept, reference)
        for g in layout.groups
        if group_width(tensors, g) < g.size
    }
    children: dict[str, list[PermutationGroup]] = defaultdict(list)
    for group in layout.groups:
        if group.embeds is not None:
            children[group.embeds[0]].append(group)
    perms: dict[str, torch.Tensor | None] = {g.name: None for g in layout.groups}

    def total_cost(group: PermutationGroup) -> torch.Tensor:
        """Disagreement on the group's own axes and on those of the option-A streams that carry it."""
        cost = torch.zeros(group.size, group_width(tensors, group), dtype=torch.float64)
        for key, dim in group.axes:
            if key in kept:
                cost += _axis_cost(reference.masks[key], kept[key], key, dim, owner, perms)
        for child in children[group.name]:
            offset = child.embeds[1]
            cost += total_cost(child)[offset : offset + group.size, offset : offset + group.size]
        return cost

    for round_ in range(1, MAX_ROUNDS + 1):
        previous = dict(perms)
        for group in layout.groups:
            perms[group.name] = _assign(
                group, total_cost(group), perms, droppable.get(group.name), missing_cost.get(group.name)
            )
        if all(p is not None and torch.equal(p, perms[name]) for name, p in previous.items()):
            return perms, round_, True
    return perms, MAX_ROUNDS, False


def _axis_cost(
    reference_mask: torch.Tensor,
    suspect_mask: torch.Tensor,
    key: str,
    dim: int,
    owner: Mapping[Axis, str],
    perms: Mapping[str, torch.Tensor | None],
) -> torch.Tensor:
    """(reference channels, suspect channels) disagreement along ``dim`` of one masked weight: the Hamming
    distance of kept patterns once the other channel axis is in reference order, else the L1 distance of kept
    counts per kernel position."""
    ref, sus = reference_mask.float(), suspect_mask.float()
    other = 1 - dim  # the other channel axis of a kernel or matrix
    group = owner.get((key, other))  # None for image channels and classes, which nobody permutes
    known = group is None or perms[group] is not None
    if group is not None:
        if known:
            sus = take_channels(sus, other, perms[group])
        else:
            ref, sus = ref.sum(other, keepdim=True), sus.sum(other, keepdim=True)
    return pattern_disagreement(ref.movedim(dim, 0).flatten(1), sus.movedim(dim, 0).flatten(1), known)


def pattern_disagreement(reference: torch.Tensor, suspect: torch.Tensor, ordered: bool) -> torch.Tensor:
    """(reference rows, suspect rows) disagreement of 0/1 patterns: the Hamming distance when their columns
    are in the same order, else the L1 distance of the counts they hold (columns summed where unordered)."""
    if ordered:
        return (reference.sum(1)[:, None] + suspect.sum(1)[None, :] - 2 * reference @ suspect.T).double()
    return torch.cdist(reference, suspect, p=1).double()


def _empty_channel_cost(
    group: PermutationGroup, kept: Mapping[str, torch.Tensor], reference: Reference
) -> torch.Tensor:
    """Per reference channel, the disagreement of an empty channel with it: its kept weights on the group's
    axes (what both the Hamming and the kept-count costs of ``_axis_cost`` give against zeros)."""
    cost = torch.zeros(group.size, dtype=torch.float64)
    for key, dim in group.axes:
        if key in kept:
            cost += reference.masks[key].movedim(dim, 0).flatten(1).sum(1).double()
    return cost


def _assign(
    group: PermutationGroup,
    cost: torch.Tensor,
    perms: Mapping[str, torch.Tensor | None],
    droppable: torch.Tensor | None,
    missing_cost: torch.Tensor | None = None,
) -> torch.Tensor:
    """The suspect channel for each reference channel. An option-A stream keeps its parent's order on the
    channels it carries, and in a widened group every channel that cannot be dropped must be chosen.

    A narrower group matches each suspect channel to one reference channel, by rectangular assignment on the
    cost less that of leaving the reference channel empty: the total is then the disagreement of the whole
    group with its missing channels read as empty, so the match does not favour sparse reference channels."""
    if missing_cost is not None:
        width = cost.shape[1]
        rows, cols = linear_sum_assignment((cost - missing_cost[:, None]).numpy())
        perm = torch.full((group.size,), width, dtype=torch.long)
        perm[torch.from_numpy(rows)] = torch.from_numpy(cols).long()
        return perm
    if group.embeds is not None:
        parent, offset = group.embeds
        carried = perms[parent] + offset
        perm = torch.empty(group.size, dtype=torch.long)
        perm[offset : offset + len(carried)] = carried
        free = torch.ones(group.size, dtype=torch.bool)
        free[offset : offset + len(carried)] = False
        padded = free.nonzero().squeeze(1)
        rows, cols = linear_sum_assignment(cost[padded][:, padded].numpy())
        perm[padded[rows]] = padded[torch.from_numpy(cols)]
        return perm
    if droppable is not None:
        cost = cost - (cost.max() - cost.min() + 1) * (~droppable).double()
    _, cols = linear_sum_assignment(cost.numpy())
    return torch.from_numpy(cols).long()


def take_channels(tensor: torch.Tensor, dim: int, perm: torch.Tensor) -> torch.Tensor:
    """Channel i along ``dim`` is the tensor's channel perm[i]; an index equal to its width stands for a
    channel the suspect does not have, and reads as zeros (a channel that computes nothing and feeds
    nothing: for a BatchNorm, gamma = beta = 0, so the function is the suspect's)."""
    if perm.numel() and int(perm.max()) >= tensor.shape[dim]:
        empty = tensor.new_zeros(tensor.shape[:dim] + (1,) + tensor.shape[dim + 1 :])
        tensor = torch.cat([tensor, empty], dim)
    return tensor.index_select(dim, perm)


def reorder(
    tensor: torch.Tensor, key: str, perms: Mapping[str, torch.Tensor], owner: Mapping[Axis, str]
) -> torch.Tensor:
    """``tensor`` with every channel axis in the reference's order (and width); channels the suspect lacks
    are zeros."""
    for dim in range(min(tensor.dim(), 2)):
        group = owner.get((key, dim))
        if group is not None:
            tensor = take_channels(tensor, dim, perms[group])
    return tensor
