"""V1 scores: exact EWP path sums, betweenness against networkx, the traced channel graph of registered and
user-defined models (concatenation, residuals, grouped convs, token linears), clear errors where it stops."""

from __future__ import annotations

import itertools

import networkx as nx
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ticketguard.core.errors import InputError
from ticketguard.core.masks import Mask, magnitude_prune, prunable_names
from ticketguard.models import build_model
from ticketguard.models.channel_graph import channel_graph, graph_of
from ticketguard.schemes.scores import SCORES, betweenness_scores, edge_betweenness, ewp_scores, score


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
    weight = weights[name].abs().double() * mask.get(name, 1)
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
    assert conv1.edge_of[0, 1] == -1
    assert not ((conv1.target == conv1.out_vertices[0]) & (conv1.source == conv1.in_vertices[0, 1])).any()
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


class CatResidual(nn.Module):
    """stem (3->4), two branches (4->2, 4->3) concatenated to 5 channels, a depthwise conv added back, a
    classifier on the flattened 2x2 map (5 channels x 4 positions)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.left = nn.Conv2d(4, 2, 1, bias=False)
        self.right = nn.Conv2d(4, 3, 3, padding=1, bias=False)
        self.depthwise = nn.Conv2d(5, 5, 3, padding=1, groups=5, bias=False)
        self.bn = nn.BatchNorm2d(5)
        self.fc = nn.Linear(5 * 4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        joined = torch.cat([self.left(x), self.right(x)], dim=1)
        out = joined + F.gelu(self.bn(self.depthwise(joined)))
        return self.fc(nn.functional.dropout(torch.flatten(F.max_pool2d(out, 4), 1), 0.1))


class Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(6, 5), nn.Linear(5, 4), nn.Linear(4, 3)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.view(x.size(0), -1)
        for layer in self.layers[:-1]:
            x = F.relu(layer(x))
        return self.layers[-1](x)


class PatchTokens(nn.Module):
    """A conv patch embedding turned into (N, T, C) tokens, then LayerNorm, a token MLP with a residual."""

    def __init__(self, mix_tokens: bool = False) -> None:
        super().__init__()
        self.mix_tokens = mix_tokens
        self.patch = nn.Conv2d(3, 6, 4, stride=4, bias=False)
        self.norm = nn.LayerNorm(6)
        self.fc1 = nn.Linear(4 if mix_tokens else 6, 8)
        self.fc2 = nn.Linear(8, 6)
        self.head = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch(x).flatten(2)
        if self.mix_tokens:  # a linear over the 4 tokens of (N, C, T), not over channels
            return self.fc1(tokens)
        tokens = tokens.transpose(1, 2)
        tokens = tokens + self.fc2(F.gelu(self.fc1(self.norm(tokens))))
        return self.head(tokens.mean(1))


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(4, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        x, _ = self.attn(x, x, x)
        return self.head(x.mean(1))


class DotProduct(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.query, self.key, self.head = nn.Linear(4, 8), nn.Linear(4, 8), nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        attention = (self.query(x) @ self.key(x).transpose(-2, -1)).softmax(-1)
        return self.head(attention @ self.query(x))


class Branching(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) if x.sum() > 0 else self.fc(-x)


def _random_mask(weights: dict[str, torch.Tensor], names: list[str], density: float = 0.6) -> Mask:
    generator = torch.Generator().manual_seed(1)
    return Mask({n: torch.rand(weights[n].shape, generator=generator) < density for n in names})


def test_cat_maps_branch_channels_in_order_and_depthwise_conv_stays_in_its_channel() -> None:
    model = CatResidual()
    weights = model.state_dict()
    graph = channel_graph(model, weights, Mask.ones_like(weights, ["left.weight", "right.weight"]))
    joined = torch.cat([graph.layer("left.weight").out_vertices, graph.layer("right.weight").out_vertices])
    depthwise = graph.layer("depthwise.weight")
    assert torch.equal(depthwise.in_vertices[:, 0], joined)
    assert torch.equal(depthwise.source, joined) and torch.equal(depthwise.target, depthwise.out_vertices)
    residual = graph.blocks[graph.blocks.index(depthwise) + 1]
    assert residual.name is None
    assert set(residual.source.tolist()) == set(joined.tolist() + depthwise.target.tolist())
    # the classifier's 20 inputs are 5 channels x 4 positions, channel-major as torch.flatten lays them out
    assert torch.equal(graph.layer("fc.weight").in_vertices[0], residual.out_vertices.repeat_interleave(4))


def test_ewp_of_traced_cnn_matches_channel_matrix_products_and_a_cut_channel_scores_lowest() -> None:
    model = CatResidual()
    weights = model.state_dict()
    mask = _random_mask(weights, ["left.weight", "right.weight", "depthwise.weight", "fc.weight"])
    mask["right.weight"][0] = False  # right's channel 0 (joined channel 2) gets no input: it is cut
    scores = score("ewp", weights, mask, model=model)
    stem, left, right = (_strength(weights, mask, f"{n}.weight") for n in ("stem", "left", "right"))
    depthwise = _strength(weights, mask, "depthwise.weight")[:, 0]
    fc = _strength(weights, mask, "fc.weight").reshape(2, 5, 4).sum(2)
    joined = torch.cat([left @ stem.sum(1), right @ stem.sum(1)])  # F: path sums from the 3 input channels
    out = fc.sum(0)  # B of the residual sum's channels
    # a depthwise weight (c, 0) carries F(joined c) |w| B(out c)
    expected = torch.log(joined[:, None, None] * weights["depthwise.weight"][:, 0].abs() * out[:, None, None])
    expected = expected.float()
    got = scores["depthwise.weight"][:, 0]
    kept = mask["depthwise.weight"][:, 0]
    torch.testing.assert_close(got[kept], expected[kept], rtol=1e-4, atol=1e-4)
    residual = joined * (1 + depthwise)  # F of joined + depthwise(joined)
    fc_expected = torch.log(weights["fc.weight"].abs() * residual.repeat_interleave(4)).float()
    kept = mask["fc.weight"]
    torch.testing.assert_close(scores["fc.weight"][kept], fc_expected[kept], rtol=1e-4, atol=1e-4)
    # kept weights on no input -> output path: the depthwise kernel and the classifier columns of channel 2
    assert torch.isneginf(scores["depthwise.weight"][2]).all()
    assert torch.isneginf(scores["fc.weight"][:, 8:12]).all()
    for name, tensor in scores.items():
        assert torch.isneginf(tensor[~mask[name]]).all()
        assert torch.isfinite(tensor[mask[name]]).sum() > 0


def test_betweenness_of_traced_cnn_matches_networkx_on_its_graph() -> None:
    model = CatResidual()
    weights = model.state_dict()
    mask = _random_mask(weights, ["left.weight", "right.weight", "depthwise.weight"])
    graph = channel_graph(model, weights, mask)
    source, target = graph.edges()
    reference = nx.DiGraph(list(zip(source.tolist(), target.tolist())))
    expected = nx.edge_betweenness_centrality(reference, normalized=False)
    got = edge_betweenness(graph)
    assert got.tolist() == pytest.approx([expected[e] for e in zip(source.tolist(), target.tolist())])
    scores = score("betweenness", weights, mask, model=model)
    for name in mask:
        assert torch.isneginf(scores[name][~mask[name]]).all() and not torch.isnan(scores[name]).any()


def test_mlp_ewp_is_the_product_of_masked_weight_matrices() -> None:
    model = Mlp()
    weights = model.state_dict()
    names = ["layers.0.weight", "layers.1.weight", "layers.2.weight"]
    mask = _random_mask(weights, names, density=0.5)
    scores = SCORES["ewp"](weights, mask, model=model)
    matrices = [weights[n].abs().double() * mask[n] for n in names]
    for index, name in enumerate(names):
        forward = torch.ones(6, dtype=torch.float64)
        for matrix in matrices[:index]:
            forward = matrix @ forward
        backward = torch.ones(3, dtype=torch.float64)
        for matrix in reversed(matrices[index + 1 :]):
            backward = matrix.T @ backward
        expected = torch.log(backward[:, None] * matrices[index] * forward[None, :]).float()
        assert torch.equal(torch.isneginf(scores[name]), torch.isneginf(expected))
        torch.testing.assert_close(scores[name][mask[name]], expected[mask[name]])


def test_mlp_betweenness_is_networkx_betweenness_of_the_kept_edges_times_magnitude() -> None:
    model = Mlp()
    weights = model.state_dict()
    names = ["layers.0.weight", "layers.1.weight", "layers.2.weight"]
    mask = _random_mask(weights, names, density=0.5)
    reference = nx.DiGraph()
    for layer, name in enumerate(names):
        for row, col in mask[name].nonzero().tolist():
            reference.add_edge((layer, col), (layer + 1, row))
    centrality = nx.edge_betweenness_centrality(reference, normalized=False)
    scores = score("betweenness", weights, mask, model=model)
    for layer, name in enumerate(names):
        for row, col in mask[name].nonzero().tolist():
            expected = centrality[(layer, col), (layer + 1, row)] * weights[name][row, col].abs().item()
            assert scores[name][row, col].item() == pytest.approx(expected, rel=1e-5)


def test_grouped_conv1d_connects_channels_only_within_groups() -> None:
    model = nn.Sequential(
        nn.Conv1d(4, 6, 3, groups=2, bias=False), nn.ReLU(), nn.AdaptiveAvgPool1d(1), nn.Flatten(),
        nn.Linear(6, 2),
    )
    weights = model.state_dict()
    graph = channel_graph(model, weights, Mask({}))
    grouped = graph.layer("0.weight")
    inputs = (grouped.source - graph.inputs[0]).tolist()
    pairs = set(zip(inputs, (grouped.target - grouped.out_vertices[0]).tolist()))
    assert pairs == {(i, o) for o in range(6) for i in ((0, 1) if o < 3 else (2, 3))}


def test_token_linears_follow_the_channel_dim_after_flatten_and_transpose() -> None:
    model = PatchTokens()
    weights = model.state_dict()
    mask = _random_mask(weights, ["fc1.weight", "fc2.weight"])
    graph = channel_graph(model, weights, mask)
    patch = graph.layer("patch.weight").out_vertices
    assert torch.equal(graph.layer("fc1.weight").in_vertices, patch.expand(8, 6))
    residual = graph.blocks[graph.blocks.index(graph.layer("fc2.weight")) + 1]
    assert torch.equal(graph.layer("head.weight").in_vertices[0], residual.out_vertices)
    scores = score("ewp", weights, mask, model=model)
    assert all(torch.isneginf(scores[n][~mask[n]]).all() for n in mask)


def test_linear_over_tokens_instead_of_channels_is_refused() -> None:
    model = PatchTokens(mix_tokens=True)
    weights = model.state_dict()
    with pytest.raises(InputError, match="module 'fc1'.*OMP and random scores keep working"):
        score("ewp", weights, Mask({}), model=model)


def test_scores_from_passed_resnet20_equal_the_registered_path() -> None:
    model = build_model("resnet20", 3, 10)
    weights = model.state_dict()
    mask = magnitude_prune(weights, Mask.ones_like(weights, prunable_names(model)), 0.8)
    registered, traced = graph_of(weights, mask), graph_of(weights, mask, model)
    assert registered.vertices == traced.vertices and len(registered.blocks) == len(traced.blocks)
    for mine, theirs in zip(registered.blocks, traced.blocks):
        assert mine.name == theirs.name and torch.equal(mine.source, theirs.source)
        assert torch.equal(mine.target, theirs.target) and torch.equal(mine.strength, theirs.strength)
    passed = score("ewp", weights, mask, model=model)
    assert all(torch.equal(passed[n], tensor) for n, tensor in score("ewp", weights, mask).items())


@pytest.mark.parametrize(
    ("model", "what"),
    [
        (Attention(), "module 'attn' \\(MultiheadAttention\\)"),
        (DotProduct(), "operation matmul"),
        (Branching(), "torch.fx cannot trace the forward of Branching"),
    ],
)
@pytest.mark.parametrize("name", ["ewp", "betweenness"])
def test_untraceable_models_get_one_clear_input_error_and_omp_still_works(
    model: nn.Module, what: str, name: str
) -> None:
    weights = model.state_dict()
    mask = Mask({n: torch.ones_like(t, dtype=torch.bool) for n, t in weights.items() if n.endswith("weight")})
    with pytest.raises(InputError, match=f"{what}.*OMP and random scores keep working"):
        score(name, weights, mask, model=model)
    assert score("omp", weights, mask, model=model).keys() == mask.keys()
    assert score("random", weights, mask, model=model).keys() == mask.keys()
