"""Disguises: each keeps the network's function (eval-mode logits) while moving or renaming its weights."""

from __future__ import annotations

import pytest
import torch
from conftest import sparse_model
from torch import nn

from ticketguard.attacks.disguises import (
    DISGUISES,
    build_disguised,
    export_onnx,
    fold_bn,
    permutation_groups,
    permute,
    rename,
    rescale,
    widen,
)
from ticketguard.core.errors import InputError
from ticketguard.core.masks import Mask, mask_from_zeros
from ticketguard.models import build_model, identify_architecture

Sparse = tuple[nn.Module, dict[str, torch.Tensor], Mask]
TOLERANCE = 1e-4




@pytest.fixture(scope="module")
def resnet20() -> Sparse:
    return sparse_model("resnet20", 1)


@pytest.fixture(scope="module")
def resnet18() -> Sparse:
    return sparse_model("resnet18", 3)


@pytest.fixture(scope="module")
def resnet50() -> Sparse:
    return sparse_model("resnet50", 3)


def relative_difference(model: nn.Module, disguised: nn.Module, in_channels: int) -> float:
    inputs = torch.randn(4, in_channels, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, actual = model.eval()(inputs), disguised.eval()(inputs)
    return float((actual - expected).abs().max() / expected.abs().max())


def assert_same_function(sparse: Sparse, weights: dict[str, torch.Tensor]) -> None:
    model, original, _ = sparse
    architecture = identify_architecture(original)
    assert architecture is not None
    assert relative_difference(model, build_disguised(weights, architecture), architecture[1]) < TOLERANCE


def moved(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor], key: str) -> bool:
    return before[key].shape != after[key].shape or not torch.equal(before[key], after[key])


@pytest.mark.parametrize("name", ["permute", "rescale", "fold-bn", "widen"])
def test_every_disguise_keeps_resnet20_logits_and_marks_the_same_weights(resnet20: Sparse, name: str) -> None:
    _, weights, mask = resnet20
    disguised, new_mask = (
        DISGUISES[name](weights, mask, seed=3) if name != "fold-bn" else fold_bn(weights, mask)
    )
    assert_same_function(resnet20, disguised)
    assert moved(weights, disguised, "blocks.4.conv1.weight")
    assert mask_from_zeros(disguised, list(new_mask)) == new_mask


@pytest.mark.parametrize("fixture", ["resnet18", pytest.param("resnet50", marks=pytest.mark.slow)])
@pytest.mark.parametrize("disguise", [permute, rescale])
def test_permute_and_rescale_keep_projection_resnet_logits(request, fixture: str, disguise) -> None:
    sparse: Sparse = request.getfixturevalue(fixture)
    _, weights, mask = sparse
    disguised, new_mask = disguise(weights, mask, seed=5)
    assert_same_function(sparse, disguised)
    assert moved(weights, disguised, "layers.1.conv1.weight") and moved(weights, disguised, "conv1.weight")
    assert mask_from_zeros(disguised, list(new_mask)) == new_mask


def test_permuted_mask_is_the_mask_of_the_permuted_weights_and_differs_from_the_original(
    resnet20: Sparse,
) -> None:
    _, weights, mask = resnet20
    disguised, new_mask = permute(weights, mask, seed=1)
    assert new_mask == Mask({name: disguised[name] != 0 for name in mask})
    assert new_mask != mask and new_mask.density() == mask.density()


def test_option_a_streams_keep_the_carried_channels_in_their_parents_order(resnet20: Sparse) -> None:
    """The stage-2 stream of ResNet-20 holds the stage-1 stream's 16 channels at offset 8 between zero
    channels: a permutation that ignores this changes the function, so permute keeps that order there."""
    model, weights, mask = resnet20
    groups = {g.name: g for g in permutation_groups(("resnet20", 1, 10))}
    streams = [g for g in groups.values() if g.kind == "stream"]
    assert [(g.size, g.embeds) for g in streams] == [
        (16, None),
        (32, ("stream.0", 8)),
        (64, (streams[1].name, 16)),
    ]
    disguised, _ = permute(weights, mask, seed=2)
    stem = weights["conv.weight"]
    order = [int((disguised["conv.weight"][i] == stem).flatten(1).all(1).nonzero()) for i in range(16)]
    assert order != list(range(16))
    carried = disguised["blocks.3.bn2.running_mean"][8:24]
    assert torch.equal(carried, weights["blocks.3.bn2.running_mean"][8:24][order])
    naive = dict(weights)
    shuffle = torch.randperm(32, generator=torch.Generator().manual_seed(0))
    for key, dim in groups[streams[1].name].axes:
        naive[key] = naive[key].index_select(dim, shuffle)
    assert relative_difference(model, build_disguised(naive, ("resnet20", 1, 10)), 1) > 1e-2


def test_rescale_by_a_large_factor_on_one_layer_is_exact(resnet20: Sparse) -> None:
    _, weights, mask = resnet20
    disguised, new_mask = rescale(weights, mask, layer="blocks.6.conv1.weight", factor=100)
    assert_same_function(resnet20, disguised)
    assert torch.allclose(disguised["blocks.6.conv1.weight"], 100 * weights["blocks.6.conv1.weight"])
    assert torch.equal(disguised["blocks.5.conv1.weight"], weights["blocks.5.conv1.weight"])
    assert new_mask == mask


