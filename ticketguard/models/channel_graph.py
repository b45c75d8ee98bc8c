"""The channel graph of a model (V1's EWP and betweenness scores), traced with torch.fx.

It follows the real data flow of the model, traced with torch.fx:

- a vertex is one channel of one activation; the channels of the model's input, as the first layer that
  reads it sees them (image channels for a conv, features for a linear layer), are the sources, the
  model's outputs the sinks;
- every conv and linear layer, the stem included, adds fresh vertices for its output channels and an edge
  (in -> out) per channel pair with at least one kept weight; its strength is the sum of |W⊙M| over the
  weights joining the pair. A grouped or depthwise conv joins channels within a group only. Tensors outside
  the mask (stem, classifier by default) count as fully kept;
- a join of two activations (residual addition, element-wise product) adds fresh vertices with an edge of
  strength 1 from each operand's channel: identity shortcuts map channel c to c, option-A shortcuts of
  ResNet-20/32/56 subsample (no effect on channels) and zero-pad (padded channels have no vertex, so no
  edge), projection shortcuts of ResNet-18/50 are convs; a concatenation along the channel dim lines up
  its operands' vertices;
- normalisation, activations, dropout, pooling and adding a constant (a bias, a position embedding) pass
  channels through unchanged: they add no connection the next training run does not re-learn.

Where the channels sit is tracked per activation, counted from the end (-3 for N, C, H, W; -1 for a linear
layer's features, also on N, T, C token tensors), so flatten, transpose and reductions over other dims
move it correctly. A flatten that folds the channel into dims of unknown size (N, C, H, W -> N, C·H·W)
repeats each channel; the next linear layer's fan-in tells how often. Operations the graph cannot
follow, such as a product of two activations' matrices in attention, raise ``InputError``: OMP and random
scores need no graph and keep working.

Because every layer's output vertices are fresh, the edge blocks are in topological order, and path sums
need one pass forward and one backward.
"""

from __future__ import annotations

import builtins
import operator
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from functools import partial

import torch
import torch.nn.functional as F
from torch import fx, nn

from ticketguard.core.errors import InputError
from ticketguard.core.masks import Mask
from ticketguard.models import build_model, identify_architecture

CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
PASS_THROUGH_MODULES = (
    nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm, nn.LayerNorm, nn.GroupNorm,
    nn.modules.dropout._DropoutNd, nn.Identity, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.ELU,
    nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Softmax, nn.LogSoftmax, nn.Upsample,
    nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
)
PASS_THROUGH_FUNCTIONS = {
    F.relu, torch.relu, F.relu6, F.leaky_relu, F.gelu, F.silu, F.elu, F.hardswish, torch.sigmoid, F.sigmoid,
    torch.tanh, F.tanh, F.softmax, F.log_softmax, torch.softmax, F.dropout, F.layer_norm, F.group_norm,
    F.batch_norm, F.interpolate, F.max_pool1d, F.max_pool2d, F.avg_pool1d, F.avg_pool2d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_max_pool1d, F.adaptive_max_pool2d,
}
PASS_THROUGH_METHODS = {
    "relu", "sigmoid", "tanh", "softmax", "log_softmax", "contiguous", "clone", "float", "to", "type_as",
}
JOIN_FUNCTIONS = {
    operator.add, operator.iadd, operator.sub, operator.mul, operator.truediv,
    torch.add, torch.sub, torch.mul, torch.div,
}
FUNCTION_OPS = {
    torch.flatten: "flatten", torch.reshape: "reshape", torch.transpose: "transpose",
    torch.permute: "permute", torch.cat: "cat", torch.concat: "cat", F.pad: "pad",
    operator.getitem: "getitem", builtins.getattr: "size",
    torch.mean: "reduce", torch.sum: "reduce", torch.amax: "reduce", torch.amin: "reduce",
    **{function: "join" for function in JOIN_FUNCTIONS},
    **{function: "same" for function in PASS_THROUGH_FUNCTIONS},
}
METHOD_OPS = {
    "flatten": "flatten", "view": "reshape", "reshape": "reshape", "transpose": "transpose",
    "permute": "permute", "mean": "reduce", "sum": "reduce", "amax": "reduce", "amin": "reduce",
    "size": "size", "dim": "size", "add": "join", "sub": "join", "mul": "join", "div": "join",
    **{method: "same" for method in PASS_THROUGH_METHODS},
}




