"""Function-preserving disguises: what a thief does for free to scramble every position-based watermark.

Each disguise is ``disguise(weights, mask, **params) -> (weights, mask)``, the attack interface of attacks.py,
so that the registry ``DISGUISES`` can join ``ATTACKS``: ``weights`` is the full state_dict of a registered
ResNet, ``mask`` covers its prunable weights, and the returned mask marks the same weights at their new
places.
In eval mode the disguised network computes the same logits as the original, up to float rounding:

- ``permute`` reorders channels within every permutation group (``permutation_groups``);
- ``rescale`` multiplies conv output channels by positive scales that the next BatchNorm undoes exactly;
- ``fold-bn`` folds every BatchNorm into its conv (a BN-free network: run it with ``build_disguised``);
- ``rename`` renames and reorders the keys;
- ``widen`` adds dummy and split hidden channels (run it with ``build_disguised``).

``permute``, ``rescale``, ``fold-bn`` and ``widen`` read the structure from the registered architecture, so
they take its exact state_dict: in a chain, ``permute`` and ``rescale`` come first, then at most one of
``fold-bn`` and ``widen``, then ``rename``.
``export_onnx`` is the last disguise, a file rather than weights.
"""

from __future__ import annotations

import importlib.util
import itertools
import math
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from ticketguard.errors import InputError
from ticketguard.files import atomic_path
from ticketguard.masks import Mask
from ticketguard.models import MODELS, build_model, identify_architecture
from ticketguard.models.cifar_resnet import CifarResNet

Weights = dict[str, torch.Tensor]
Disguise = Callable[..., tuple[Weights, Mask]]
Architecture = tuple[str, int, int]

BN_PARAMETERS = ("weight", "bias", "running_mean", "running_var")
BN_STATE = (*BN_PARAMETERS, "num_batches_tracked")
CIFAR_STEM_NAMES = {"conv": "conv1", "bn": "bn1"}  # torchvision's names for the CIFAR ResNet stem


@dataclass
class PermutationGroup:
    """Channels that move together: along every (key, dim) of ``axes``, index i is the same channel.

    A ``stream`` group is the residual stream of a stage (every conv writing into it, their BatchNorms, every
    consumer's input channels, the classifier's input); a ``hidden`` group is a block's inner channels.
    ``embeds`` = (group, offset) marks an option-A stream: its channels offset.. are the earlier stream's
    channels carried by the parameter-free shortcut, so they keep that stream's order; only the zero-padded
    channels around them may move freely.
    """

    name: str
    kind: Literal["stream", "hidden"]
    size: int
    axes: list[tuple[str, int]] = field(default_factory=list)
    embeds: tuple[str, int] | None = None


def _architecture(weights: Mapping[str, torch.Tensor], disguise: str) -> Architecture:
    architecture = identify_architecture(dict(weights))
    if architecture is None:
        raise InputError(
            f"{disguise} needs the exact state_dict of a registered architecture; in a chain, put it "
            "before fold-bn, widen and rename"
        )
    return architecture


def _probe(architecture: Architecture) -> nn.Module:
    """The architecture's modules without memory: structure only."""
    with torch.device("meta"):
        return build_model(*architecture)


def conv_bn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """(conv, BatchNorm) module names: each BN normalises the conv registered just before it."""
    pairs, last_conv = [], None
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            last_conv = name
        elif isinstance(module, nn.BatchNorm2d) and last_conv is not None:
            pairs.append((last_conv, name))
    return pairs


def _blocks(model: nn.Module) -> tuple[str, nn.Sequential]:
    """The residual blocks and their state_dict prefix."""
    return ("blocks", model.blocks) if isinstance(model, CifarResNet) else ("layers", model.layers)


def _written(conv: str, bn: str) -> list[tuple[str, int]]:
    """The axes that index the output channels of ``conv`` followed by ``bn``."""
    return [(f"{conv}.weight", 0), *((f"{bn}.{entry}", 0) for entry in BN_PARAMETERS)]


