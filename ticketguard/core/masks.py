"""The pruning mask M of N[W, M]: named 0/1 tensors, their algebra, and adapters from other tools' formats."""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from ticketguard.core.errors import InputError
from ticketguard.core.files import load_tensors, save_tensors

Weights = dict[str, torch.Tensor]
"""Named tensors: a state_dict, or any part of one."""

PRUNE_ORIG_SUFFIX = "_orig"
PRUNE_MASK_SUFFIX = "_mask"
ATTENTION_PROJECTIONS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")
SPREAD_FALLBACK = 0.1  # the scale of a layer that keeps fewer than two weights, where no spread is measured


def flatten(tensors: Mapping[str, torch.Tensor], names: Iterable[str]) -> torch.Tensor:
    """The named tensors as one vector, in the order of ``names``: global choices (top-k, random draws)
    are made on it and split back with ``unflatten``."""
    return torch.cat([tensors[name].flatten() for name in names])


def unflatten(flat: torch.Tensor, like: Mapping[str, torch.Tensor]) -> Weights:
    """Split one vector into tensors shaped like those of ``like``, in its order."""
    total = sum(tensor.numel() for tensor in like.values())
    if flat.numel() != total:
        raise ValueError(f"a vector of {flat.numel()} entries cannot fill tensors of {total}")
    parts, start = {}, 0
    for name, tensor in like.items():
        parts[name] = flat[start : start + tensor.numel()].view_as(tensor)
        start += tensor.numel()
    return parts


