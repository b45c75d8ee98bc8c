"""Time of each V1 score function on ResNet-50, and of betweenness on ResNet-20 against networkx.

Masks are global magnitude prunings of a freshly initialised model at the given density (kept fraction of the
prunable weights). Exact betweenness costs O(V·E): on ResNet-50 (about 38k channel vertices) it is timed at a
lower density than the other scores.

    OMP_NUM_THREADS=1 python benchmarks/scores_speed.py
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import networkx as nx
import torch
from rich.table import Table

from ticketguard.cli.output import console
from ticketguard.core.masks import Mask, magnitude_prune, prunable_names
from ticketguard.models import build_model
from ticketguard.models.channel_graph import graph_of
from ticketguard.schemes.scores import SCORES, edge_betweenness


def ticket_like(architecture: str, density: float) -> tuple[dict[str, torch.Tensor], Mask]:
    torch.manual_seed(0)
    model = build_model(architecture, 3, 10)
    weights = model.state_dict()
    return weights, magnitude_prune(weights, Mask.ones_like(weights, prunable_names(model)), 1 - density)


def timed(function: Callable[[], object], repeats: int) -> float:
    """Best wall time of ``repeats`` calls, in seconds."""
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - started)
    return best


def networkx_betweenness(weights: dict[str, torch.Tensor], mask: Mask) -> None:
    graph = graph_of(weights, mask)
    source, target = graph.edges()
    reference = nx.DiGraph()
    reference.add_nodes_from(range(graph.vertices))
    reference.add_edges_from(zip(source.tolist(), target.tolist()))
    nx.edge_betweenness_centrality(reference, normalized=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--density", type=float, default=0.2, help="ticket density of the masks")
    parser.add_argument("--resnet50-betweenness-density", type=float, default=0.01)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rows = []
    weights, mask = ticket_like("resnet50", args.density)
    for name in ("omp", "ewp", "random"):
        rows.append(("resnet50", args.density, name, timed(lambda name=name: SCORES[name](weights, mask), args.repeats)))
    weights, mask = ticket_like("resnet50", args.resnet50_betweenness_density)
    rows.append(("resnet50", args.resnet50_betweenness_density, "betweenness",
                 timed(lambda: SCORES["betweenness"](weights, mask), 1)))
    weights, mask = ticket_like("resnet20", args.density)
    for name in SCORES:
        rows.append(("resnet20", args.density, name, timed(lambda name=name: SCORES[name](weights, mask), args.repeats)))
    graph = graph_of(weights, mask)
    rustworkx_seconds = timed(lambda: edge_betweenness(graph), args.repeats)
    networkx_seconds = timed(lambda: networkx_betweenness(weights, mask), 1)
    rows.append(("resnet20", args.density, "edge betweenness alone, rustworkx", rustworkx_seconds))
    rows.append(("resnet20", args.density, "edge betweenness alone, networkx", networkx_seconds))
    report = Table(title=f"score time (torch threads: {torch.get_num_threads()})")
    for column in ("model", "mask density", "score", "seconds"):
        report.add_column(column)
    for model, density, name, seconds in rows:
        report.add_row(model, f"{100 * density:g}%", name, f"{seconds:.3f}")
    console.print(report)
    source, _ = graph.edges()
    console.print(
        f"resnet20 channel graph: {graph.vertices} vertices, {source.numel()} edges; "
        f"networkx / rustworkx = {networkx_seconds / rustworkx_seconds:.0f}x"
    )


if __name__ == "__main__":
    main()
