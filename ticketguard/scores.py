"""Scores of the kept weights of W⊙M (Scheme V1): the key mask M_s takes the highest ones.

Every score function is ``score(weights, mask) -> {name: scores}`` over the mask's tensors, with pruned
entries at -inf. ``weights`` is a full state_dict of a registered architecture: EWP and betweenness read
the model's structure from it.

The channel graph (EWP and betweenness) follows the real data flow of the model, traced with torch.fx:

- a vertex is one channel of one activation; the input image's channels are the sources, the classifier's
  outputs the sinks;
- every conv and linear layer, the stem included, adds fresh vertices for its output channels and an edge
  (in -> out) per channel pair with at least one kept weight; its strength is the sum of |W⊙M| over the
  kernel. Tensors outside the mask (stem, classifier by default) count as fully kept;
- a residual addition adds fresh vertices with an edge of strength 1 from each summand's channel: identity
  shortcuts map channel c to c, option-A shortcuts of ResNet-20/32/56 subsample (no effect on channels) and
  zero-pad (padded channels have no vertex, so no edge), projection shortcuts of ResNet-18/50 are convs;
- BatchNorm, ReLU, pooling and flatten pass channels through unchanged: BN is a per-channel scaling that the
  next training run re-learns, so it adds no connection.

Because every layer's output vertices are fresh, the edge blocks are in topological order, and path sums
need one pass forward and one backward.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import rustworkx as rx
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ticketguard.errors import InputError
from ticketguard.masks import Mask
from ticketguard.models import build_model, identify_architecture

Scores = dict[str, torch.Tensor]
ScoreFunction = Callable[[Mapping[str, torch.Tensor], Mask], Scores]

PASS_THROUGH_FUNCTIONS = {
    F.relu, torch.relu, torch.flatten, F.adaptive_avg_pool2d, F.avg_pool2d, F.max_pool2d,
}
PASS_THROUGH_MODULES = (
    nn.BatchNorm2d, nn.ReLU, nn.Identity, nn.AdaptiveAvgPool2d, nn.AvgPool2d, nn.MaxPool2d,
    nn.Flatten, nn.Dropout,
)
ADD_FUNCTIONS = {operator.add, torch.add}
CHANNEL_DIM = 1


@dataclass(frozen=True)
class EdgeBlock:
    """Edges into fresh vertices: one weighted layer (``name`` set) or one residual addition (no name)."""

    name: str | None
    source: torch.Tensor
    target: torch.Tensor
    strength: torch.Tensor
    in_vertices: torch.Tensor | None = None
    out_vertices: torch.Tensor | None = None
    rows: torch.Tensor | None = None
    cols: torch.Tensor | None = None


@dataclass(frozen=True)
class ChannelGraph:
    """The DAG of channels; ``blocks`` are in topological order."""

    vertices: int
    inputs: torch.Tensor
    outputs: torch.Tensor
    blocks: list[EdgeBlock]

    def layer(self, name: str) -> EdgeBlock:
        return next(b for b in self.blocks if b.name == name)

    def edges(self) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.cat([b.source for b in self.blocks]), torch.cat([b.target for b in self.blocks])


class _GraphBuilder:
    def __init__(self, weights: Mapping[str, torch.Tensor], mask: Mask) -> None:
        self.weights, self.mask = weights, mask
        self.count = 0
        self.blocks: list[EdgeBlock] = []

    def fresh(self, size: int) -> torch.Tensor:
        ids = torch.arange(self.count, self.count + size)
        self.count += size
        return ids

    def layer(self, name: str, module: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
        if isinstance(module, nn.Conv2d) and module.groups != 1:
            raise InputError(f"channel graphs of grouped convolutions ({name}) are not supported")
        weight = self.weights[name].detach().abs().double()
        if name in self.mask:
            weight = weight * self.mask[name].to(weight.device)
        strength = weight.flatten(2).sum(2) if weight.dim() > 2 else weight
        outputs = self.fresh(strength.shape[0])
        connected = (strength > 0) & (inputs >= 0)[None, :]
        out_index, in_index = connected.nonzero(as_tuple=True)
        self.blocks.append(
            EdgeBlock(
                name, inputs[in_index], outputs[out_index], strength[out_index, in_index],
                inputs, outputs, out_index, in_index,
            )
        )
        return outputs

    def add(self, summands: list[torch.Tensor]) -> torch.Tensor:
        outputs = self.fresh(summands[0].numel())
        source = torch.cat(summands)
        target = outputs.repeat(len(summands))
        real = source >= 0
        self.blocks.append(
            EdgeBlock(None, source[real], target[real], torch.ones(int(real.sum()), dtype=torch.float64))
        )
        return outputs


def _pad_channels(vertices: torch.Tensor, pad: tuple[int, ...], dims: int) -> torch.Tensor:
    """F.pad lists (left, right) pairs from the last dim backwards; only the channel pair matters here."""
    pair = dims - 1 - CHANNEL_DIM
    if len(pad) <= 2 * pair:
        return vertices
    low, high = pad[2 * pair], pad[2 * pair + 1]
    return torch.cat([torch.full((low,), -1), vertices, torch.full((high,), -1)])


def _index_channels(vertices: torch.Tensor, index: object) -> torch.Tensor:
    if not isinstance(index, tuple) or len(index) <= CHANNEL_DIM:
        return vertices
    return vertices[index[CHANNEL_DIM]]


def channel_graph(model: nn.Module, weights: Mapping[str, torch.Tensor], mask: Mask) -> ChannelGraph:
    """Trace ``model`` and build its channel graph with edge strengths from ``weights`` masked by ``mask``."""
    traced = fx.symbolic_trace(model)
    modules = dict(traced.named_modules())
    builder = _GraphBuilder(weights, mask)
    values: dict[fx.Node, torch.Tensor] = {}
    inputs = outputs = None
    for node in traced.graph.nodes:
        args = [values.get(a) if isinstance(a, fx.Node) else a for a in node.args]
        if node.op == "placeholder":
            stem = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
            inputs = values[node] = builder.fresh(stem.in_channels)
        elif node.op == "call_module" and isinstance(modules[node.target], (nn.Conv2d, nn.Linear)):
            values[node] = builder.layer(f"{node.target}.weight", modules[node.target], args[0])
        elif node.op == "call_module" and isinstance(modules[node.target], PASS_THROUGH_MODULES):
            values[node] = args[0]
        elif node.op == "call_function" and node.target in PASS_THROUGH_FUNCTIONS:
            values[node] = args[0]
        elif node.op == "call_function" and node.target in ADD_FUNCTIONS:
            values[node] = builder.add([a for a in args if isinstance(a, torch.Tensor)])
        elif node.op == "call_function" and node.target is F.pad:
            values[node] = _pad_channels(args[0], tuple(args[1]), dims=4)
        elif node.op == "call_function" and node.target is operator.getitem:
            values[node] = _index_channels(args[0], args[1])
        elif node.op == "output":
            outputs = args[0]
        else:
            raise InputError(
                f"channel graphs cannot follow {node.op} {node.target} of {type(model).__name__}"
            )
    assert inputs is not None and outputs is not None
    return ChannelGraph(builder.count, inputs, outputs, builder.blocks)


def graph_of(weights: Mapping[str, torch.Tensor], mask: Mask) -> ChannelGraph:
    """The channel graph of the registered architecture that ``weights`` (a full state_dict) belongs to."""
    found = identify_architecture(dict(weights))
    if found is None:
        raise InputError("EWP and betweenness scores need the full state_dict of a registered architecture")
    name, in_channels, num_classes = found
    with torch.device("meta"):
        model = build_model(name, in_channels, num_classes)
    return channel_graph(model, weights, mask)


def _scatter_logsumexp(values: torch.Tensor, index: torch.Tensor, size: int) -> torch.Tensor:
    """log sum exp of ``values`` grouped by ``index``; -inf where a group is empty."""
    peak = torch.full((size,), -torch.inf, dtype=values.dtype).scatter_reduce(0, index, values, "amax")
    shift = torch.where(torch.isfinite(peak), peak, 0.0)
    total = torch.zeros(size, dtype=values.dtype).index_add_(0, index, torch.exp(values - shift[index]))
    return shift + torch.log(total)


def path_sums(graph: ChannelGraph) -> tuple[torch.Tensor, torch.Tensor]:
    """log F (weight-product of all paths input -> vertex) and log B (vertex -> output), one pass each.

    Logs, because products over 50 layers overflow float64.
    """
    forward = torch.full((graph.vertices,), -torch.inf, dtype=torch.float64)
    forward[graph.inputs] = 0.0
    for block in graph.blocks:
        carried = forward[block.source] + block.strength.log()
        arrived = _scatter_logsumexp(carried, block.target, graph.vertices)
        forward = torch.where(torch.isfinite(arrived), arrived, forward)
    backward = torch.full((graph.vertices,), -torch.inf, dtype=torch.float64)
    backward[graph.outputs] = 0.0
    for block in reversed(graph.blocks):
        sent = _scatter_logsumexp(backward[block.target] + block.strength.log(), block.source, graph.vertices)
        backward = torch.logaddexp(backward, sent)
    return forward, backward


def _masked(score: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask, score.float(), -torch.inf)


def _per_vertex(values: torch.Tensor, vertices: torch.Tensor, fill: float) -> torch.Tensor:
    return torch.where(vertices >= 0, values[vertices.clamp_min(0)], fill)


def _expand(matrix: torch.Tensor, dims: int) -> torch.Tensor:
    return matrix.reshape(*matrix.shape, *([1] * (dims - 2)))


def omp(weights: Mapping[str, torch.Tensor], mask: Mask) -> Scores:
    """One-shot magnitude: |W|."""
    return {name: _masked(weights[name].detach().abs(), mask[name]) for name in mask}


def ewp(weights: Mapping[str, torch.Tensor], mask: Mask) -> Scores:
    """Edge-weight product (PHEW) on the model's channel graph; see ``ewp_scores``."""
    return ewp_scores(graph_of(weights, mask), weights, mask)