class _Unknown:
    """A traced value that is no activation (a size, a parameter): the graph ignores it."""

    def __repr__(self) -> str:
        return "a computed value"


UNKNOWN = _Unknown()


@dataclass(frozen=True)
class Flow:
    """One activation as the graph sees it: the vertex of each channel (-1: a zero-padded channel).

    ``axis`` is the channel dim counted from the end and ``rank`` the number of dims where known. ``spread``
    is set when a flatten repeated each channel over dims of unknown size: "interleave" when the channel is
    the outer dim (N, C, H, W -> N, C·H·W), "tile" when it is the inner one (N, T, C -> N, T·C). ``vertices``
    is None for the model input ``input`` until a layer reads it and so tells its channel count.
    ``homogeneous`` (every operation since the channels were written commutes with a positive per-channel
    scale, as ReLU and pooling do) and ``written_by`` (the layer whose untouched output this is) serve the
    tracer of channel symmetries.
    """

    vertices: torch.Tensor | None
    axis: int | None
    rank: int | None
    spread: str | None = None
    input: str | None = None
    homogeneous: bool = True
    written_by: str | None = None


@dataclass(frozen=True)
class EdgeBlock:
    """Edges into fresh vertices: one weighted layer (``name`` set) or one join of activations (no name).

    ``in_vertices[o, j]`` is the vertex that weight column (o, j) reads (-1: none) and ``edge_of[o, j]`` its
    edge in this block (-1: none, as all its weights are pruned or it reads a zero-padded channel).
    """

    name: str | None
    source: torch.Tensor
    target: torch.Tensor
    strength: torch.Tensor
    in_vertices: torch.Tensor
    out_vertices: torch.Tensor
    edge_of: torch.Tensor


@dataclass(frozen=True)
class ChannelGraph:
    """The DAG of channels; ``blocks`` are in topological order."""

    vertices: int
    inputs: torch.Tensor
    outputs: torch.Tensor
    blocks: list[EdgeBlock]

    def layer(self, name: str) -> EdgeBlock:
        block = next((b for b in self.blocks if b.name == name), None)
        if block is None:
            raise InputError(f"mask tensor {name} is no conv or linear weight on the model's data flow")
        return block

    def edges(self) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.cat([b.source for b in self.blocks]), torch.cat([b.target for b in self.blocks])


def _argument(
    args: Sequence[object], kwargs: Mapping[str, object], index: int, name: str, default: object
) -> object:
    """Argument ``name`` of a traced call, given by position ``index`` or by keyword."""
    return args[index] if len(args) > index else kwargs.get(name, default)


def _sizes(args: Sequence[object]) -> tuple[object, ...]:
    """The dims of ``x.view(2, 3)``, ``x.view((2, 3))`` and ``torch.permute(x, (0, 2, 1))`` alike."""
    return tuple(args[1]) if len(args) == 2 and isinstance(args[1], (tuple, list)) else tuple(args[1:])


def _flows(value: object) -> list[Flow]:
    found: list[Flow] = []
    fx.node.map_aggregate(value, lambda v: found.append(v) if isinstance(v, Flow) else None)
    return found