def permutation_groups(architecture: Architecture) -> list[PermutationGroup]:
    """Every channel permutation symmetry of a registered ResNet, each group after the one it embeds."""
    model = _probe(architecture)
    bn_of = dict(conv_bn_pairs(model))
    stem = next(iter(bn_of))
    stream = PermutationGroup("stream.0", "stream", model.get_submodule(stem).out_channels)
    stream.axes += _written(stem, bn_of[stem])
    groups = [stream]
    prefix, blocks = _blocks(model)
    for index, block in enumerate(blocks):
        name = f"{prefix}.{index}"
        convs = [f"{name}.{child}" for child, m in block.named_children() if isinstance(m, nn.Conv2d)]
        stream.axes.append((f"{convs[0]}.weight", 1))
        for number, (producer, consumer) in enumerate(itertools.pairwise(convs), 1):
            hidden = PermutationGroup(
                f"{name}.hidden{number}", "hidden", model.get_submodule(producer).out_channels
            )
            hidden.axes += [*_written(producer, bn_of[producer]), (f"{consumer}.weight", 1)]
            groups.append(hidden)
        width = model.get_submodule(convs[-1]).out_channels
        if isinstance(getattr(block, "shortcut", None), nn.Sequential):
            stream.axes.append((f"{name}.shortcut.0.weight", 1))
            stream = PermutationGroup(f"stream.{len(groups)}", "stream", width)
            stream.axes += _written(f"{name}.shortcut.0", f"{name}.shortcut.1")
            groups.append(stream)
        elif getattr(block, "extra_channels", 0):
            embeds = (stream.name, block.extra_channels // 2)
            stream = PermutationGroup(f"stream.{len(groups)}", "stream", width, embeds=embeds)
            groups.append(stream)
        stream.axes += _written(convs[-1], bn_of[convs[-1]])
    stream.axes.append(("fc.weight", 1))
    return groups


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
    groups = permutation_groups(_architecture(weights, "permute"))
    orders = _draw_permutations(groups, torch.Generator().manual_seed(seed))
    return _reorder(weights, groups, orders), Mask(_reorder(mask, groups, orders))


def _scales(size: int, spread: float, factor: float | None, generator: torch.Generator) -> torch.Tensor:
    if factor is not None:
        return torch.full((size,), float(factor), dtype=torch.float64)
    log_spread = math.log(spread)
    return torch.exp((torch.rand(size, generator=generator, dtype=torch.float64) * 2 - 1) * log_spread)


def _rescaled_bn(
    weights: Weights, conv: str, bn: str, scale: torch.Tensor, eps: float
) -> dict[str, torch.Tensor]:
    """The entries for which BN'(s·x) == BN(x) in eval mode: mean s·mu, var s²·var and
    gamma' = gamma·sqrt(s²·var + eps) / (s·sqrt(var + eps)).

    Scaling mean and var alone would be exact only without eps, which is no state_dict entry; the gamma
    term absorbs it, so every entry stays plausible (var >= 0) and the result is exact up to float rounding.
    """
    kernel, mean, var, gamma = (
        weights[k].double()
        for k in (f"{conv}.weight", f"{bn}.running_mean", f"{bn}.running_var", f"{bn}.weight")
    )
    new_var = var * scale**2
    return {
        f"{conv}.weight": kernel * scale.view(-1, 1, 1, 1),
        f"{bn}.running_mean": mean * scale,
        f"{bn}.running_var": new_var,
        f"{bn}.weight": gamma * torch.sqrt(new_var + eps) / (scale * torch.sqrt(var + eps)),
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
    architecture = _architecture(weights, "rescale")
    model = _probe(architecture)
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
    model = _probe(_architecture(weights, "fold-bn"))
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


def _stage_positions(blocks: nn.Sequential) -> list[tuple[int, int]]:
    """(stage from 1, index in stage) per block: a stage starts at each block that downsamples."""
    positions, stage, index = [], 1, 0
    for number, block in enumerate(blocks):
        downsamples = any(m.stride != (1, 1) for m in block.modules() if isinstance(m, nn.Conv2d))
        if number and downsamples:
            stage, index = stage + 1, 0
        positions.append((stage, index))
        index += 1
    return positions


def _model_named_by(weights: Mapping[str, torch.Tensor]) -> str:
    """The registered model whose conv kernels ``weights`` names, whatever their widths or BN folding."""
    kernels = {key for key, tensor in weights.items() if key.endswith(".weight") and tensor.dim() == 4}
    for name in MODELS:
        probe = _probe((name, 3, 10))
        if kernels == {f"{n}.weight" for n, m in probe.named_modules() if isinstance(m, nn.Conv2d)}:
            return name
    raise InputError("rename to torchvision names needs the layer names of a registered architecture")


def _torchvision_names(keys: list[str], model: str) -> dict[str, str]:
    """torchvision's names: ``blocks.6.conv1`` -> ``layer3.0.conv1``, ``shortcut`` -> ``downsample``."""
    prefix, blocks = _blocks(_probe((model, 3, 10)))
    positions = _stage_positions(blocks)
    names = {}
    for key in keys:
        head, rest = key.split(".", 1)
        if head == prefix:
            block, rest = rest.split(".", 1)
            stage, index = positions[int(block)]
            names[key] = f"layer{stage}.{index}.{rest.replace('shortcut.', 'downsample.')}"
        else:
            names[key] = f"{CIFAR_STEM_NAMES.get(head, head)}.{rest}"
    return names


def _opaque_names(keys: list[str], seed: int) -> dict[str, str]:
    """Unique random 8-hex-digit names that say nothing of the layer."""
    tokens = random.Random(seed).sample(range(16**8), len(keys))
    return {key: f"p{token:08x}" for key, token in zip(keys, tokens)}


def rename(
    weights: Mapping[str, torch.Tensor],
    mask: Mask,
    *,
    style: Literal["torchvision", "opaque"] = "torchvision",
    seed: int = 0,
) -> tuple[Weights, Mask]:
    """Rename every key (torchvision's layer names, or opaque random ones) and shuffle their order.

    Names are read from the keys alone, so ``rename`` also follows ``fold-bn`` and ``widen`` in a chain.
    """
    keys = list(weights)
    if style == "torchvision":
        names = _torchvision_names(keys, _model_named_by(weights))
    elif style == "opaque":
        names = _opaque_names(keys, seed)
    else:
        raise InputError(f"rename style must be torchvision or opaque, got {style!r}")
    order = torch.randperm(len(keys), generator=torch.Generator().manual_seed(seed)).tolist()
    shuffled = [keys[i] for i in order]
    return (
        {names[key]: weights[key] for key in shuffled},
        Mask({names[key]: mask[key] for key in shuffled if key in mask}),
    )


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
    groups = [g for g in permutation_groups(_architecture(weights, "widen")) if g.kind == "hidden"]
    if splits > min(g.size for g in groups):
        raise InputError(
            f"widen can split at most {min(g.size for g in groups)} channels per block, got {splits}"
        )
    generator = torch.Generator().manual_seed(seed)
    result, kept = dict(weights), dict(mask)
    for group in groups:
        _widen_group(result, kept, group, dummies, splits, generator)
    return result, Mask(kept)


def build_disguised(weights: Mapping[str, torch.Tensor], architecture: Architecture) -> nn.Module:
    """The registered architecture reshaped to run disguised weights, loaded with copies of them.

    Every conv, BatchNorm and linear layer takes the width its weights have (``widen``); a BatchNorm without
    entries becomes an identity and its conv gets a bias (``fold-bn``). Strides, padding and shortcuts stay.
    Built on the meta device and then given the weights, so no initialisation is computed and thrown away.
    """
    model = _probe(architecture)
    with torch.device("meta"):
        for name, module in list(model.named_modules()):
            replacement = _reshaped(name, module, weights)
            if replacement is not None:
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent), child, replacement)
    model.load_state_dict({key: tensor.clone() for key, tensor in weights.items()}, assign=True)
    return model


