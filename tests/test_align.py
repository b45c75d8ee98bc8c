"""Alignment: a disguised copy of the owner's ticket comes back in the reference's own form, mask and units."""

from __future__ import annotations

import base64
import copy
import json
import zlib
from collections.abc import Callable

import pytest
import torch
from conftest import sparse_model
from torch import nn

from ticketguard.artifacts.suspect import Suspect, load_suspect
from ticketguard.attacks.disguises import (
    build_disguised,
    export_onnx,
    fold_bn,
    permute,
    rename,
    rescale,
    widen,
)
from ticketguard.core.errors import InputError
from ticketguard.core.masks import Mask, magnitude_prune
from ticketguard.models import build_model
from ticketguard.verification.align import AlignmentError, Reference, align

Weights = dict[str, torch.Tensor]
Sparse = tuple[nn.Module, Weights, Mask]
TOLERANCE = 1e-4
PERMUTE, RESCALE = (permute, {"seed": 1}), (rescale, {"seed": 2, "spread": 8.0})
FOLD, WIDEN = (fold_bn, {}), (widen, {"dummies": 2, "splits": 2, "seed": 4})
TORCHVISION, OPAQUE = (rename, {}), (rename, {"style": "opaque", "seed": 3})
CHAINS = {
    "none": [],
    "permute": [PERMUTE],
    "rescale": [RESCALE],
    "fold-bn": [FOLD],
    "rename-torchvision": [TORCHVISION],
    "rename-opaque": [OPAQUE],
    "widen": [WIDEN],
    "permute+rescale": [PERMUTE, RESCALE],
    "permute+rescale+fold-bn": [PERMUTE, RESCALE, FOLD],
    "permute+rename-opaque": [PERMUTE, OPAQUE],
    "permute+rescale+fold-bn+rename-opaque": [PERMUTE, RESCALE, FOLD, OPAQUE],
    "permute+rescale+widen+rename-torchvision": [PERMUTE, RESCALE, WIDEN, TORCHVISION],
}


pytestmark = pytest.mark.usefixtures("one_thread")




@pytest.fixture(scope="module")
def owner() -> Sparse:
    return sparse_model("resnet20", 1, seed=0)


@pytest.fixture(scope="module")
def reference(owner: Sparse) -> Reference:
    _, weights, mask = owner
    return Reference.of("resnet20", 1, 10, weights, mask)


def disguised(sparse: Sparse, chain: list[tuple[Callable, dict]]) -> tuple[Weights, Weights]:
    """The suspect's weights after ``chain``, and the last of them that still has the registered names (the
    same function, runnable with build_disguised)."""
    _, weights, mask = sparse
    runnable = weights
    for disguise, params in chain:
        weights, mask = disguise(weights, mask, **params)
        if disguise is not rename:
            runnable = weights
    return weights, runnable


def logits(model: nn.Module, in_channels: int) -> torch.Tensor:
    inputs = torch.randn(4, in_channels, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model.eval()(inputs)


def relative(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-12))


def assert_aligned_to_owner(
    aligned_weights: Weights, aligned_mask: Mask, owner: Sparse, suspect_logits
) -> None:
    """Reference keys, shapes and dtypes; the owner's mask exactly; the suspect's function; the owner's units."""
    _, weights, mask = owner
    assert list(aligned_weights) == list(weights)
    assert all(
        aligned_weights[k].shape == t.shape and aligned_weights[k].dtype == t.dtype
        for k, t in weights.items()
    )
    assert aligned_mask == mask
    aligned_model = build_model("resnet20", 1, 10)
    aligned_model.load_state_dict(aligned_weights)
    assert relative(logits(aligned_model, 1), suspect_logits) < TOLERANCE
    for key, tensor in weights.items():
        if tensor.is_floating_point():
            assert relative(aligned_weights[key], tensor) < TOLERANCE, key


