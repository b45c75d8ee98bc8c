"""Bring your own model: architectures ticketguard does not register, named by import path, through the whole
story (find -> protect -> attack -> verify) from the command line and from Python."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.utils.prune as torch_prune

import ticketguard
from ticketguard import Claim, DefenceClaim, SearchConfig, TrainConfig, attack, find_extreme_ticket, protect
from ticketguard.artifacts.ticket import Ticket
from ticketguard.cli import main
from ticketguard.core.errors import InputError
from ticketguard.core.masks import Mask, magnitude_prune, prunable_names
from ticketguard.models import build_model, spec
from ticketguard.schemes.keymask import split_key
from ticketguard.schemes.signature import embed_signature, raise_code_weights
from ticketguard.training.loop import predict_labels
from ticketguard.verification.blackbox import Endpoint, ModelServer, load_served_model, query_labels
from ticketguard.verification.defence import defence_threshold
from ticketguard.verification.verify import verify, verify_endpoint

OWN_MODELS = ("tests.zoo:small_cnn", "tests.zoo:mlp", "tests.zoo:tiny_transformer")
QUICK = ["--epochs", "4", "--rewind-epoch", "1", "--ratios", "0.5", "--max-rounds", "1", "--decide-on", "test",
         "--validation-fraction", "0"]


@pytest.fixture(autouse=True)
def new_process() -> Iterator[None]:
    """Trust is per process: every test starts as a fresh command would, and leaves none behind."""
    spec.forget_trusted_code()
    yield
    spec.forget_trusted_code()


def forget_trust() -> None:
    spec.forget_trusted_code()


def test_import_paths_are_parsed_not_evaluated() -> None:
    parsed = spec.parse_spec("tests.zoo:mlp(hidden=32, side=8)")
    assert (parsed.module, parsed.factory, dict(parsed.kwargs)) == ("tests.zoo", "mlp", {"hidden": 32, "side": 8})
    for bad in ("tests.zoo:mlp(__import__('os'))", "tests.zoo:mlp(hidden=print(1))", "os;rm:x", "tests.zoo:"):
        with pytest.raises(InputError):
            spec.parse_spec(bad)


def test_a_named_model_is_imported_only_once_trusted() -> None:
    with pytest.raises(InputError, match="--trust-code"):
        build_model("tests.zoo:mlp", 1, 10)
    ticketguard.trust_model_code("tests.zoo:mlp(hidden=16)")
    model = build_model("tests.zoo:mlp(hidden=16)", 1, 3)
    assert model(torch.zeros(2, 1, 8, 8)).shape == (2, 3)  # num_classes passed because the factory takes it


def test_the_prunable_set_is_every_conv_and_linear_weight_but_the_first_and_last() -> None:
    ticketguard.trust_model_code("tests.zoo:tiny_transformer")
    model = build_model("tests.zoo:tiny_transformer", 1, 10)
    names = prunable_names(model)
    assert "patches.weight" not in names and "head.weight" not in names
    assert {"encoder.layers.0.self_attn.in_proj_weight", "encoder.layers.1.linear2.weight"} <= set(names)
    assert prunable_names(model, patterns=["encoder.layers.1.*"]) == [
        n for n in names if n.startswith("encoder.layers.1.")
    ]


@pytest.mark.slow
@pytest.mark.parametrize("architecture", OWN_MODELS)
def test_the_whole_story_from_the_command_line(architecture: str, tmp_path: Path, capsys) -> None:
    ticket, protected, stolen = tmp_path / "ticket", tmp_path / "protected", tmp_path / "stolen.safetensors"
    assert main(["find", "--model", architecture, "--out", str(ticket), *QUICK]) == 0
    forget_trust()
    capsys.readouterr()
    assert main(["info", str(ticket), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["architecture"] == architecture
    marking = ["--payload", "ACME", "--trigger-seed", "7", "--out", str(protected)]
    assert main(["protect", str(ticket), *marking]) == 2  # a ticket naming code does not run it by itself
    assert "--trust-code" in capsys.readouterr().err
    assert main(["protect", str(ticket), *marking, "--trust-code"]) == 0
    forget_trust()
    assert main(["attack", str(protected), "--attack", "magnitude:fraction=0.2", "--out", str(stolen)]) == 0
    claim = str(protected) + ".claim.json"
    capsys.readouterr()
    assert main(["verify", str(stolen), "--claim", claim, "--model", architecture, "--json"]) == 0
    verdict = json.loads(capsys.readouterr().out)
    found = {item["name"]: item for item in verdict["evidence"]}
    assert found["qr-signature"]["details"]["decodes_to_claim"]
    assert "trigger" in found  # the suspect was rebuilt from its weights through the import path


@pytest.mark.slow
@pytest.mark.parametrize("architecture", OWN_MODELS)
def test_the_whole_story_from_python(architecture: str, digits, tmp_path: Path) -> None:
    config = SearchConfig(model=architecture, ratios=(0.5,), max_rounds=1, rewind_epoch=1, decide_on="test",
                          validation_fraction=0.0, train=TrainConfig(epochs=4))
    ticket = find_extreme_ticket(digits, config, tmp_path / "search")
    ticket.save(tmp_path / "ticket")
    forget_trust()
    reloaded = Ticket.load(tmp_path / "ticket", trust_code=True)
    trigger = ticketguard.TriggerConfig(ticketguard.keyed_trigger_for(reloaded, 7))
    result = protect(reloaded, digits, signature="ACME", trigger=trigger)
    assert result.report["self_check"]["owned"]
    weights, _ = attack(result.ticket.weights, result.ticket.mask, "magnitude:fraction=0.2")
    verdict = verify(weights, result.claim, model=architecture)
    assert verdict.owned
    assert {e.name for e in verdict.evidence} >= {"qr-signature", "trigger"}
    result.save(tmp_path / "protected", tmp_path / "owner.claim.json")
    forget_trust()
    with pytest.raises(InputError, match="trust"):
        load_served_model(tmp_path / "protected")
    served = load_served_model(tmp_path / "protected", trust_code=True)  # input shape from the ticket
    with ModelServer(served, port=0) as server:
        remote = verify_endpoint(Endpoint(server.url), result.claim)
    local = verify(result.ticket.weights, result.claim, model=architecture)
    local_trigger = next(e for e in local.evidence if e.name == "trigger")
    assert remote.evidence[0].score == local_trigger.score  # the server answers as the model does


def test_a_tiny_bert_carries_a_signature_in_a_linear_layer_through_pruning() -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=128, max_position_embeddings=32)
    torch.manual_seed(0)
    model = transformers.BertModel(config)  # from a config: nothing is downloaded
    weights = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
    mask = magnitude_prune(weights, Mask.ones_like(weights, prunable_names(model)), 0.5)
    signed, signature, _ = embed_signature(mask, weights, weights, "ACME-BERT")
    assert weights[signature.regions[0].layer].dim() == 2  # a linear layer hosts the code
    kept = raise_code_weights({n: t * signed[n] if n in signed else t for n, t in weights.items()}, signed, signature)
    pruned, _ = attack(kept, signed, "magnitude:fraction=0.2")
    verdict = verify(pruned, Claim(signature, {}))
    assert verdict.owned and verdict.evidence[0].details["decodes_to_claim"]


def random_ticket(architecture: str) -> Ticket:
    ticketguard.trust_model_code(architecture)
    model = build_model(architecture, 1, 10)
    weights = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
    mask = magnitude_prune(weights, Mask.ones_like(weights, prunable_names(model)), 0.5)
    return Ticket(architecture, 1, 10, (8, 8), "digits", [str(c) for c in range(10)], mask, weights, weights)


def test_key_masks_score_a_traceable_model_by_its_traced_channel_graph() -> None:
    ticket = random_ticket("tests.zoo:small_cnn")
    locked, key = split_key(ticket, 0.2, "ewp")
    assert key.size() == round(0.2 * ticket.mask.kept()) and locked.mask.kept() == ticket.mask.kept() - key.size()
    omp_key = split_key(ticket, 0.2, "omp")[1]
    assert any(not torch.equal(key.index[n], omp_key.index[n]) for n in key.index)  # the graph changed the choice


def test_a_model_the_channel_graph_cannot_follow_gets_a_clear_error_and_omp_still_works() -> None:
    ticket = random_ticket("tests.zoo:tiny_transformer")
    with pytest.raises(InputError, match="OMP and random scores keep working"):
        split_key(ticket, 0.2, "ewp")
    assert split_key(ticket, 0.2, "omp")[1].size() > 0


@pytest.mark.slow
def test_a_model_pruned_with_torch_prune_is_adopted_protected_and_verified(tmp_path: Path, capsys) -> None:
    ticketguard.trust_model_code("tests.zoo:small_cnn")
    model = build_model("tests.zoo:small_cnn", 1, 10)
    for layer in (model.conv1, model.conv2):
        torch_prune.l1_unstructured(layer, "weight", amount=0.6)
    torch.save({"state_dict": model.state_dict()}, tmp_path / "pruned.ckpt")  # weight_orig + weight_mask
    forget_trust()
    ticket, protected = tmp_path / "ticket", tmp_path / "protected"
    assert main(["adopt", str(tmp_path / "pruned.ckpt"), "--model", "tests.zoo:small_cnn", "--out", str(ticket)]) == 0
    adopted = Ticket.load(ticket)
    assert adopted.mask.layer_densities() == pytest.approx({"conv1.weight": 0.4, "conv2.weight": 0.4}, abs=1e-3)
    assert torch.equal(adopted.weights["conv1.weight"], model.conv1.weight.detach())
    forget_trust()
    assert main(["protect", str(ticket), "--payload", "ACME", "--epochs", "3", "--out", str(protected),
                 "--trust-code"]) == 0
    capsys.readouterr()
    assert main(["verify", str(protected), "--claim", str(protected) + ".claim.json"]) == 0


@pytest.mark.parametrize("architecture", OWN_MODELS)
def test_an_independent_model_of_the_same_architecture_is_not_claimed(architecture: str) -> None:
    torch.manual_seed(1)
    owner = random_ticket(architecture)
    signed, signature, _ = embed_signature(owner.mask, owner.weights, owner.weights, "ACME")
    claim = Claim(signature, {})
    owned = {n: t * signed[n] if n in signed else t for n, t in owner.weights.items()}
    assert verify(owned, claim).owned
    torch.manual_seed(2)
    other = random_ticket(architecture)
    verdict = verify({n: t * other.mask[n] if n in other.mask else t for n, t in other.weights.items()}, claim)
    assert not verdict.owned and verdict.evidence[0].p_value > 1e-3


@pytest.mark.parametrize("architecture", OWN_MODELS)
def test_the_claims_threshold_is_applied_to_a_model_named_by_import_path(architecture: str) -> None:
    """No reference, so no per-layer counts: every weight below the claim's t is dropped, which undoes an
    add-on of weak weights at every pruned position."""
    torch.manual_seed(1)
    owner = random_ticket(architecture)
    signed, signature, _ = embed_signature(owner.mask, owner.weights, owner.weights, "ACME")
    owned = {n: t * signed[n] if n in signed else t for n, t in owner.weights.items()}
    threshold = defence_threshold(owned, signed)
    added_on = {n: torch.where(t == 0, torch.full_like(t, threshold / 2), t) if n in signed else t
                for n, t in owned.items()}
    defended = verify(added_on, Claim(signature, {}, defence=DefenceClaim(threshold, 0.005)))
    assert defended.owned and defended.details["reading"]["threshold"] == threshold
    assert not verify(added_on, Claim(signature, {})).owned  # without t every position reads as kept


def test_a_model_file_of_the_users_architecture_is_served_as_it_predicts(tmp_path: Path, digits) -> None:
    ticketguard.trust_model_code("tests.zoo:small_cnn")
    model = build_model("tests.zoo:small_cnn", 1, 10).eval()
    torch.save(model.state_dict(), tmp_path / "model.pth")
    forget_trust()
    mean, std = digits.channel_stats()
    with pytest.raises(InputError, match="--num-classes"):
        load_served_model(tmp_path / "model.pth", input_size=8, mean=mean.tolist(), std=std.tolist(),
                          architecture="tests.zoo:small_cnn")
    served = load_served_model(tmp_path / "model.pth", input_size=8, mean=mean.tolist(), std=std.tolist(),
                               architecture="tests.zoo:small_cnn", num_classes=10)
    images = digits.test_images[:20]
    with ModelServer(served, port=0) as server:
        remote = query_labels(Endpoint(server.url), images)
    assert torch.equal(remote, predict_labels(model, images, mean, std))


def test_adopt_refuses_weights_of_another_architecture_and_an_existing_folder(tmp_path: Path, capsys) -> None:
    ticketguard.trust_model_code("tests.zoo:mlp")
    torch.save(build_model("tests.zoo:mlp", 1, 10).state_dict(), tmp_path / "mlp.pth")
    forget_trust()
    args = ["adopt", str(tmp_path / "mlp.pth"), "--out", str(tmp_path / "ticket")]
    assert main([*args, "--model", "tests.zoo:small_cnn"]) == 2
    assert "do not fit tests.zoo:small_cnn" in capsys.readouterr().err
    assert not (tmp_path / "ticket").exists()
    assert main([*args, "--model", "tests.zoo:mlp"]) == 0
    assert main([*args, "--model", "tests.zoo:mlp"]) == 2  # never overwritten without --force
    assert "--force" in capsys.readouterr().err
    assert main(["adopt", str(tmp_path / "missing.pth"), "--model", "tests.zoo:mlp", "--out", str(tmp_path / "x")]) == 2


def test_find_prunes_only_the_weights_its_patterns_name(tmp_path: Path) -> None:
    out = tmp_path / "ticket"
    assert main(["find", "--model", "tests.zoo:mlp", "--prune", "1.weight", "--prune", "5.*",
                 "--out", str(out), *QUICK]) == 0
    assert set(Ticket.load(out).mask) == {"1.weight", "5.weight"}  # the default would be 3.weight and 5.weight