def _reshaped(name: str, module: nn.Module, weights: Mapping[str, torch.Tensor]) -> nn.Module | None:
    """``module`` as wide as ``weights`` say, an identity for a folded BatchNorm; None for other modules."""
    kernel = weights.get(f"{name}.weight")
    if isinstance(module, nn.Conv2d):
        out_channels, in_channels = kernel.shape[:2]
        bias = f"{name}.bias" in weights
        return nn.Conv2d(
            in_channels, out_channels, module.kernel_size, module.stride, module.padding, bias=bias
        )
    if isinstance(module, nn.BatchNorm2d):
        return nn.Identity() if kernel is None else nn.BatchNorm2d(len(kernel), module.eps)
    if isinstance(module, nn.Linear):
        return nn.Linear(kernel.shape[1], kernel.shape[0])
    return None


def export_onnx(model: nn.Module, path: str | Path, input_shape: tuple[int, int, int], dynamo: bool) -> None:
    """Export ``model`` in eval mode to one self-contained ONNX file (batch size 1), written atomically.

    ``dynamo`` picks torch's dynamo exporter (needs onnxscript) over the TorchScript one. Both fold BatchNorm
    into the convs, so the file holds ``fold_bn``'s tensors under the exporter's own names.
    """
    if dynamo and importlib.util.find_spec("onnxscript") is None:
        raise InputError(
            "the dynamo ONNX exporter needs onnxscript: pip install onnxscript, or use dynamo=False"
        )
    example = (torch.zeros(1, *input_shape, device=next(model.parameters()).device),)
    training = model.training
    model.eval()
    try:
        with atomic_path(path) as tmp:
            options = {"external_data": False, "verbose": False} if dynamo else {}
            torch.onnx.export(
                model,
                example,
                str(tmp),
                dynamo=dynamo,
                input_names=["input"],
                output_names=["logits"],
                **options,
            )
    finally:
        model.train(training)


DISGUISES: dict[str, Disguise] = {
    "permute": permute,
    "rescale": rescale,
    "fold-bn": fold_bn,
    "rename": rename,
    "widen": widen,
}
