"""Scores of the kept weights of W⊙M (Scheme V1): the key mask M_s takes the highest ones.

Every score function is ``score(weights, mask) -> {name: scores}`` over the mask's tensors, with pruned
entries at -inf. EWP and betweenness also take ``model``: the user's ``nn.Module`` of any architecture, whose
structure they read by tracing it; without one, ``weights`` must be the full state_dict of a registered
architecture, which is built to be traced.

The channel graph they walk is built in ``ticketguard.models.channel_graph``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import rustworkx as rx
import torch
from torch import nn

from ticketguard.core.errors import InputError
from ticketguard.core.masks import Mask
from ticketguard.models.channel_graph import ChannelGraph, graph_of

Scores = dict[str, torch.Tensor]
ScoreFunction = Callable[[Mapping[str, torch.Tensor], Mask], Scores]
GraphScoreFunction = Callable[[Mapping[str, torch.Tensor], Mask, nn.Module | None], Scores]


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


def ewp(weights: Mapping[str, torch.Tensor], mask: Mask, model: nn.Module | None = None) -> Scores:
    """Edge-weight product (PHEW) on the channel graph of ``model`` (else the registered architecture)."""
    return ewp_scores(graph_of(weights, mask, model), weights, mask)


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
        through = _expand(backward[block.out_vertices][:, None] + sources, weight.dim())
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
            ratio = edge_scores[start : start + count] / block.strength
            per_edge = torch.cat([ratio, ratio.new_zeros(1)])[block.edge_of]  # edge_of -1 picks the 0
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


def betweenness(weights: Mapping[str, torch.Tensor], mask: Mask, model: nn.Module | None = None) -> Scores:
    """Edge betweenness on the masked channel graph of ``model`` (else the registered architecture)."""
    return betweenness_scores(graph_of(weights, mask, model), weights, mask)


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


GRAPH_SCORES: dict[str, GraphScoreFunction] = {"ewp": ewp, "betweenness": betweenness}
SCORES: dict[str, ScoreFunction] = {"omp": omp, **GRAPH_SCORES, "random": random}


def score(
    name: str, weights: Mapping[str, torch.Tensor], mask: Mask, model: nn.Module | None = None
) -> Scores:
    """Look up and run a registered score function; ``model`` (any traceable architecture) gives the graph
    scores the structure that ``weights`` alone give only for registered architectures."""
    if name not in SCORES:
        raise InputError(f"unknown score {name!r}; choose one of: {', '.join(SCORES)}")
    if name in GRAPH_SCORES:
        return GRAPH_SCORES[name](weights, mask, model)
    return SCORES[name](weights, mask)