@pytest.mark.parametrize("chain", list(CHAINS))
def test_every_disguise_and_chain_aligns_back_to_the_owners_ticket(
    owner: Sparse, reference: Reference, chain: str
) -> None:
    weights, runnable = disguised(owner, CHAINS[chain])
    alignment = align(Suspect.from_weights(weights, "zeros"), reference)
    suspect_logits = logits(build_disguised(runnable, ("resnet20", 1, 10)), 1)
    assert_aligned_to_owner(alignment.weights, alignment.mask, owner, suspect_logits)
    assert alignment.report["mean_overlap"] == 1.0
    assert alignment.report["converged"]


def test_negative_batchnorm_weights_fold_into_sign_flips_that_alignment_undoes() -> None:
    """Folding puts gamma's sign into the kernel; norms cannot see it, the reference's pivot weight can."""
    model, weights, mask = sparse_model("resnet20", 1, seed=5)
    for key in ("bn.weight", "blocks.4.bn1.weight", "blocks.8.bn2.weight"):
        weights[key][::3] *= -1
    model.load_state_dict(weights)
    reference = Reference.of("resnet20", 1, 10, weights, mask)
    folded, runnable = disguised((model, weights, mask), [PERMUTE, FOLD, OPAQUE])
    alignment = align(Suspect.from_weights(folded, "zeros"), reference)
    assert alignment.report["rescaled"]["blocks.4.conv1"]["flipped"] == 11
    suspect_logits = logits(build_disguised(runnable, ("resnet20", 1, 10)), 1)
    assert_aligned_to_owner(alignment.weights, alignment.mask, (model, weights, mask), suspect_logits)


def test_report_says_what_was_undone(owner: Sparse, reference: Reference) -> None:
    weights, _ = disguised(owner, [PERMUTE, RESCALE, WIDEN, TORCHVISION])
    report = align(Suspect.from_weights(weights, "zeros"), reference).report
    assert report["structure"] == "torchvision names" and report["batchnorm"] == "kept"
    assert report["layers"]["blocks.6.conv1.weight"] == "layer3.0.conv1.weight"
    assert report["removed"]["blocks.0.hidden1"] == {"merged": 2, "dropped": 2}
    assert report["permuted"]["stream.0"] > 0 and report["permuted"]["blocks.4.hidden1"] > 0
    assert (
        report["rescaled"]["blocks.4.conv1"]["channels"] == 32
        and report["rescaled"]["conv"]["max_factor"] <= 8
    )
    json.dumps(report)


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning", "ignore::FutureWarning")
def test_onnx_export_of_a_permuted_rescaled_ticket_aligns_back(
    owner: Sparse, reference: Reference, tmp_path
) -> None:
    weights, _ = disguised(owner, [PERMUTE, RESCALE])
    thief = build_disguised(weights, ("resnet20", 1, 10)).eval()
    export_onnx(thief, tmp_path / "thief.onnx", (1, 8, 8), dynamo=False)
    alignment = align(load_suspect(tmp_path / "thief.onnx"), reference)
    assert alignment.report["structure"] == "onnx graph"
    assert alignment.report["batchnorm"] == "rebuilt from folded conv biases"
    assert_aligned_to_owner(alignment.weights, alignment.mask, owner, logits(thief, 1))


def test_an_independent_ticket_keeps_its_function_but_not_the_owners_mask(
    owner: Sparse, reference: Reference
) -> None:
    """Alignment maximises agreement, so an innocent ticket gains some overlap; the owner's stays far above."""
    model, weights, _ = sparse_model("resnet20", 1, seed=7)
    alignment = align(Suspect.from_weights(weights, "zeros"), reference)
    aligned = build_model("resnet20", 1, 10)
    aligned.load_state_dict(alignment.weights)
    assert relative(logits(aligned, 1), logits(model, 1)) < TOLERANCE
    owners = align(Suspect.from_weights(disguised(owner, [PERMUTE, OPAQUE])[0], "zeros"), reference)
    innocent, guilty = alignment.report["mean_overlap"], owners.report["mean_overlap"]
    print(f"mean mask overlap after alignment: owner's copy {guilty:.3f}, independent ticket {innocent:.3f}")
    assert guilty == 1.0 and innocent < 0.3