class FlowTracer:
    """One pass over the fx graph: every node becomes a Flow (or UNKNOWN), every layer and join a block.

    The walk over the graph and the bookkeeping of channel positions are shared with the tracer of channel
    symmetries (``ticketguard.models.symmetries``), which overrides what a layer and a join record.
    """

    needs = "EWP and betweenness"
    fallback = "OMP and random scores keep working for this model"

    def __init__(self, model: nn.Module, weights: Mapping[str, torch.Tensor], mask: Mask) -> None:
        self.model, self.weights, self.mask = model, weights, mask
        self.count = 0
        self.blocks: list[EdgeBlock] = []
        self.inputs: dict[str, torch.Tensor] = {}

    def unsupported(self, what: str) -> InputError:
        return InputError(
            f"{self.needs} cannot follow {what} in the channel graph of {type(self.model).__name__}; "
            f"{self.fallback}"
        )

    def fresh(self, size: int) -> torch.Tensor:
        ids = torch.arange(self.count, self.count + size)
        self.count += size
        return ids

    def trace(self) -> ChannelGraph:
        outputs = self.walk()
        sinks = torch.cat([f.vertices for f in outputs])
        return ChannelGraph(self.count, torch.cat(list(self.inputs.values())), sinks[sinks >= 0], self.blocks)

    def walk(self) -> list[Flow]:
        """Every node of the traced forward in order; the flows of the model's outputs."""
        try:
            traced = fx.symbolic_trace(self.model)
        except Exception as err:  # TraceError, TypeError, ...: whatever the forward does with a Proxy
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise InputError(
                f"torch.fx cannot trace the forward of {type(self.model).__name__} ({reason}), so "
                f"{self.needs} have no channel graph; {self.fallback}"
            ) from err
        modules = dict(traced.named_modules())
        values: dict[fx.Node, object] = {}
        outputs: list[Flow] = []
        for node in traced.graph.nodes:
            args = fx.node.map_arg(node.args, values.__getitem__)
            kwargs = fx.node.map_arg(node.kwargs, values.__getitem__)
            if node.op == "placeholder":
                values[node] = Flow(None, None, None, input=node.name)
            elif node.op == "output":
                outputs = [f for f in _flows(args) if f.vertices is not None]
            elif node.op == "get_attr":
                values[node] = self.attribute(node.target)
            elif not _flows((args, kwargs)):
                values[node] = UNKNOWN
            elif node.op == "call_module":
                values[node] = self.module(node.target, modules[node.target], args, kwargs)
            else:
                values[node] = self.operation(node, args, kwargs)
        if not outputs:
            raise self.unsupported("the output, which no conv or linear layer produces")
        return outputs

    def attribute(self, target: str) -> object:
        """A parameter or buffer the forward reads directly (a position embedding): no activation."""
        return UNKNOWN

    def module(
        self, path: str, module: nn.Module, args: Sequence[object], kwargs: Mapping[str, object]
    ) -> object:
        flow = args[0] if args else next(iter(kwargs.values()))
        if isinstance(module, (*CONVS, nn.Linear)) and isinstance(flow, Flow):
            return self.layer(path, module, flow)
        if isinstance(module, nn.Embedding) and isinstance(flow, Flow) and flow.vertices is None:
            return Flow(self.source(path, module.embedding_dim), -1, None)
        if isinstance(module, nn.Flatten) and isinstance(flow, Flow):
            return self.flatten(flow, module.start_dim, module.end_dim)
        if isinstance(module, PASS_THROUGH_MODULES):
            return flow
        raise self.unsupported(f"module {path!r} ({type(module).__name__})")

    def operation(self, node: fx.Node, args: Sequence[object], kwargs: Mapping[str, object]) -> object:
        kind = (METHOD_OPS if node.op == "call_method" else FUNCTION_OPS).get(node.target)
        name = getattr(node.target, "__name__", str(node.target))
        argument = partial(_argument, args, kwargs)
        flow = argument(0, "input", None)
        if kind is None:
            raise self.unsupported(f"operation {name}")
        if kind in ("same", "size"):
            return flow if kind == "same" else UNKNOWN
        if kind == "join":
            return self.join(list(args[:2]), name)
        if kind == "cat":
            return self.cat(argument(0, "tensors", ()), argument(1, "dim", 0))
        if not isinstance(flow, Flow):
            return UNKNOWN  # an index into a size or a tuple of constants
        if flow.vertices is None and kind not in ("flatten", "reshape"):
            raise self.unsupported(f"operation {name} on the model input before a layer reads it")
        if kind == "flatten":
            return self.flatten(flow, argument(1, "start_dim", 0), argument(2, "end_dim", -1))
        if kind == "reshape":
            return self.reshape(flow, _sizes(args) if len(args) > 1 else tuple(kwargs["shape"]), name)
        if kind == "transpose":
            return self.transpose(flow, argument(1, "dim0", 0), argument(2, "dim1", 1))
        if kind == "permute":
            return self.permute(flow, _sizes(args) if len(args) > 1 else tuple(kwargs["dims"]))
        if kind == "pad":
            return self.pad(flow, tuple(argument(1, "pad", ())))
        if kind == "getitem":
            return self.index(flow, args[1])
        return self.reduce(flow, argument(1, "dim", None), argument(2, "keepdim", False), name)

    def source(self, name: str, size: int) -> torch.Tensor:
        """The vertices of model input ``name``, created by the first layer that reads it."""
        if name not in self.inputs:
            self.inputs[name] = self.fresh(size)
        if self.inputs[name].numel() != size:
            raise self.unsupported(f"input {name}, read as {self.inputs[name].numel()} and {size} channels")
        return self.inputs[name]

    def fan_in(self, flow: Flow, size: int, axis: int, path: str) -> torch.Tensor:
        """The vertex of each of a layer's ``size`` input channels, which it reads at dim ``axis``."""
        if flow.vertices is None:
            return self.source(flow.input, size)
        if flow.axis != axis:
            raise self.unsupported(f"module {path!r}, which reads dim {axis}, not {flow.axis}")
        vertices = flow.vertices
        if flow.spread is not None and size % vertices.numel() == 0:
            repeats = size // vertices.numel()
            interleave = flow.spread == "interleave"
            vertices = vertices.repeat_interleave(repeats) if interleave else vertices.repeat(repeats)
        if vertices.numel() != size:
            raise self.unsupported(f"module {path!r}, which reads {size} channels, not {vertices.numel()}")
        return vertices

    def layer(self, path: str, module: nn.Module, flow: Flow) -> Flow:
        name = f"{path}.weight"
        if name not in self.weights or self.weights[name].shape != module.weight.shape:
            shape = tuple(module.weight.shape)
            raise InputError(f"the weights hold no {name} of shape {shape}; pass the model they belong to")
        if any(b.name == name for b in self.blocks):
            raise self.unsupported(f"module {path!r}, which is applied twice (shared weights)")
        weight = self.weights[name].detach().abs().double()
        if name in self.mask:
            weight = weight * self.mask[name].to(weight.device)
        strength = weight.flatten(2).sum(2) if weight.dim() > 2 else weight
        conv = isinstance(module, CONVS)
        groups = module.groups if conv else 1
        axis = -len(module.kernel_size) - 1 if conv else -1
        vertices = self.fan_in(flow, strength.shape[1] * groups, axis, path)
        # weight (o, j) of a grouped conv reads channel j of o's group
        group = torch.arange(strength.shape[0]) // (strength.shape[0] // groups)
        columns = group[:, None] * strength.shape[1] + torch.arange(strength.shape[1])
        outputs = self.fresh(strength.shape[0])
        self.connect(name, vertices[columns], outputs, strength)
        rank = flow.rank if flow.rank is not None or not conv else len(module.kernel_size) + 2
        return Flow(outputs, axis, rank)

    def connect(
        self, name: str | None, in_vertices: torch.Tensor, outputs: torch.Tensor, strength: torch.Tensor
    ) -> None:
        """One edge per (input vertex, output vertex) pair with positive strength, summed over its columns:
        a flattened channel or an activation joined with itself reaches one output by several columns."""
        rows = torch.arange(outputs.numel())[:, None].expand_as(in_vertices)
        real = (strength > 0) & (in_vertices >= 0)
        pairs, edge = torch.unique(rows[real] * self.count + in_vertices[real], return_inverse=True)
        edge_of = torch.full(in_vertices.shape, -1)
        edge_of[real] = edge
        summed = torch.zeros(pairs.numel(), dtype=torch.float64).index_add_(0, edge, strength[real])
        source, target = pairs % self.count, outputs[pairs // self.count]
        self.blocks.append(EdgeBlock(name, source, target, summed, in_vertices, outputs, edge_of))

    def join(self, operands: list[object], name: str) -> Flow:
        """Two activations combined channel by channel; with one, the other operand is a constant."""
        flows = [f for f in operands if isinstance(f, Flow)]
        if len(flows) == 1:
            return flows[0]
        rank = self.joined_rank(flows, name)
        outputs = self.fresh(flows[0].vertices.numel())
        in_vertices = torch.stack([f.vertices for f in flows], 1)
        self.connect(None, in_vertices, outputs, torch.ones(in_vertices.shape, dtype=torch.float64))
        return Flow(outputs, flows[0].axis, rank)

    def joined_rank(self, flows: list[Flow], name: str) -> int | None:
        """The rank of activations joined channel by channel; unsupported unless their channels line up."""
        first = flows[0]
        if any(f.vertices is None for f in flows):
            raise self.unsupported(f"operation {name} on the model input before a layer reads it")
        channels = first.vertices.numel()
        if any(f.vertices.numel() != channels or f.axis != first.axis or f.spread for f in flows):
            raise self.unsupported(f"operation {name} of activations whose channels do not line up")
        ranks = [f.rank for f in flows]
        return None if None in ranks else max(ranks)

    def cat(self, tensors: Sequence[object], dim: object) -> Flow:
        flows = [t for t in tensors if isinstance(t, Flow)]
        first = flows[0]
        if any(f.vertices is None for f in flows):
            raise self.unsupported("operation cat on the model input before a layer reads it")
        if any(f.axis != first.axis for f in flows):
            raise self.unsupported("operation cat of activations with their channels at different dims")
        if self.position(first, dim, "cat") != first.axis:
            same = all(torch.equal(f.vertices, first.vertices) for f in flows)
            return first if same else self.join(flows, "cat")
        if len(flows) < len(tensors) or any(f.spread for f in flows):
            raise self.unsupported("operation cat of a constant or flattened tensor along the channel dim")
        return Flow(torch.cat([f.vertices for f in flows]), first.axis, first.rank)

    def position(self, flow: Flow, dim: object, name: str) -> int:
        """``dim`` counted from the end, as ``axis`` is."""
        if not isinstance(dim, int):
            raise self.unsupported(f"operation {name} over dim {dim!r}")
        if dim < 0:
            return dim
        if flow.rank is None:
            raise self.unsupported(f"operation {name} at dim {dim} of an activation whose rank is unknown")
        return dim - flow.rank

    def flatten(self, flow: Flow, start: object, end: object) -> Flow:
        if flow.vertices is None:
            rank = start + 1 if isinstance(start, int) and start >= 0 and end == -1 else None
            return replace(flow, rank=rank)
        first, last = self.position(flow, start, "flatten"), self.position(flow, end, "flatten")
        merged = last - first
        rank = None if flow.rank is None else flow.rank - merged
        if merged == 0 or flow.axis > last:
            return replace(flow, rank=rank)
        if flow.axis < first:
            return replace(flow, axis=flow.axis + merged, rank=rank)
        if flow.spread is not None or first < flow.axis < last:
            raise self.unsupported(f"operation flatten over dims {start}..{end}, which buries the channels")
        return Flow(flow.vertices, last, rank, "interleave" if flow.axis == first else "tile")

    def reshape(self, flow: Flow, sizes: tuple[object, ...], name: str) -> Flow:
        if len(sizes) != 2:
            raise self.unsupported(f"operation {name} to {len(sizes)} dims (only to (batch, features))")
        return self.flatten(flow, 1, -1)

    def transpose(self, flow: Flow, dim0: object, dim1: object) -> Flow:
        first, second = self.position(flow, dim0, "transpose"), self.position(flow, dim1, "transpose")
        swap = {first: second, second: first}
        return replace(flow, axis=swap.get(flow.axis, flow.axis))

    def permute(self, flow: Flow, dims: tuple[object, ...]) -> Flow:
        order = [self.position(replace(flow, rank=len(dims)), d, "permute") for d in dims]
        if flow.axis not in order:
            raise self.unsupported(f"operation permute to {dims} of an activation with {flow.rank} dims")
        return replace(flow, axis=order.index(flow.axis) - len(dims), rank=len(dims))

    def pad(self, flow: Flow, pad: tuple[object, ...]) -> Flow:
        """F.pad lists (low, high) pairs from the last dim backwards; padded channels are zeros, no vertex."""
        pair = -1 - flow.axis
        if len(pad) <= 2 * pair + 1:
            return flow
        low, high = pad[2 * pair], pad[2 * pair + 1]
        if not (isinstance(low, int) and isinstance(high, int) and low >= 0 and high >= 0):
            raise self.unsupported(f"operation pad by ({low}, {high}) channels")
        vertices = torch.cat([torch.full((low,), -1), flow.vertices, torch.full((high,), -1)])
        return replace(flow, vertices=vertices)

    def index(self, flow: Flow, index: object) -> Flow:
        """Basic indexing (ints, slices, None, ...): a slice of the channel dim keeps those channels."""
        entries = index if isinstance(index, tuple) else (index,)
        basic = all(e is None or e is Ellipsis or isinstance(e, (int, slice)) for e in entries)
        if flow.rank is None or not basic:
            raise self.unsupported(f"indexing by {index!r} of an activation with {flow.rank} dims")
        used = sum(e is not None and e is not Ellipsis for e in entries)
        at = next((i for i, e in enumerate(entries) if e is Ellipsis), len(entries))
        entries = entries[:at] + (slice(None),) * (flow.rank - used) + entries[at + 1 :]
        channel, dim, kept, vertices = flow.rank + flow.axis, 0, [], flow.vertices
        for entry in entries:
            if entry is not None and dim == channel:
                bounds = (entry.start, entry.stop, entry.step) if isinstance(entry, slice) else (UNKNOWN,)
                if not all(b is None or isinstance(b, int) for b in bounds):
                    raise self.unsupported(f"indexing by {index!r}, which picks single channels")
                vertices = vertices[entry]
            kept += [dim] if isinstance(entry, slice) else [None] if entry is None else []
            dim += entry is not None
        return Flow(vertices, kept.index(channel) - len(kept), len(kept), flow.spread)

    def reduce(self, flow: Flow, dim: object, keepdim: object, name: str) -> Flow:
        """mean, sum, amax or amin over dims other than the channel's."""
        if dim is None:
            raise self.unsupported(f"operation {name} over all dims")
        dims = [self.position(flow, d, name) for d in (dim if isinstance(dim, (tuple, list)) else (dim,))]
        if flow.axis in dims:
            raise self.unsupported(f"operation {name} over the channel dim")
        if keepdim:
            return flow
        rank = None if flow.rank is None else flow.rank - len(dims)
        return replace(flow, axis=flow.axis + sum(d > flow.axis for d in dims), rank=rank)


def channel_graph(model: nn.Module, weights: Mapping[str, torch.Tensor], mask: Mask) -> ChannelGraph:
    """Trace ``model`` and build its channel graph with edge strengths from ``weights`` masked by ``mask``."""
    return FlowTracer(model, weights, mask).trace()


def graph_of(weights: Mapping[str, torch.Tensor], mask: Mask, model: nn.Module | None = None) -> ChannelGraph:
    """The channel graph of ``model``, or else of the registered architecture ``weights`` (a full state_dict)
    belongs to, built on the meta device."""
    if model is not None:
        return channel_graph(model, weights, mask)
    found = identify_architecture(dict(weights))
    if found is None:
        raise InputError(
            "EWP and betweenness scores need the full state_dict of a registered architecture, or the model "
            "itself; OMP and random scores need neither"
        )
    name, in_channels, num_classes = found
    with torch.device("meta"):
        model = build_model(name, in_channels, num_classes)
    return channel_graph(model, weights, mask)
