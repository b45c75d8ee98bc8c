import pytest
import torch
import torch.nn.utils.prune as torch_prune
from hypothesis import given, settings
from hypothesis import strategies as st

from ticketguard.core.errors import InputError
from ticketguard.core.files import load_tensors
from ticketguard.core.masks import (
    Mask,
    fold_pruning_reparametrisation,
    load_mask,
    magnitude_prune,
    mask_from_zeros,
    prunable_names,
    save_mask,
    squeeze,
)
from ticketguard.models import build_model


def test_density_follows_the_paper() -> None:
    full = Mask({"a": torch.ones(4, 5), "b": torch.ones(10)})
    half = Mask({"a": torch.tensor([1, 0] * 10).view(4, 5), "b": torch.zeros(10)})
    assert full.density() == 1.0
    assert half.density() == pytest.approx(10 / 30)
    assert half.kept() == 10 and half.total() == 30


def test_flat_view_splits_back_and_picks_subsets_of_the_kept_weights() -> None:
    mask = Mask({"a": torch.tensor([[1, 0], [1, 1]]), "b": torch.tensor([0, 1, 0])})
    assert mask.flat().tolist() == [True, False, True, True, False, True, False]
    assert mask.unflatten(mask.flat()) == mask
    weights = {"a": torch.tensor([[1.0, 9.0], [2.0, 3.0]]), "b": torch.tensor([9.0, 4.0, 9.0])}
    assert mask.kept_values(weights).tolist() == [1.0, 2.0, 3.0, 4.0]
    subset = mask.subset(torch.tensor([False, True, False, True]))
    assert subset.flat().tolist() == [False, False, True, False, False, True, False]
    spread = mask.kept_spread(weights)
    assert spread["a"] == pytest.approx(1.0) and spread["b"] == 0.1  # one kept weight: no spread measured
    with pytest.raises(ValueError):
        mask.unflatten(torch.zeros(6, dtype=torch.bool))


def test_non_binary_mask_is_refused() -> None:
    with pytest.raises(InputError, match="other than 0 and 1"):
        Mask({"a": torch.tensor([0.0, 0.5, 1.0])})
    with pytest.raises(InputError, match="non-finite"):
        Mask({"a": torch.tensor([0.0, float("nan")])})


def test_prunable_set_skips_the_stem_and_adds_the_classifier_on_request() -> None:
    model = build_model("resnet20")
    names = prunable_names(model)
    assert "conv.weight" not in names and len(names) == 18
    assert all(n.startswith("blocks.") for n in names)
    assert prunable_names(model, include_classifier=True)[-1] == "fc.weight"
    resnet18 = prunable_names(build_model("resnet18"))
    assert "conv1.weight" not in resnet18 and any("shortcut" in n for n in resnet18)


def test_magnitude_prune_removes_exactly_the_smallest_remaining_weights() -> None:
    weights = {"a": torch.arange(1.0, 11.0), "b": -torch.arange(11.0, 21.0)}
    mask = Mask({"a": torch.ones(10), "b": torch.ones(10)})
    mask["a"][0] = False
    pruned = magnitude_prune(weights, mask, 0.5)
    assert pruned.kept() == 19 - round(0.5 * 19)
    assert not pruned["a"].any()  # all of a is smaller than all of b
    assert pruned["b"][-9:].all()


@settings(max_examples=40, deadline=None)
@given(st.floats(0.0, 0.95), st.integers(0, 1000))
def test_magnitude_prune_keeps_a_subset_of_the_expected_size(fraction: float, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    weights = {"a": torch.randn(6, 4, 3, 3, generator=generator), "b": torch.randn(50, generator=generator)}
    mask = Mask({k: torch.rand(v.shape, generator=generator) < 0.7 for k, v in weights.items()})
    pruned = magnitude_prune(weights, mask, fraction)
    assert all((pruned[k] <= mask[k]).all() for k in mask)
    assert pruned.kept() == mask.kept() - round(fraction * mask.kept())


def test_squeeze_gives_out_in_connectivity() -> None:
    conv = torch.zeros(4, 3, 3, 3, dtype=torch.bool)
    conv[1, 2, 0, 1] = True
    conv[3, 0] = True
    connectivity = squeeze(conv)
    assert connectivity.shape == (4, 3)
    assert connectivity.nonzero().tolist() == [[1, 2], [3, 0]]


def test_apply_zeros_pruned_weights_and_checks_shapes() -> None:
    model = build_model("resnet20")
    names = prunable_names(model)
    mask = magnitude_prune(dict(model.named_parameters()), Mask.ones_like(dict(model.named_parameters()), names), 0.6)
    mask.apply_(model)
    params = dict(model.named_parameters())
    assert all(torch.equal(params[n] != 0, mask[n]) for n in names)
    with pytest.raises(InputError, match="shape"):
        Mask({names[0]: torch.ones(2, 2)}).apply_(model)


def test_mask_round_trips_through_safetensors(tmp_path) -> None:
    mask = Mask({"x": torch.rand(3, 4) < 0.5})
    save_mask(tmp_path / "m.safetensors", mask)
    assert load_mask(tmp_path / "m.safetensors") == mask


def test_torch_prune_checkpoint_folds_to_weights_and_mask(tmp_path) -> None:
    model = build_model("resnet20")
    torch_prune.l1_unstructured(model.blocks[0].conv1, "weight", amount=0.3)
    torch.save(model.state_dict(), tmp_path / "pruned.pt")
    weights, mask = fold_pruning_reparametrisation(load_tensors(tmp_path / "pruned.pt"))
    assert mask is not None and list(mask) == ["blocks.0.conv1.weight"]
    assert mask.density() == pytest.approx(0.7, abs=0.01)
    assert torch.equal(weights["blocks.0.conv1.weight"], model.blocks[0].conv1.weight.detach())
    assert "blocks.0.conv1.weight_orig" not in weights


def test_open_lth_style_mask_file_and_zero_weights_give_the_same_mask(tmp_path) -> None:
    model = build_model("resnet20")
    names = prunable_names(model)
    params = {k: v.detach() for k, v in model.named_parameters()}
    mask = magnitude_prune(params, Mask.ones_like(params, names), 0.8)
    torch.save({k: v.int() for k, v in mask.items()}, tmp_path / "mask.pth")
    assert load_mask(tmp_path / "mask.pth") == mask
    mask.apply_(model)
    assert mask_from_zeros({k: v.detach() for k, v in model.named_parameters()}, names) == mask
