"""V1 scores: exact EWP path sums, betweenness against networkx, the traced channel graph."""

from __future__ import annotations

import itertools

import networkx as nx
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ticketguard.errors import InputError
from ticketguard.masks import Mask, magnitude_prune, prunable_names
from ticketguard.models import build_model
from ticketguard.scores import (
    SCORES,
    betweenness_scores,
    channel_graph,
    edge_betweenness,
    ewp_scores,
    graph_of,
)


class Tiny(nn.Module):
    """stem (1->2), conv1 (2->3), conv2 (3->3), option-A-like zero-padded shortcut, classifier (3->2)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 2, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(2)
        self.conv1 = nn.Conv2d(2, 3, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(3, 3, 3, padding=1, bias=False)
        self.fc = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.stem(x)))
        out = self.conv2(F.relu(self.conv1(x)))
        out = F.relu(out + F.pad(x[:, :, ::1, ::1], (0, 0, 0, 0, 0, 1)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


@pytest.fixture()
def tiny() -> tuple[Tiny, dict[str, torch.Tensor], Mask]:
    model = Tiny()
    weights = model.state_dict()
    kept = {name: torch.rand(weights[name].shape) < 0.5 for name in ("conv1.weight", "conv2.weight")}
    kept["conv1.weight"][0, 1] = False
    return model, weights, Mask(kept)


def _strength(weights: dict[str, torch.Tensor], mask: Mask, name: str) -> torch.Tensor:
    weight = weights[name].abs().double() * (mask[name] if name in mask else 1)
    return weight.flatten(2).sum(2) if weight.dim() > 2 else weight


def test_ewp_matches_brute_force_path_enumeration_on_tiny_network(tiny) -> None:
    model, weights, mask = tiny
    names = ("stem", "conv1", "conv2", "fc")
    stem, conv1, conv2, fc = (_strength(weights, mask, f"{n}.weight") for n in names)
    through = {name: torch.zeros(_strength(weights, mask, name).shape, dtype=torch.float64) for name in mask}
    for s, a, b, k in itertools.product(range(2), range(3), range(3), range(2)):
        through["conv1.weight"][a, s] += stem[s, 0] * conv1[a, s] * conv2[b, a] * fc[k, b]
        through["conv2.weight"][b, a] += stem[s, 0] * conv1[a, s] * conv2[b, a] * fc[k, b]
    scores = ewp_scores(channel_graph(model, weights, mask), weights, mask)
    for name, paths in through.items():
        share = weights[name].abs().double() * mask[name] / _strength(weights, mask, name)[:, :, None, None]
        expected = torch.nan_to_num(paths[:, :, None, None] * share)
        got = torch.where(mask[name], scores[name].double().exp(), 0.0)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-12)
        assert torch.isinf(scores[name][~mask[name]]).all()


def test_betweenness_matches_networkx_on_tiny_graph(tiny) -> None:
    model, weights, mask = tiny
    graph = channel_graph(model, weights, mask)
    source, target = graph.edges()
    reference = nx.DiGraph()
    reference.add_nodes_from(range(graph.vertices))
    reference.add_edges_from(zip(source.tolist(), target.tolist()))
    expected = nx.edge_betweenness_centrality(reference, normalized=False)
    got = edge_betweenness(graph)
    for index, edge in enumerate(zip(source.tolist(), target.tolist())):
        assert got[index].item() == pytest.approx(expected[edge])


def test_betweenness_ignores_pruned_connections_and_weighs_by_magnitude(tiny) -> None:
    model, weights, mask = tiny
    graph = channel_graph(model, weights, mask)
    scores = betweenness_scores(graph, weights, mask)
    conv1 = graph.layer("conv1.weight")
    assert not ((conv1.rows == 0) & (conv1.cols == 1)).any()
    assert torch.isinf(scores["conv1.weight"][0, 1]).all()
    kernel = scores["conv1.weight"][1, 0]
    kept = mask["conv1.weight"][1, 0]
    ratio = kernel[kept] / weights["conv1.weight"][1, 0][kept].abs()
    torch.testing.assert_close(ratio, ratio[:1].expand_as(ratio))


def test_channel_graph_follows_option_a_shortcuts_of_resnet20() -> None:
    model = build_model("resnet20", 3, 10)
    weights = model.state_dict()
    mask = Mask.ones_like(weights, prunable_names(model))
    graph = graph_of(weights, mask)
    joins = [b for b in graph.blocks if b.name is None]
    assert len(joins) == 9
    # the first block of stage 2 adds 32 conv channels to 16 subsampled channels and 16 zero channels
    assert joins[3].source.numel() == 32 + 16
    assert graph.vertices == 3 + 16 + 3 * (3 * 16 + 3 * 32 + 3 * 64) + 10
    assert graph.outputs.numel() == 10


def test_channel_graph_includes_projection_shortcuts_of_resnet18() -> None:
    model = build_model("resnet18", 3, 10)
    weights = model.state_dict()
    graph = graph_of(weights, Mask.ones_like(weights, prunable_names(model)))
    shortcut = graph.layer("layers.2.shortcut.0.weight")
    assert shortcut.source.numel() == 128 * 64
    join = graph.blocks[graph.blocks.index(shortcut) + 1]
    assert join.name is None and set(shortcut.target.tolist()) <= set(join.source.tolist())


@pytest.mark.parametrize("name", list(SCORES))
def test_every_score_gives_pruned_weights_minus_inf_and_kept_ones_finite(name: str) -> None:
    model = build_model("resnet20", 1, 10)
    weights = model.state_dict()
    mask = magnitude_prune(weights, Mask.ones_like(weights, prunable_names(model)), 0.9)
    scores = SCORES[name](weights, mask)
    assert scores.keys() == mask.keys()
    for tensor_name, tensor in scores.items():
        assert torch.isneginf(tensor[~mask[tensor_name]]).all()
        assert not torch.isnan(tensor).any()
    finite = sum(int(torch.isfinite(t).sum()) for t in scores.values())
    assert finite >= 0.99 * mask.kept()


def test_random_score_is_seeded_and_omp_is_magnitude() -> None:
    model = build_model("resnet20", 1, 10)
    weights = model.state_dict()
    mask = Mask.ones_like(weights, prunable_names(model))
    first, second = SCORES["random"](weights, mask), SCORES["random"](weights, mask)
    assert all(torch.equal(first[n], second[n]) for n in mask)
    assert all(torch.equal(SCORES["omp"](weights, mask)[n], weights[n].abs()) for n in mask)


def test_graph_scores_refuse_weights_of_an_unknown_architecture() -> None:
    weights = {"conv.weight": torch.ones(2, 2, 3, 3)}
    with pytest.raises(InputError, match="registered architecture"):
        SCORES["ewp"](weights, Mask({"conv.weight": torch.ones(2, 2, 3, 3, dtype=torch.bool)}))
