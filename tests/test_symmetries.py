"""Channel symmetries read from a model's traced forward, and the alignment of models named by import path that
rests on them: a permuted and rescaled copy computes the same function, is put back in the owner's order and
units, and shows ownership; an independent model of the same architecture does not."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
import torch

import ticketguard
from ticketguard import Claim
from ticketguard.artifacts.suspect import Suspect
from ticketguard.cli import main
from ticketguard.core.errors import InputError
from ticketguard.core.files import save_tensors
from ticketguard.core.masks import Mask, magnitude_prune, prunable_names
from ticketguard.models import build_model, spec
from ticketguard.models.architecture import permutation_groups
from ticketguard.models.symmetries import Symmetry, channel_symmetries, permute_channels, scale_channels
from ticketguard.schemes.signature import embed_signature
from ticketguard.verification.align import AlignmentError, Reference, align
from ticketguard.verification.verify import verify

ZOO = ("tests.zoo:small_cnn", "tests.zoo:mlp", "tests.zoo:tiny_transformer")
Weights = dict[str, torch.Tensor]


@pytest.fixture(autouse=True)
def new_process() -> Iterator[None]:
    spec.forget_trusted_code()
    yield
    spec.forget_trusted_code()


def trained_looking(architecture: str, seed: int) -> torch.nn.Module:
    """The architecture with random BatchNorm statistics, as training leaves them (not the identity)."""
    if spec.is_import_path(architecture):
        ticketguard.trust_model_code(architecture)
    torch.manual_seed(seed)
    model = build_model(architecture, 1, 10).eval()
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.normal_()
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.normal_()
            module.bias.data.normal_()
    return model


def disguised(weights: Weights, symmetries: list[Symmetry], seed: int) -> Weights:
    """Every symmetry permuted at random, every rescalable one rescaled by factors in about [1/7, 7]."""
    generator = torch.Generator().manual_seed(seed)
    moved = permute_channels(
        weights, symmetries, {s.name: torch.randperm(s.size, generator=generator) for s in symmetries}
    )
    for symmetry in symmetries:
        if symmetry.scaling is not None:
            factors = (
                torch.exp(2 * torch.rand(symmetry.size, generator=generator, dtype=torch.float64) - 1) ** 2
            )
            moved = scale_channels(moved, symmetry, factors.to(weights[symmetry.writers()[0].key].dtype))
    return moved


@pytest.mark.parametrize("architecture", [*ZOO, "resnet18"])
def test_permuting_and_rescaling_every_traced_symmetry_keeps_the_function(architecture: str) -> None:
    model = trained_looking(architecture, 0).double()
    symmetries = channel_symmetries(model)
    weights = {k: t.detach().clone() for k, t in model.state_dict().items()}
    images = torch.randn(3, 1, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        before = model(images)
        moved = disguised(weights, symmetries, 1)
        model.load_state_dict(moved)
        after = model(images)
    assert sum(not torch.equal(weights[k], moved[k]) for k in weights) >= 6
    assert torch.allclose(before, after, atol=1e-10)


def test_the_traced_symmetries_of_resnet18_are_its_permutation_groups() -> None:
    with torch.device("meta"):
        model = build_model("resnet18", 3, 10)
    traced = {frozenset((a.key, a.dim) for a in s.axes) for s in channel_symmetries(model)}
    assert traced == {frozenset(g.axes) for g in permutation_groups(("resnet18", 3, 10))}


def test_attention_heads_permute_as_blocks_and_the_residual_stream_is_not_rescaled() -> None:
    symmetries = {s.name: s for s in channel_symmetries(trained_looking("tests.zoo:tiny_transformer", 0))}
    heads = symmetries["encoder.layers.0.self_attn.heads"]
    rows = next(a for a in heads.axes if a.key.endswith("in_proj_weight"))
    assert heads.size == 4 and rows.positions.shape == (4, 3 * 8)  # query, key and value rows of a head
    assert symmetries["patches"].scaling is None and symmetries["encoder.layers.0.linear1"].scaling == "relu"


def dense(architecture: str, seed: int) -> tuple[Weights, Mask]:
    """The weights before pruning, and the mask that keeps the largest 20 % of each prunable layer."""
    model = trained_looking(architecture, seed)
    weights = {k: t.detach().clone() for k, t in model.state_dict().items()}
    return weights, magnitude_prune(weights, Mask.ones_like(weights, prunable_names(model)), 0.8)


def pruned(weights: Weights, mask: Mask) -> Weights:
    return {k: t * mask[k] if k in mask else t for k, t in weights.items()}


def protected(architecture: str, seed: int) -> tuple[Weights, Mask]:
    weights, mask = dense(architecture, seed)
    return pruned(weights, mask), mask


@pytest.mark.parametrize("architecture", ZOO)
def test_alignment_puts_a_disguised_copy_back_in_the_owners_order_and_units(architecture: str) -> None:
    weights, mask = protected(architecture, 0)
    reference = Reference.from_json(Reference.of(architecture, 1, 10, weights, mask).to_json())
    symmetries = channel_symmetries(build_model(architecture, 1, 10))
    for seed in range(4):  # a layer inside the CNN's residual stream reads and writes the same symmetry
        copy = {f"net.{k}": t for k, t in disguised(weights, symmetries, seed).items()}
        alignment = align(Suspect(copy, Mask({}), None, "copy"), reference)
        assert (
            alignment.report["mean_overlap"] == 1.0 and alignment.report["structure"] == "names under 'net.'"
        )
        assert sum(alignment.report["permuted"].values()) > 0
        for key, tensor in weights.items():
            if tensor.is_floating_point() and "running" not in key:
                torch.testing.assert_close(alignment.weights[key], tensor, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("architecture", ZOO)
def test_a_disguised_copy_shows_ownership_and_an_independent_model_does_not(architecture: str) -> None:
    weights, mask = dense(architecture, 0)
    signed, signature, _ = embed_signature(mask, weights, weights, "ACME")
    owned = pruned(weights, signed)
    claim = Claim(signature, {}, reference=Reference.of(architecture, 1, 10, owned, signed))
    symmetries = channel_symmetries(build_model(architecture, 1, 10))
    copy = verify(disguised(owned, symmetries, 3), claim)
    assert copy.owned
    assert next(e for e in copy.evidence if e.name == "qr-signature").details["decodes_to_claim"]
    assert next(e for e in copy.evidence if e.name == "fingerprint").passed
    independent, _ = protected(architecture, 9)
    verdict = verify(disguised(independent, symmetries, 3), claim)
    assert not verdict.owned
    assert all(e.p_value > 1e-3 for e in verdict.evidence if e.p_value is not None)


def test_a_model_named_by_import_path_is_aligned_only_with_its_code_trusted() -> None:
    weights, mask = protected("tests.zoo:mlp", 0)
    reference = Reference.of("tests.zoo:mlp", 1, 10, weights, mask)
    spec.forget_trusted_code()
    with pytest.raises(AlignmentError, match="verify --model tests.zoo:mlp"):
        align(Suspect(weights, Mask({}), None, "copy"), reference)


def test_verify_aligns_a_model_it_is_told_to_import_and_says_how_when_it_is_not(tmp_path, capsys) -> None:
    weights, mask = dense("tests.zoo:mlp", 0)
    signed, signature, _ = embed_signature(mask, weights, weights, "ACME")
    owned = pruned(weights, signed)
    claim = Claim(signature, {}, reference=Reference.of("tests.zoo:mlp", 1, 10, owned, signed))
    claim_path = tmp_path / "claim.json"
    claim_path.write_text(json.dumps(claim.to_json()))
    save_tensors(
        tmp_path / "copy.safetensors",
        disguised(owned, channel_symmetries(build_model("tests.zoo:mlp", 1, 10)), 4),
    )
    spec.forget_trusted_code()
    arguments = ["verify", str(tmp_path / "copy.safetensors"), "--claim", str(claim_path), "--json"]
    assert main(arguments) == 1  # the claim's name alone imports nothing, and the permuted copy is not read
    report = json.loads(capsys.readouterr().out)
    assert any("verify --model tests.zoo:mlp" in u["reason"] for u in report["unavailable"])
    assert main([*arguments, "--model", "tests.zoo:mlp"]) == 0
    assert json.loads(capsys.readouterr().out)["owned"]


def test_a_hostile_reference_of_a_model_named_by_import_path_is_refused_before_allocating() -> None:
    weights, mask = protected("tests.zoo:mlp", 0)
    data = Reference.of("tests.zoo:mlp", 1, 10, weights, mask).to_json()
    huge = {**data, "masks": {"1.weight": {"shape": [65536, 65536], "bits": ""}}}
    with pytest.raises(InputError, match="2 to 5 dims"):
        Reference.from_json(huge)
    wrong = {**data, "masks": {"9.weight": data["masks"]["3.weight"]}}  # a layer the MLP does not have
    reference = Reference.from_json(wrong)
    with pytest.raises(AlignmentError, match="no weight"):
        align(Suspect(weights, Mask({}), None, "copy"), reference)
