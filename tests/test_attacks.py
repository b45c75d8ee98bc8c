"""Attacks: pruning, fine-tuning and transfer, add-on and the owner's defence, fake1-3, chains, the CLI."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ticketguard.artifacts.ticket import Ticket
from ticketguard.attacks.chains import Step, chain, parse_chain, run_step
from ticketguard.attacks.removal import (
    ATTACKS,
    add_on,
    fake1,
    fake2,
    fake3,
    fine_tuning,
    magnitude_pruning,
    random_pruning,
    transfer,
)
from ticketguard.cli import main
from ticketguard.core.errors import InputError
from ticketguard.core.files import load_tensors
from ticketguard.core.masks import Mask, magnitude_prune, prunable_names
from ticketguard.data import ImageData
from ticketguard.experiments.harness import parity_task
from ticketguard.models import build_model
from ticketguard.schemes import signature as v2
from ticketguard.training.loop import TrainConfig, evaluate, state_copy, train
from ticketguard.verification.defence import defence_threshold, magnitude_defence

PAYLOAD = "ACME-R20-2026"


@pytest.fixture(scope="module")
def sparse() -> tuple[dict[str, torch.Tensor], Mask]:
    torch.manual_seed(0)
    model = build_model("resnet20", 1, 10)
    weights = state_copy(model)
    mask = magnitude_prune(weights, Mask.ones_like(weights, prunable_names(model)), 0.6)
    return {n: t * mask[n] if n in mask else t for n, t in weights.items()}, mask


@pytest.fixture(scope="module")
def small(digits: ImageData) -> ImageData:
    return digits.subset(60, 20, 0)


@pytest.fixture(scope="module")
def trained(sparse, small: ImageData) -> tuple[dict[str, torch.Tensor], Mask]:
    """The sparse network trained for 6 epochs on a digits subset, so that attacks can cost accuracy."""
    weights, mask = sparse
    model = build_model("resnet20", 1, 10)
    model.load_state_dict(weights)
    train(model, small, TrainConfig(epochs=6, lr=0.05), mask)
    return state_copy(model), mask


@pytest.fixture(scope="module")
def signed(sparse) -> tuple[dict[str, torch.Tensor], Mask, v2.Signature]:
    """The sparse network with a QR signature written into its mask (untrained: the code is in the mask)."""
    weights, mask = sparse
    new_mask, signature, _ = v2.embed_signature(mask, weights, weights, PAYLOAD)
    return {n: t * new_mask[n] if n in new_mask else t for n, t in weights.items()}, new_mask, signature


def accuracy(weights: dict[str, torch.Tensor], data: ImageData) -> float:
    model = build_model("resnet20", 1, 10)
    model.load_state_dict(weights)
    return evaluate(model, data)


def test_registry_names_every_attack() -> None:
    assert set(ATTACKS) == {
        "magnitude",
        "random",
        "finetune",
        "transfer",
        "addon",
        "defence",
        "fake1",
        "fake2",
        "fake3",
        "channels",
        "permute",
        "rescale",
        "fold-bn",
        "rename",
        "widen",
    }


@pytest.mark.parametrize("attack", [magnitude_pruning, random_pruning])
def test_pruning_removes_the_fraction_of_remaining_weights_and_zeroes_them(attack, sparse) -> None:
    weights, mask = sparse
    attacked, pruned = attack(weights, mask, fraction=0.3)
    assert pruned.kept() == mask.kept() - round(0.3 * mask.kept())
    for name in mask:
        assert not (pruned[name] & ~mask[name]).any()
        assert (attacked[name][~pruned[name]] == 0).all()
        assert torch.equal(attacked[name][pruned[name]], weights[name][pruned[name]])


def test_magnitude_pruning_drops_the_smallest_weights(sparse) -> None:
    weights, mask = sparse
    _, pruned = magnitude_pruning(weights, mask, fraction=0.5)
    dropped = torch.cat([weights[n][mask[n] & ~pruned[n]].abs() for n in mask])
    kept = torch.cat([weights[n][pruned[n]].abs() for n in mask])
    assert dropped.max() <= kept.min()


def test_random_pruning_is_reproducible_by_seed_and_differs_across_seeds(sparse) -> None:
    weights, mask = sparse
    first, second, other = (random_pruning(weights, mask, fraction=0.2, seed=s)[1] for s in (1, 1, 2))
    assert first == second and first != other


def test_pruning_half_of_a_trained_ticket_costs_accuracy(trained, small: ImageData) -> None:
    weights, mask = trained
    assert accuracy(magnitude_pruning(weights, mask, fraction=0.7)[0], small) < accuracy(weights, small)


def test_fine_tuning_changes_weights_but_keeps_the_mask(sparse, small: ImageData) -> None:
    weights, mask = sparse
    tuned, tuned_mask = fine_tuning(weights, mask, data=small, epochs=1)
    assert tuned_mask == mask
    name = next(iter(mask))
    assert not torch.equal(tuned[name], weights[name])
    assert (tuned[name][~mask[name]] == 0).all()


def test_fine_tuning_recovers_accuracy_lost_to_pruning(trained, small: ImageData) -> None:
    pruned, mask = magnitude_pruning(*trained, fraction=0.7)
    tuned, _ = fine_tuning(pruned, mask, data=small, epochs=2, lr=0.05, seed=1)
    assert accuracy(tuned, small) > accuracy(pruned, small) + 0.1


def test_free_fine_tuning_grows_pruned_weights_back(sparse, small: ImageData) -> None:
    weights, mask = sparse
    _, free_mask = fine_tuning(weights, mask, data=small, epochs=1, free=True)
    assert mask.density() < 0.5 and free_mask.density() > 0.99


def test_transfer_puts_a_new_head_for_the_new_classes(sparse, small: ImageData) -> None:
    weights, mask = sparse
    moved, moved_mask = transfer(weights, mask, transfer_data=parity_task(small), epochs=1)
    assert moved["fc.weight"].shape == (2, 64) and moved_mask == mask
    name = next(iter(mask))
    assert not torch.equal(moved[name], weights[name])


def test_add_on_switches_on_the_fraction_of_pruned_positions_with_small_weights(sparse) -> None:
    weights, mask = sparse
    pruned_count = mask.total() - mask.kept()
    attacked, grown = add_on(weights, mask, fraction=0.1, scale=0.1, seed=3)
    assert grown.kept() == mask.kept() + round(0.1 * pruned_count)
    kept = torch.cat([weights[n][mask[n]].abs() for n in mask])
    for name in mask:
        added = grown[name] & ~mask[name]
        assert torch.equal(attacked[name][mask[name]], weights[name][mask[name]])
        assert (attacked[name][added] != 0).all()
    added_values = torch.cat([attacked[n][grown[n] & ~mask[n]].abs() for n in mask])
    assert added_values.median() < 0.2 * kept.median()
    assert (
        add_on(weights, mask, fraction=0.1, seed=3)[1]
        == grown
        != add_on(weights, mask, fraction=0.1, seed=4)[1]
    )


def test_defence_removes_the_add_on_weights_and_few_of_the_owners(sparse) -> None:
    weights, mask = sparse
    threshold = defence_threshold(weights, mask)
    attacked, grown = add_on(weights, mask, fraction=0.05, scale=0.01, seed=0)
    defended, defended_mask = magnitude_defence(attacked, grown, threshold=threshold)
    for name in mask:
        assert not (defended_mask[name] & ~mask[name]).any()
        assert (defended[name][~defended_mask[name]] == 0).all()
    assert defended_mask.kept() >= 0.985 * mask.kept()


def test_defence_restores_a_code_that_add_on_broke(signed) -> None:
    weights, mask, signature = signed
    attacked, grown = add_on(weights, mask, fraction=0.1, scale=0.01, seed=0)
    assert v2.extract(attacked, signature).match_rate < 0.95
    defended, _ = magnitude_defence(attacked, grown, threshold=defence_threshold(weights, mask))
    reading = v2.extract(defended, signature)
    assert reading.decoded.text == PAYLOAD and reading.match_rate > 0.99


def test_fake1_adds_a_random_key_of_the_given_size_at_pruned_positions(sparse) -> None:
    weights, mask = sparse
    forged, forged_mask = fake1(weights, mask, key_density=0.05, seed=1)
    assert forged_mask.kept() == mask.kept() + round(0.05 * mask.kept())
    for name in mask:
        assert torch.equal(forged[name][mask[name]], weights[name][mask[name]])
        assert (forged[name][forged_mask[name] & ~mask[name]] != 0).all()
    assert fake1(weights, mask, key_density=0.05, seed=2)[1] != forged_mask


def test_fake2_fills_every_pruned_position_and_the_code_no_longer_decodes(signed) -> None:
    weights, mask, signature = signed
    forged, forged_mask = fake2(weights, mask, seed=0)
    assert forged_mask.density() == 1.0
    reading = v2.extract(forged, signature)
    verdict = v2.evidence(reading)
    assert reading.decoded.text != PAYLOAD and not verdict.passed


def test_fake2_noise_costs_accuracy(trained, small: ImageData) -> None:
    weights, mask = trained
    assert accuracy(fake2(weights, mask, seed=0)[0], small) < accuracy(weights, small) - 0.1


def test_fake3_writes_the_forged_code_into_the_claimed_region(signed) -> None:
    weights, mask, signature = signed
    assert v2.extract(weights, signature).decoded.text == PAYLOAD
    forged, forged_mask = fake3(weights, mask, signature=signature, payload="FORGED", seed=0)
    reading = v2.extract(forged, signature)
    verdict = v2.evidence(reading)
    assert reading.decoded.text == "FORGED" and reading.mismatch and not verdict.passed
    region = signature.regions[0]
    changed = {n for n in mask if not torch.equal(forged_mask[n], mask[n])}
    assert changed == {region.layer}


def test_fake3_costs_accuracy(trained, signed, small: ImageData) -> None:
    weights, mask = trained
    _, _, signature = signed
    forged, _ = fake3(weights, mask, signature=signature, scale=3.0, seed=0)
    assert accuracy(forged, small) < accuracy(weights, small)


def test_chain_prunes_then_fine_tunes(sparse, small: ImageData) -> None:
    weights, mask = sparse
    steps = parse_chain("magnitude:fraction=0.2+finetune:epochs=1")
    assert steps == [Step("magnitude", {"fraction": 0.2}), Step("finetune", {"epochs": 1})]
    attacked, attacked_mask = chain(weights, mask, steps, {"data": small, "signature": None})
    assert attacked_mask == magnitude_pruning(weights, mask, fraction=0.2)[1]
    name = next(iter(mask))
    assert not torch.equal(attacked[name], magnitude_pruning(weights, mask, fraction=0.2)[0][name])


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda w, m: magnitude_pruning(w, m, fraction=1.0), "fraction"),
        (lambda w, m: random_pruning(w, m, fraction=-0.1), "fraction"),
        (lambda w, m: add_on(w, m, fraction=1.5), "add-on fraction"),
        (lambda w, m: add_on(w, m, fraction=0.1, scale=0), "scale"),
        (lambda w, m: magnitude_defence(w, m, threshold=-1.0), "threshold"),
        (lambda w, m: fake1(w, m), "key"),
        (lambda w, m: fake1(w, m, key_density=1.0), "key density"),
        (lambda w, m: fake2(w, m, fraction=2.0), "fake2"),
        (lambda w, m: fake3(w, m), "claim"),
        (lambda w, m: fine_tuning(w, m, data=None, epochs=0), "epoch"),
        (lambda w, m: parse_chain("shrink:fraction=0.1"), "unknown attack"),
        (lambda w, m: parse_chain("magnitude:0.1"), "key=value"),
        (lambda w, m: run_step(w, m, Step("magnitude", {"ratio": 0.1})), "no parameter ratio"),
        (lambda w, m: run_step(w, m, Step("magnitude")), "needs fraction"),
    ],
)
def test_bad_parameters_are_refused_with_one_sentence(call, message, sparse) -> None:
    weights, mask = sparse
    with pytest.raises(InputError, match=message):
        call(weights, mask)


def test_fake3_refuses_a_payload_too_long_for_the_code(signed) -> None:
    weights, mask, signature = signed
    with pytest.raises(InputError, match="does not fit"):
        fake3(weights, mask, signature=signature, payload="X" * 200)


@pytest.fixture
def ticket_dir(sparse, tmp_path: Path) -> Path:
    weights, mask = sparse
    ticket = Ticket("resnet20", 1, 10, (8, 8), "digits", [str(i) for i in range(10)], mask, weights, weights)
    return ticket.save(tmp_path / "ticket")


def test_attack_command_writes_the_attacked_model(ticket_dir: Path, sparse, tmp_path: Path) -> None:
    out = tmp_path / "attacked.safetensors"
    assert (
        main(["attack", str(ticket_dir), "--attack", "magnitude", "--ratio", "0.2", "--out", str(out)]) == 0
    )
    _, mask = sparse
    attacked = load_tensors(out)
    kept = sum(int((attacked[n] != 0).sum()) for n in mask)
    assert kept == mask.kept() - round(0.2 * mask.kept())


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--attack", "addon", "--fraction", "2"], "add-on fraction"),
        (["--attack", "fake1"], "key"),
        (["--attack", "fake3"], "claim"),
        (["--attack", "magnitude"], "needs fraction"),
    ],
)
def test_attack_command_refuses_bad_input_with_exit_2(
    argv, message, ticket_dir: Path, tmp_path, capsys
) -> None:
    assert main(["attack", str(ticket_dir), *argv, "--out", str(tmp_path / "x.safetensors")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x.safetensors").exists()


def test_trained_fixture_is_accurate_enough_for_accuracy_drops_to_show(trained, small: ImageData) -> None:
    assert accuracy(trained[0], small) > 0.7
