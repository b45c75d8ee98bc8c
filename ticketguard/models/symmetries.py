"""Channel symmetries of any traceable model: the channels that can be permuted, and rescaled, together without
changing what the model computes, read from its traced data flow instead of a table per family.

The trace is the channel graph's (``channel_graph.FlowTracer``): every conv or linear layer writes a fresh
space of channels, which its readers' input columns, the norms on it and the parameters added to it index; a
residual addition joins the spaces of its operands channel by channel, so they permute as one. A space the
model's input or output reaches, one a grouped conv, a GroupNorm or a zero-padded join touches, and one whose
channels a constant of the forward indexes stay where they are. ``nn.TransformerEncoder(Layer)`` is read as a
block: the residual stream, the feed-forward hidden units and the attention heads, which permute as blocks of
their query, key and value rows and output-projection columns (permutations inside a head are not followed).

A space can also be rescaled by a positive factor per channel when exactly one layer writes it and either a
BatchNorm normalises that layer's output directly (``batchnorm``: the norm absorbs the factor) or every path to
its readers commutes with the factor (``relu``: ReLU, pooling, flatten; the readers' columns take the inverse).

Alignment (``ticketguard.verification.align``) undoes these symmetries in a suspect, the disguises apply them:
both through ``permute_channels`` and ``scale_channels``.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Literal

import torch
import torch.nn.functional as F
from torch import fx, nn

from ticketguard.core.masks import Mask
from ticketguard.models.channel_graph import CONVS, Flow, FlowTracer

Weights = dict[str, torch.Tensor]
Role = Literal["writes", "reads", "norm", "other"]

HOMOGENEOUS_MODULES = (
    nn.ReLU,
    nn.LeakyReLU,
    nn.Identity,
    nn.modules.dropout._DropoutNd,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
)
HOMOGENEOUS_OPERATIONS = {
    F.relu,
    torch.relu,
    F.leaky_relu,
    F.dropout,
    F.max_pool1d,
    F.max_pool2d,
    F.avg_pool1d,
    F.avg_pool2d,
    F.adaptive_avg_pool1d,
    F.adaptive_avg_pool2d,
    F.adaptive_max_pool1d,
    F.adaptive_max_pool2d,
    "relu",
    "contiguous",
    "clone",
    "float",
    "to",
    "type_as",
}
SCALING_JOINS = {"mul", "truediv", "div"}  # by a constant, these commute with a per-channel scale


@dataclass(frozen=True)
class ChannelAxis:
    """Where a symmetry's channels sit in one tensor: channel i occupies ``positions[i]`` along ``dim``
    (one position for a conv's output channel, several for a flattened channel or an attention head)."""

    key: str
    dim: int
    positions: torch.Tensor
    role: Role


@dataclass(frozen=True)
class Symmetry:
    """Channels that move together; ``scaling`` says how a positive per-channel factor can be undone, and
    ``batchnorm`` names the (module, eps) that absorbs it."""

    name: str
    size: int
    axes: tuple[ChannelAxis, ...]
    scaling: Literal["batchnorm", "relu"] | None = None
    batchnorm: tuple[str, float] | None = None

    def writers(self) -> list[ChannelAxis]:
        return [axis for axis in self.axes if axis.role == "writes"]


@dataclass(frozen=True)
class _Constant:
    """A tensor the forward reads by name (``key``: a parameter or buffer of the model, else None)."""

    key: str | None
    shape: tuple[int, ...] | None


class _SymmetryTracer(FlowTracer):
    """The flow tracer recording, per tensor axis, which space's channels it indexes."""

    needs = "channel alignment"
    fallback = "the suspect is read by name and position"

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model, model.state_dict(), Mask({}))
        self.space_of: list[int] = []
        self.index_of: list[int] = []
        self.sizes: list[int] = []
        self.parent: list[int] = []
        self.fixed: set[int] = set()
        self.unscalable: set[int] = set()
        self.batchnorm_of: dict[int, tuple[str, float]] = {}
        self.names: dict[int, str] = {}
        self.records: list[tuple[str, int, torch.Tensor, Role]] = []
        self.written: set[str] = set()

    # ---- spaces ---------------------------------------------------------------------------------------

    def fresh(self, size: int) -> torch.Tensor:
        space = len(self.sizes)
        self.sizes.append(size)
        self.parent.append(space)
        self.space_of += [space] * size
        self.index_of += list(range(size))
        return super().fresh(size)

    def find(self, space: int) -> int:
        while self.parent[space] != space:
            self.parent[space] = self.parent[self.parent[space]]
            space = self.parent[space]
        return space

    def spaces(self, vertices: torch.Tensor) -> set[int]:
        return {self.find(self.space_of[v]) for v in vertices.tolist() if v >= 0}

    def unite(self, first: torch.Tensor, second: torch.Tensor) -> None:
        """Channel i of both activations is one channel: their spaces become one, or stay put if the
        channels do not line up one to one (a zero-padded shortcut)."""
        aligned = first.numel() == second.numel() and bool(((first >= 0) & (second >= 0)).all())
        if aligned:
            index = torch.tensor(self.index_of)
            aligned = torch.equal(index[first], index[second])
        touched = self.spaces(first) | self.spaces(second)
        if not aligned or len({self.sizes[s] for s in touched}) > 1:
            self.fixed |= touched
            return
        root, *others = sorted(touched)
        for space in others:
            self.parent[space] = root
            for mark in (self.fixed, self.unscalable):
                if space in mark:
                    mark.add(root)
        self.unscalable.add(root)  # written by several layers

    def record(self, key: str, dim: int, vertices: torch.Tensor, role: Role) -> None:
        if key in self.weights:
            self.records.append((key, dim, vertices, role))

    # ---- what the flow tracer calls -------------------------------------------------------------------

    def attribute(self, target: str) -> object:
        state = self.weights.get(target)
        return _Constant(None, None) if state is None else _Constant(target, tuple(state.shape))

    def layer(self, path: str, module: nn.Module, flow: Flow) -> Flow:
        key = f"{path}.weight"
        if key in self.written:
            raise self.unsupported(f"module {path!r}, which is applied twice (shared weights)")
        self.written.add(key)
        conv = isinstance(module, CONVS)
        groups = module.groups if conv else 1
        axis = -len(module.kernel_size) - 1 if conv else -1
        inputs = self.fan_in(flow, module.weight.shape[1] * groups, axis, path)
        outputs = self.fresh(module.weight.shape[0])
        self.names[self.space_of[int(outputs[0])]] = path
        if groups != 1:
            self.fixed |= self.spaces(inputs) | self.spaces(outputs)
        else:
            self.record(key, 1, inputs, "reads")
        if not flow.homogeneous:
            self.unscalable |= self.spaces(inputs)
        self.record(key, 0, outputs, "writes")
        self.record(f"{path}.bias", 0, outputs, "writes")
        rank = flow.rank if flow.rank is not None or not conv else len(module.kernel_size) + 2
        return Flow(outputs, axis, rank, written_by=key)

    def join(self, operands: list[object], name: str) -> Flow:
        flows = [f for f in operands if isinstance(f, Flow)]
        if len(flows) == 1:
            flow = flows[0]
            for constant in (c for c in operands if isinstance(c, _Constant)):
                self.constant(constant, flow)
            return replace(flow, homogeneous=flow.homogeneous and name in SCALING_JOINS, written_by=None)
        rank = self.joined_rank(flows, name)
        for other in flows[1:]:
            self.unite(flows[0].vertices, other.vertices)
        return Flow(flows[0].vertices, flows[0].axis, rank, homogeneous=False)

    def constant(self, constant: _Constant, flow: Flow) -> None:
        """A tensor added to or multiplied into an activation indexes its channels where it is not
        broadcast along them: a parameter is recorded, anything else pins the channels."""
        dim = None if constant.shape is None else len(constant.shape) + flow.axis
        if dim is not None and (dim < 0 or constant.shape[dim] == 1):
            return
        self.unscalable |= self.spaces(flow.vertices)
        if dim is None or constant.key is None or constant.shape[dim] != flow.vertices.numel():
            self.fixed |= self.spaces(flow.vertices)
        else:
            self.record(constant.key, dim, flow.vertices, "other")

    def module(
        self, path: str, module: nn.Module, args: Sequence[object], kwargs: Mapping[str, object]
    ) -> object:
        flow = args[0] if args else next(iter(kwargs.values()))
        if not isinstance(flow, Flow) or flow.vertices is None:
            return super().module(path, module, args, kwargs)
        if isinstance(module, nn.TransformerEncoder):
            for index, layer in enumerate(module.layers):
                flow = self.encoder_layer(f"{path}.layers.{index}", layer, flow)
            if module.norm is not None:
                self.norm(f"{path}.norm", flow.vertices)
            return flow
        if isinstance(module, nn.TransformerEncoderLayer):
            return self.encoder_layer(path, module, flow)
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            self.norm(path, flow.vertices)
            if flow.written_by is not None and module.track_running_stats:
                for space in self.spaces(flow.vertices):
                    self.batchnorm_of[space] = (path, module.eps)
            return replace(flow, written_by=None)
        if isinstance(module, (nn.LayerNorm, nn.modules.instancenorm._InstanceNorm)):
            self.norm(path, flow.vertices)
            return replace(flow, homogeneous=False, written_by=None)
        if isinstance(module, nn.GroupNorm):
            self.fixed |= self.spaces(flow.vertices)
            return replace(flow, homogeneous=False, written_by=None)
        result = super().module(path, module, args, kwargs)
        if isinstance(result, Flow) and result is flow and not isinstance(module, nn.Identity):
            return replace(
                flow,
                homogeneous=flow.homogeneous and isinstance(module, HOMOGENEOUS_MODULES),
                written_by=None,
            )
        return result

    def operation(self, node: fx.Node, args: Sequence[object], kwargs: Mapping[str, object]) -> object:
        """A pass-through function keeps the channels; unless it commutes with a scale, no longer the units."""
        result = super().operation(node, args, kwargs)
        if not isinstance(result, Flow) or result.vertices is None:
            return result
        passed = bool(args) and result is args[0]
        homogeneous = result.homogeneous and (not passed or node.target in HOMOGENEOUS_OPERATIONS)
        return replace(result, homogeneous=homogeneous, written_by=None)

    def norm(self, path: str, vertices: torch.Tensor) -> None:
        """A norm's per-channel entries move with the channels; its statistics pin their units."""
        for entry in ("weight", "bias", "running_mean", "running_var"):
            self.record(f"{path}.{entry}", 0, vertices, "norm")
        self.unscalable |= self.spaces(vertices)

    def encoder_layer(self, path: str, layer: nn.TransformerEncoderLayer, flow: Flow) -> Flow:
        """One encoder layer on a (N, T, E) stream: attention and feed-forward write back into it."""
        attention = layer.self_attn
        width, heads = attention.embed_dim, attention.num_heads
        stream = self.fan_in(flow, width, -1, path)
        if not attention._qkv_same_embed_dim:
            raise self.unsupported(f"module {path!r}, whose attention projects keys and values apart")
        head = self.fresh(heads)
        self.names[self.space_of[int(head[0])]] = f"{path}.self_attn.heads"
        rows = head[(torch.arange(3 * width) % width) // (width // heads)]
        self.record(f"{path}.self_attn.in_proj_weight", 1, stream, "reads")
        self.record(f"{path}.self_attn.in_proj_weight", 0, rows, "other")
        self.record(f"{path}.self_attn.in_proj_bias", 0, rows, "other")
        self.record(f"{path}.self_attn.out_proj.weight", 1, rows[:width], "other")
        self.record(f"{path}.self_attn.out_proj.weight", 0, stream, "other")
        self.record(f"{path}.self_attn.out_proj.bias", 0, stream, "other")
        self.written |= {
            f"{path}.self_attn.out_proj.weight",
            f"{path}.linear1.weight",
            f"{path}.linear2.weight",
        }
        self.norm(f"{path}.norm1", stream)
        self.norm(f"{path}.norm2", stream)
        hidden = self.fresh(layer.linear1.out_features)
        self.names[self.space_of[int(hidden[0])]] = f"{path}.linear1"
        self.record(f"{path}.linear1.weight", 1, stream, "reads")
        self.record(f"{path}.linear1.weight", 0, hidden, "writes")
        self.record(f"{path}.linear1.bias", 0, hidden, "writes")
        self.record(f"{path}.linear2.weight", 1, hidden, "reads")
        self.record(f"{path}.linear2.weight", 0, stream, "other")
        self.record(f"{path}.linear2.bias", 0, stream, "other")
        if getattr(layer, "activation_relu_or_gelu", 0) != 1:  # 1: ReLU, which commutes with a scale
            self.unscalable |= self.spaces(hidden)
        self.unscalable |= self.spaces(stream)
        return Flow(stream, -1, flow.rank, homogeneous=False)

    # ---- the result -----------------------------------------------------------------------------------

    def symmetries(self) -> list[Symmetry]:
        outputs = self.walk()
        for vertices in [*self.inputs.values(), *(f.vertices for f in outputs)]:
            self.fixed |= self.spaces(vertices)
        space = torch.tensor([self.find(s) for s in self.space_of])
        index = torch.tensor(self.index_of)
        found: dict[int, dict[tuple[str, int, Role], list[tuple[int, int]]]] = defaultdict(
            lambda: defaultdict(list)
        )
        for key, dim, vertices, role in self.records:
            real = (vertices >= 0).nonzero().squeeze(1)
            for position, vertex in zip(real.tolist(), vertices[real].tolist(), strict=True):
                found[int(space[vertex])][(key, dim, role)].append((int(index[vertex]), position))
        fixed = {self.find(s) for s in self.fixed}
        result = []
        for root in sorted(found):
            axes = [
                _axis(key, dim, role, pairs, self.sizes[root])
                for (key, dim, role), pairs in found[root].items()
            ]
            if root in fixed or any(a is None for a in axes) or self.sizes[root] < 2:
                continue
            result.append(self.symmetry(root, axes))
        return result

    def symmetry(self, root: int, axes: list[ChannelAxis]) -> Symmetry:
        writers = {a.key for a in axes if a.role == "writes" and a.key.endswith("weight")}
        scaling, batchnorm = None, None
        if len(writers) == 1 and root not in {self.find(s) for s in self.unscalable}:
            scaling = "relu" if all(a.role in ("writes", "reads") for a in axes) else None
        if len(writers) == 1 and root in self.batchnorm_of and not any(a.role == "other" for a in axes):
            scaling, batchnorm = "batchnorm", self.batchnorm_of[root]
        return Symmetry(
            self.names.get(root, f"space {root}"), self.sizes[root], tuple(axes), scaling, batchnorm
        )


def _axis(key: str, dim: int, role: Role, pairs: list[tuple[int, int]], size: int) -> ChannelAxis | None:
    """The positions of each channel along the axis; None when the channels do not occur equally often."""
    pairs.sort()
    channels = torch.tensor([c for c, _ in pairs])
    counts = torch.bincount(channels, minlength=size)
    if len(pairs) % size or not bool((counts == len(pairs) // size).all()):
        return None
    positions = torch.tensor([p for _, p in pairs]).view(size, -1)
    return ChannelAxis(key, dim, positions, role)


def channel_symmetries(model: nn.Module) -> list[Symmetry]:
    """Every channel symmetry of ``model`` that its traced forward shows (build it on the meta device: only
    its structure is read)."""
    return _SymmetryTracer(model).symmetries()


def permute_channels(
    weights: Mapping[str, torch.Tensor], symmetries: Sequence[Symmetry], perms: Mapping[str, torch.Tensor]
) -> Weights:
    """The weights with channel i of each symmetry taken from its channel ``perms[name][i]``."""
    result = dict(weights)
    for symmetry in symmetries:
        perm = perms.get(symmetry.name)
        if perm is None:
            continue
        for axis in symmetry.axes:
            tensor = result[axis.key]
            taken = tensor.index_select(axis.dim, axis.positions[perm].flatten())
            result[axis.key] = tensor.index_copy(axis.dim, axis.positions.flatten(), taken)
    return result


def scale_channels(weights: Mapping[str, torch.Tensor], symmetry: Symmetry, scale: torch.Tensor) -> Weights:
    """The weights with the symmetry's channels written ``scale`` times larger (scale > 0) and the model's
    function unchanged: the BatchNorm reads them in the new units, or the readers take 1 / scale."""
    if symmetry.scaling is None:
        raise ValueError(f"the channels of {symmetry.name} cannot be rescaled without changing the function")
    result = dict(weights)
    for axis in symmetry.axes:
        if axis.role == "writes":
            factor = scale
        elif axis.role == "reads" and symmetry.scaling == "relu":
            factor = 1 / scale
        else:
            continue
        tensor = result[axis.key]
        per_position = torch.ones(tensor.shape[axis.dim], dtype=tensor.dtype)
        per_position[axis.positions.flatten()] = factor.to(tensor.dtype).repeat_interleave(
            axis.positions.shape[1]
        )
        shape = [1] * tensor.dim()
        shape[axis.dim] = -1
        result[axis.key] = tensor * per_position.view(shape)
    if symmetry.batchnorm is not None:
        result.update(batchnorm_reading(result, *symmetry.batchnorm, scale))
    return result


def batchnorm_reading(
    weights: Mapping[str, torch.Tensor], batchnorm: str, eps: float, scale: torch.Tensor
) -> Weights:
    """The BatchNorm entries for which BN'(scale · y) == BN(y) in eval mode: mean and var scaled, and gamma
    absorbing eps, which no state_dict entry holds (exact up to float rounding)."""
    gamma, mean, var = (weights[f"{batchnorm}.{e}"] for e in ("weight", "running_mean", "running_var"))
    scale = scale.to(var.dtype)
    new_var = var * scale**2
    return {
        f"{batchnorm}.running_mean": mean * scale,
        f"{batchnorm}.running_var": new_var,
        f"{batchnorm}.weight": gamma * torch.sqrt(new_var + eps) / (scale * torch.sqrt(var + eps)),
    }
