"""``channels``: structural pruning, the way a thief shrinks a stolen network with Torch-Pruning.

Whole channels go: per permutation group the ``fraction`` with the smallest L1 importance (Torch-Pruning's
``MagnitudeImportance(p=1)`` over the conv rows, their BatchNorm and the consumers' columns), every layer of a
group pruned alike, the classifier's outputs kept. The result is a smaller network with the same layer names:
run it with ``build_disguised`` (or ``build_from_state``, which reshapes it).

ResNet-20/32/56 carry their residual streams through option-A shortcuts, which zero-pad the stream at a fixed
offset; Torch-Pruning does not trace that padding, and pruning a stream there breaks the network (measured:
the classifier's input no longer matches). On those networks only the blocks' hidden channels are pruned;
ResNet-18/50 lose stream channels too.

Torch-Pruning is an optional dependency (the ``test`` extra): imported when the attack runs.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from ticketguard.core.errors import InputError
from ticketguard.core.masks import Mask, Weights, mask_from_zeros
from ticketguard.models import build_model
from ticketguard.models.architecture import exact_architecture, permutation_groups

EXAMPLE_SIDE = 32  # the traced example input's side: every registered network still has spatial size left


def prune_channels(
    weights: Mapping[str, torch.Tensor], mask: Mask, *, fraction: float
) -> tuple[Weights, Mask]:
    """Remove ``fraction`` of the channels of every prunable group by L1 importance (Torch-Pruning's
    ``MagnitudePruner``); the mask keeps what is still non-zero."""
    if not 0.0 <= fraction < 1.0:
        raise InputError(f"the channel pruning fraction must be in [0, 1), got {fraction}")
    try:
        import torch_pruning as tp
    except ImportError:
        raise InputError("the channels attack needs Torch-Pruning: pip install torch-pruning") from None
    architecture = exact_architecture(weights, "channels")
    model = build_model(*architecture)
    model.load_state_dict(dict(weights))
    model.eval()
    example = torch.zeros(1, architecture[1], EXAMPLE_SIDE, EXAMPLE_SIDE)
    pruner = tp.pruner.MagnitudePruner(
        model,
        example,
        importance=tp.importance.MagnitudeImportance(p=1),
        pruning_ratio=fraction,
        ignored_layers=_kept_layers(model, architecture),
    )
    pruner.step()
    pruned = {key: tensor.detach().clone() for key, tensor in model.state_dict().items()}
    return pruned, mask_from_zeros(pruned, list(mask))


def _kept_layers(model: nn.Module, architecture: tuple[str, int, int]) -> list[nn.Module]:
    """The classifier, and every conv writing into a residual stream that an option-A shortcut carries."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    groups = permutation_groups(architecture)
    carried = {group.embeds[0] for group in groups if group.embeds is not None}
    padded = [g for g in groups if g.embeds is not None or g.name in carried]
    written = {key.rpartition(".")[0] for group in padded for key, dim in group.axes if dim == 0}
    writers = [model.get_submodule(name) for name in sorted(written)]
    return [linears[-1], *(m for m in writers if isinstance(m, nn.Conv2d))]