def ewp_scores(graph: ChannelGraph, weights: Mapping[str, torch.Tensor], mask: Mask) -> Scores:
    """log of the total weight-product of all input -> output paths through each weight.

    A path through weight w of edge (i -> o) contributes F(i) |w| B(o), so a weight's share of its edge's
    score is proportional to |w|.
    """
    forward, backward = path_sums(graph)
    scores = {}
    for name in mask:
        block, weight = graph.layer(name), weights[name].detach().abs().double()
        sources = _per_vertex(forward, block.in_vertices, -torch.inf)
        targets = backward[block.out_vertices]
        through = _expand(targets[:, None] + sources[None, :], weight.dim())
        scores[name] = _masked(through + weight.log(), mask[name])
    return scores


def _spread(
    graph: ChannelGraph, edge_scores: torch.Tensor, weights: Mapping[str, torch.Tensor], mask: Mask
) -> Scores:
    """Share each weighted edge's score among its kernel's kept weights, in proportion to |w|."""
    scores, start = {}, 0
    for block in graph.blocks:
        count = block.source.numel()
        if block.name in mask:
            weight = weights[block.name].detach().abs().double() * mask[block.name]
            per_edge = torch.zeros(weight.shape[:2], dtype=torch.float64)
            per_edge[block.rows, block.cols] = edge_scores[start : start + count] / block.strength
            scores[block.name] = _masked(weight * _expand(per_edge, weight.dim()), mask[block.name])
        start += count
    return scores