def test_an_independent_ticket_with_opaque_names_aligns_without_the_owners_mask(reference: Reference) -> None:
    other = sparse_model("resnet20", 1, seed=8)
    weights, _ = disguised(other, [OPAQUE])
    overlap = align(Suspect.from_weights(weights, "zeros"), reference).report["mean_overlap"]
    assert overlap < 0.3


def test_another_architecture_raises_alignment_error(reference: Reference) -> None:
    weights = build_model("resnet18", 1, 10).state_dict()
    with pytest.raises(AlignmentError, match="another architecture"):
        align(Suspect.from_weights(weights, "zeros"), reference)
    renamed, _ = rename(weights, Mask({}), style="opaque")
    with pytest.raises(AlignmentError, match="another architecture"):
        align(Suspect.from_weights(renamed, "zeros"), reference)


def test_wider_streams_and_live_extra_channels_are_refused(owner: Sparse, reference: Reference) -> None:
    _, weights, _ = owner
    wider = dict(weights)
    wider["fc.weight"] = torch.cat([weights["fc.weight"], torch.ones(10, 1)], 1)
    with pytest.raises(AlignmentError, match="widths"):
        align(Suspect.from_weights(wider, "zeros"), reference)
    widened, _ = widen(weights, Mask({}), dummies=2, splits=0)
    live = dict(widened)
    live["blocks.0.conv2.weight"] = widened["blocks.0.conv2.weight"] + 0.01
    with pytest.raises(AlignmentError, match="would change the function"):
        align(Suspect.from_weights(live, "zeros"), reference)


def test_a_ticket_pruned_further_after_its_disguise_aligns_to_a_subset_of_the_owners_mask(
    owner: Sparse, reference: Reference
) -> None:
    """Pruning in the thief's (rescaled) units only removes kept weights, so assignment still finds the order."""
    _, weights, mask = owner
    disguised_weights, disguised_mask = rescale(*permute(weights, mask, seed=1), seed=2, spread=8.0)
    pruned_mask = magnitude_prune(disguised_weights, disguised_mask, 0.2)
    pruned = {k: t * pruned_mask[k] if k in pruned_mask else t for k, t in disguised_weights.items()}
    alignment = align(Suspect.from_weights(pruned, "zeros"), reference)
    assert all(bool((alignment.mask[k] <= mask[k]).all()) for k in mask)
    assert alignment.mask.kept() == pruned_mask.kept() and 0.75 < alignment.report["mean_overlap"] < 0.85


def test_opaque_names_with_widened_layers_and_non_finite_weights_are_refused(
    owner: Sparse, reference: Reference
) -> None:
    weights, _ = disguised(owner, [WIDEN, OPAQUE])
    with pytest.raises(AlignmentError, match="opaque names every layer must keep the reference's width"):
        align(Suspect.from_weights(weights, "zeros"), reference)
    broken = dict(owner[1])
    broken["blocks.2.bn1.running_var"] = torch.full((16,), float("nan"))
    with pytest.raises(AlignmentError, match="non-finite"):
        align(Suspect.from_weights(broken, "zeros"), reference)


@pytest.mark.slow
def test_a_permuted_rescaled_opaque_resnet18_aligns_back() -> None:
    model, weights, mask = sparse_model("resnet18", 3, seed=0)
    reference = Reference.of("resnet18", 3, 10, weights, mask)
    suspect, runnable = disguised((model, weights, mask), [PERMUTE, RESCALE, OPAQUE])
    alignment = align(Suspect.from_weights(suspect, "zeros"), reference)
    assert alignment.mask == mask and alignment.report["structure"] == "content"
    aligned = build_model("resnet18", 3, 10)
    aligned.load_state_dict(alignment.weights)
    expected = logits(build_disguised(runnable, ("resnet18", 3, 10)), 3)
    assert relative(logits(aligned, 3), expected) < TOLERANCE
    assert all(
        relative(alignment.weights[k], t) < TOLERANCE for k, t in weights.items() if t.is_floating_point()
    )