class Mask(Mapping[str, torch.Tensor]):
    """M: parameter name -> bool tensor of the same shape; True keeps a weight."""

    def __init__(self, tensors: Mapping[str, torch.Tensor]) -> None:
        self._tensors: dict[str, torch.Tensor] = {}
        for name, tensor in tensors.items():
            if not isinstance(tensor, torch.Tensor):
                raise InputError(f"mask entry {name!r} is not a tensor")
            if tensor.dtype != torch.bool:
                if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                    raise InputError(f"mask entry {name!r} holds non-finite values; a mask holds only 0 and 1")
                if not ((tensor == 0) | (tensor == 1)).all():
                    raise InputError(f"mask entry {name!r} holds values other than 0 and 1; a mask must be binary")
                tensor = tensor != 0
            self._tensors[name] = tensor

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._tensors[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Mask) or self.keys() != other.keys():
            return False
        return all(torch.equal(self[n].cpu(), other[n].cpu()) for n in self)

    def __repr__(self) -> str:
        return f"Mask({len(self)} tensors, density={self.density():.4f})"

    @classmethod
    def ones_like(cls, weights: Mapping[str, torch.Tensor], names: list[str]) -> Mask:
        """The dense mask over ``names``."""
        return cls({name: torch.ones_like(weights[name], dtype=torch.bool) for name in names})

    def kept(self) -> int:
        return int(sum(int(t.sum()) for t in self._tensors.values()))

    def total(self) -> int:
        return int(sum(t.numel() for t in self._tensors.values()))

    def density(self) -> float:
        """spar(M) = ||M||_0 / ||M + 1||_0: the fraction of weights kept."""
        total = self.total()
        return self.kept() / total if total else 1.0

    def layer_densities(self) -> dict[str, float]:
        return {name: float(t.float().mean()) for name, t in self._tensors.items()}

    def flat(self) -> torch.Tensor:
        """M as one bool vector over its tensors, in their order."""
        return flatten(self._tensors, self._tensors)

    def unflatten(self, flat: torch.Tensor) -> Mask:
        """A mask shaped like this one from one bool vector over its tensors."""
        return Mask(unflatten(flat, self._tensors))

    def kept_values(self, weights: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The kept weights of every tensor, as one float vector in this mask's order."""
        return torch.cat([weights[name].detach()[kept.to(weights[name].device)].float().cpu()
                          for name, kept in self._tensors.items()])

    def subset(self, chosen: torch.Tensor) -> Mask:
        """The mask that keeps the kept positions where ``chosen`` (one bool per kept weight, in order) is True."""
        flat = self.flat().cpu()
        subset = torch.zeros_like(flat)
        subset[flat.nonzero().squeeze(1)] = chosen
        return self.unflatten(subset)

    def kept_spread(self, weights: Mapping[str, torch.Tensor]) -> dict[str, float]:
        """Per tensor, the std of its kept weights: the scale of weights that pass for this ticket's own."""
        spread = {}
        for name, kept in self._tensors.items():
            values = weights[name].detach()[kept.to(weights[name].device)].float()
            spread[name] = float(values.std()) if values.numel() > 1 else SPREAD_FALLBACK
        return spread

    def to(self, device: torch.device | str) -> Mask:
        return Mask({name: t.to(device) for name, t in self._tensors.items()})

    def check_matches(self, weights: Mapping[str, torch.Tensor]) -> None:
        """Raise if a mask entry names a missing weight or has another shape."""
        for name, tensor in self._tensors.items():
            if name not in weights:
                raise InputError(f"mask entry {name!r} names no weight of the model")
            if tuple(weights[name].shape) != tuple(tensor.shape):
                raise InputError(
                    f"mask entry {name!r} has shape {tuple(tensor.shape)} but the weight has "
                    f"shape {tuple(weights[name].shape)}"
                )

    @torch.no_grad()
    def revived(self, weights: Mapping[str, torch.Tensor]) -> dict[str, int]:
        """Pruned weights that are not zero, counted per tensor (only tensors with some): a mask not kept."""
        self.check_matches(weights)
        counts = {}
        for name, kept in self.items():
            weight = weights[name]
            counts[name] = int((weight.detach()[~kept.to(weight.device)] != 0).sum())
        return {name: count for name, count in counts.items() if count > 0}

    @torch.no_grad()
    def apply_(self, model: nn.Module) -> nn.Module:
        """Zero every pruned weight of ``model`` in place."""
        params = dict(model.named_parameters())
        self.check_matches(params)
        for name, tensor in self._tensors.items():
            params[name].mul_(tensor.to(params[name].device, params[name].dtype))
        return model


def weight_layers(model: nn.Module) -> list[str]:
    """The weights IMP can prune, in module order: every 2-D conv kernel, every linear weight and the packed
    input projections of attention (2-D weights like any linear layer's)."""
    names = []
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            names.append(f"{prefix}weight")
        elif isinstance(module, nn.MultiheadAttention):
            names += [f"{prefix}{p}" for p in ATTENTION_PROJECTIONS if getattr(module, p) is not None]
    return names


def prunable_names(
    model: nn.Module, include_classifier: bool = False, patterns: Sequence[str] = ()
) -> list[str]:
    """Weights that IMP prunes: every weight layer but the first (the stem) and the last (the classifier, unless
    ``include_classifier``), as for the paper's ResNets; ``patterns`` (fnmatch on parameter names) replaces
    that default with the weight layers they name."""
    layers = weight_layers(model)
    if patterns:
        chosen = [n for n in layers if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
        if not chosen:
            raise InputError(
                f"no weight layer matches {', '.join(patterns)}; the model's are: {', '.join(layers[:8])}"
                + (" ..." if len(layers) > 8 else "")
            )
        return chosen
    if len(layers) < 2:
        raise InputError(f"the model has {len(layers)} conv or linear layer(s); pruning needs at least 2")
    return layers[1:] if include_classifier else layers[1:-1]


def magnitude_prune(weights: Mapping[str, torch.Tensor], mask: Mask, fraction: float) -> Mask:
    """Global magnitude pruning: remove the ``fraction`` of kept weights with the smallest |W|."""
    if not 0.0 <= fraction < 1.0:
        raise InputError(f"pruning fraction must be in [0, 1), got {fraction}")
    names = list(mask)
    scores = torch.cat(
        [torch.where(mask[n], weights[n].detach().abs().float(), torch.inf).flatten() for n in names]
    )
    count = round(fraction * mask.kept())
    drop = torch.zeros_like(scores, dtype=torch.bool)
    drop[torch.topk(scores, count, largest=False).indices] = True
    pruned, start = {}, 0
    for name in names:
        size = mask[name].numel()
        pruned[name] = mask[name] & ~drop[start : start + size].view_as(mask[name])
        start += size
    return Mask(pruned)


def squeeze(conv_mask: torch.Tensor) -> torch.Tensor:
    """(out, in, kh, kw) -> (out, in) connectivity: a channel pair is connected if any kernel weight is kept."""
    if conv_mask.dim() != 4:
        raise InputError(f"squeeze needs a 4-D conv mask, got shape {tuple(conv_mask.shape)}")
    return conv_mask.flatten(2).any(dim=2)


def save_mask(path: str | Path, mask: Mask) -> None:
    save_tensors(path, dict(mask))


def load_mask(path: str | Path) -> Mask:
    """Read a mask from safetensors or a torch file of 0/1 tensors (open_lth's ``mask.pth`` included)."""
    return Mask(load_tensors(path))


def fold_pruning_reparametrisation(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], Mask | None]:
    """torch.nn.utils.prune checkpoints store ``x_orig`` and ``x_mask``; return plain weights and the mask."""
    weights: dict[str, torch.Tensor] = {}
    masks: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if key.endswith(PRUNE_MASK_SUFFIX):
            masks[key.removesuffix(PRUNE_MASK_SUFFIX)] = tensor
        elif key.endswith(PRUNE_ORIG_SUFFIX):
            weights[key.removesuffix(PRUNE_ORIG_SUFFIX)] = tensor
        else:
            weights[key] = tensor
    if not masks:
        return weights, None
    for name, tensor in masks.items():
        if name not in weights:
            raise InputError(f"pruning mask {name}{PRUNE_MASK_SUFFIX} has no matching {name}{PRUNE_ORIG_SUFFIX}")
        if weights[name].shape != tensor.shape:
            raise InputError(f"pruning mask for {name!r} does not match the shape of its weight")
    mask = Mask(masks)
    for name, tensor in mask.items():
        weights[name] = weights[name] * tensor.to(weights[name].dtype)
    return weights, mask


def mask_from_zeros(weights: Mapping[str, torch.Tensor], names: list[str]) -> Mask:
    """For plain checkpoints of sparse models: a weight is kept if it is non-zero."""
    if not names:
        raise InputError("the checkpoint holds no weight matrix or conv kernel, so it is not a model")
    missing = [n for n in names if n not in weights]
    if missing:
        raise InputError(f"the checkpoint lacks weights {', '.join(missing[:5])}")
    return Mask({name: weights[name] != 0 for name in names})