def edge_betweenness(graph: ChannelGraph) -> torch.Tensor:
    """Edge betweenness (Brandes, exact, hop-count shortest paths) of every edge, in block order."""
    source, target = graph.edges()
    digraph = rx.PyDiGraph()
    digraph.add_nodes_from(range(graph.vertices))
    digraph.add_edges_from_no_data(list(zip(source.tolist(), target.tolist())))
    centrality = rx.digraph_edge_betweenness_centrality(digraph, normalized=False)
    values = np.zeros(source.numel())
    for index, value in centrality.items():
        values[index] = value
    return torch.from_numpy(values)


def betweenness(weights: Mapping[str, torch.Tensor], mask: Mask) -> Scores:
    """Edge betweenness on the model's masked channel graph; see ``betweenness_scores``."""
    return betweenness_scores(graph_of(weights, mask), weights, mask)


def betweenness_scores(graph: ChannelGraph, weights: Mapping[str, torch.Tensor], mask: Mask) -> Scores:
    """Edge betweenness on the masked channel graph, times the edge strength, spread over the kernel by |w|.

    Only channel pairs with a kept weight are edges, and a weight's score is bc(edge) |w|: the mask and the
    weights both count (the reference implementation scores the dense, unweighted graph).
    """
    strengths = torch.cat([b.strength for b in graph.blocks])
    return _spread(graph, edge_betweenness(graph) * strengths, weights, mask)


def random(weights: Mapping[str, torch.Tensor], mask: Mask, seed: int = 0) -> Scores:
    """Uniform random scores from a fixed seed, the baseline key mask."""
    generator = torch.Generator().manual_seed(seed)
    return {name: _masked(torch.rand(mask[name].shape, generator=generator), mask[name]) for name in mask}


SCORES: dict[str, ScoreFunction] = {"omp": omp, "ewp": ewp, "betweenness": betweenness, "random": random}


def score(name: str, weights: Mapping[str, torch.Tensor], mask: Mask) -> Scores:
    """Look up and run a registered score function."""
    if name not in SCORES:
        raise InputError(f"unknown score {name!r}; choose one of: {', '.join(SCORES)}")
    return SCORES[name](weights, mask)