# ---- the reference as JSON ---------------------------------------------------------------------------------


def test_reference_json_round_trip_aligns_the_same(owner: Sparse, reference: Reference) -> None:
    data = json.loads(json.dumps(reference.to_json()))
    restored = Reference.from_json(data)
    assert restored.to_json() == reference.to_json()
    weights, _ = disguised(owner, [PERMUTE, RESCALE])
    assert align(Suspect.from_weights(weights, "zeros"), restored).mask == owner[2]
    print(f"resnet20 reference: {len(json.dumps(data))} bytes of JSON")


def _set(path: tuple, value: object) -> Callable[[dict], None]:
    def change(data: dict) -> None:
        target = data
        for step in path[:-1]:
            target = target[step]
        target[path[-1]] = value

    return change


def _bomb(data: dict) -> None:
    """Bits that inflate far past the mask's size."""
    entry = data["masks"]["blocks.0.conv1.weight"]
    entry["bits"] = base64.b64encode(zlib.compress(b"\xff" * 10**6, 9)).decode()


def _negative_variance(data: dict) -> None:
    stats = torch.ones(4, 16)
    stats[3, 0] = -1
    data["batchnorms"]["bn"] = base64.b64encode(stats.numpy().astype("<f4").tobytes()).decode()


MALFORMED = {
    "another format": _set(("format",), "onnx"),
    "unknown architecture": _set(("architecture",), "resnet21"),
    "architecture of wrong type": _set(("architecture",), 20),
    "in_channels as a string": _set(("in_channels",), "1"),
    "in_channels as a bool": _set(("in_channels",), True),
    "huge in_channels": _set(("in_channels",), 10**9),
    "masks as a list": _set(("masks",), []),
    "no masks": _set(("masks",), {}),
    "huge mask shape": _set(("masks", "blocks.0.conv1.weight", "shape"), [10**9, 10**9, 3, 3]),
    "mask of no layer": _set(("masks", "nowhere.weight"), {"shape": [16, 16, 3, 3], "bits": ""}),
    "bad base64": _set(("masks", "blocks.0.conv1.weight", "bits"), "not base64!!"),
    "not zlib": _set(("masks", "blocks.0.conv1.weight", "bits"), base64.b64encode(b"garbage").decode()),
    "zip bomb": _bomb,
    "huge base64": _set(("kernels", "conv.weight", "norm"), "A" * 10**6),
    "short norm": _set(("kernels", "conv.weight", "norm"), base64.b64encode(b"\0" * 8).decode()),
    "missing kernel": lambda data: data["kernels"].pop("conv.weight"),
    "negative variance": _negative_variance,
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_reference_json_is_refused_with_input_error(reference: Reference, case: str) -> None:
    data = copy.deepcopy(reference.to_json())
    MALFORMED[case](data)
    with pytest.raises(InputError, match="reference|format"):
        Reference.from_json(data)


def test_a_reference_that_is_no_json_object_is_refused(reference: Reference) -> None:
    with pytest.raises(InputError, match="must be a JSON object"):
        Reference.from_json([reference.to_json()])


def test_reference_of_refuses_weights_of_another_shape_and_an_empty_mask(owner: Sparse) -> None:
    _, weights, mask = owner
    with pytest.raises(InputError, match="no resnet20 state_dict"):
        Reference.of("resnet20", 3, 10, weights, mask)
    with pytest.raises(InputError, match="needs the ticket's mask"):
        Reference.of("resnet20", 1, 10, weights, Mask({}))