def test_rescale_refuses_unknown_layers_and_bad_factors(resnet20: Sparse) -> None:
    _, weights, mask = resnet20
    with pytest.raises(InputError, match="no conv followed by BatchNorm"):
        rescale(weights, mask, layer="fc.weight")
    with pytest.raises(InputError, match="factor must be > 0"):
        rescale(weights, mask, factor=-2)
    with pytest.raises(InputError, match="spread must be >= 1"):
        rescale(weights, mask, spread=0.5)


def test_fold_bn_leaves_no_batchnorm_and_adds_conv_biases(resnet20: Sparse) -> None:
    _, weights, mask = resnet20
    folded, new_mask = fold_bn(weights, mask)
    assert not any(".bn" in key or key.startswith("bn.") for key in folded)
    assert "blocks.0.conv1.bias" in folded and new_mask == mask
    assert not any(
        isinstance(m, nn.BatchNorm2d) for m in build_disguised(folded, ("resnet20", 1, 10)).modules()
    )


def test_rename_to_torchvision_names_reorders_and_keeps_every_tensor(resnet20: Sparse) -> None:
    _, weights, mask = resnet20
    renamed, new_mask = rename(weights, mask, seed=4)
    assert torch.equal(renamed["layer3.0.conv1.weight"], weights["blocks.6.conv1.weight"])
    assert torch.equal(renamed["conv1.weight"], weights["conv.weight"])
    assert torch.equal(new_mask["layer3.0.conv1.weight"], mask["blocks.6.conv1.weight"])
    tensors, original = [id(t) for t in renamed.values()], [id(t) for t in weights.values()]
    assert tensors != original and sorted(tensors) == sorted(original)


def test_rename_of_resnet18_uses_downsample_and_opaque_names_hide_every_layer(resnet18: Sparse) -> None:
    _, weights, mask = resnet18
    renamed, _ = rename(weights, mask)
    assert torch.equal(renamed["layer2.0.downsample.0.weight"], weights["layers.2.shortcut.0.weight"])
    opaque, opaque_mask = rename(weights, mask, style="opaque", seed=1)
    assert len(opaque) == len(weights) and all(not any(c == "." for c in key) for key in opaque)
    assert opaque_mask.kept() == mask.kept() and set(opaque_mask) <= set(opaque)


def test_rename_follows_fold_bn_and_widen_but_needs_registered_layer_names(resnet20: Sparse) -> None:
    _, weights, mask = resnet20
    folded, _ = fold_bn(weights, mask)
    widened, _ = widen(weights, mask)
    assert torch.equal(rename(folded, mask)[0]["layer2.0.conv1.bias"], folded["blocks.3.conv1.bias"])
    assert torch.equal(rename(widened, mask)[0]["layer2.0.conv1.weight"], widened["blocks.3.conv1.weight"])
    opaque, opaque_mask = rename(weights, mask, style="opaque")
    with pytest.raises(InputError, match="layer names of a registered architecture"):
        rename(opaque, opaque_mask)


def test_widen_adds_dummy_and_split_channels_to_every_hidden_group(resnet20: Sparse) -> None:
    _, weights, mask = resnet20
    widened, _ = widen(weights, mask, dummies=3, splits=2, seed=0)
    assert widened["blocks.0.conv1.weight"].shape == (21, 16, 3, 3)
    assert widened["blocks.0.conv2.weight"].shape == (16, 21, 3, 3)
    assert widened["blocks.0.bn1.running_var"].shape == (21,)
    assert widened["blocks.0.conv2.weight"].flatten(2).abs().sum((0, 2)).eq(0).sum() >= 3
    assert_same_function(resnet20, widened)


@pytest.mark.slow
def test_widen_of_a_bottleneck_widens_both_hidden_groups(resnet50: Sparse) -> None:
    _, weights, mask = resnet50
    widened, new_mask = widen(weights, mask, dummies=1, splits=1)
    assert widened["layers.0.conv2.weight"].shape == (66, 66, 3, 3)
    assert widened["layers.0.conv3.weight"].shape == (256, 66, 1, 1)
    assert mask_from_zeros(widened, list(new_mask)) == new_mask


def test_structural_disguises_refuse_weights_of_no_registered_architecture(resnet20: Sparse) -> None:
    _, weights, mask = resnet20
    renamed, renamed_mask = rename(weights, mask, style="opaque")
    for name in ("permute", "rescale", "fold-bn", "widen"):
        with pytest.raises(InputError, match="registered architecture"):
            DISGUISES[name](renamed, renamed_mask)


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")  # the legacy exporter warns
def test_export_onnx_writes_one_file_and_restores_the_training_mode(tmp_path) -> None:
    model = build_model("resnet20", 1, 10).train()
    export_onnx(model, tmp_path / "model.onnx", (1, 8, 8), dynamo=False)
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"] and model.training
