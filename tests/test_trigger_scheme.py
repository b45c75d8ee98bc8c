from pathlib import Path

import pytest
import torch

from ticketguard.attacks.disguises import take_other_units
from ticketguard.attacks.removal import fine_tuning
from ticketguard.core.errors import InputError
from ticketguard.core.evidence import FORGERY_LEVEL, Verdict
from ticketguard.core.masks import Mask, magnitude_prune, prunable_names
from ticketguard.core.stats import binomial_p_value, required_matches
from ticketguard.data import ImageData, Normalization
from ticketguard.data.triggers import keyed_trigger_set, load_trigger_folder
from ticketguard.models import build_model
from ticketguard.schemes.trigger import (
    ESTIMATED_UNITS,
    OWNER_UNITS,
    SCALE_TOLERANCE,
    SHIFT_TOLERANCE,
    SUSPECT_UNITS,
    SmoothedTriggerLoss,
    TriggerClaim,
    carried_normalization,
    predict_labels,
    trigger_accuracy,
    trigger_evidence,
    verify_local,
    verify_weights,
    watermark,
)
from ticketguard.training.loop import TrainConfig, train
from ticketguard.verification.claim import load_claim
from ticketguard.verification.verify import verify

EPOCHS = 10


@pytest.fixture(scope="module")
def marked_and_unmarked(digits: ImageData):
    """The same sparse ResNet-20 trained from the same weights with and without a keyed trigger set."""
    torch.manual_seed(0)
    model = build_model("resnet20", 1, 10)
    params = {k: v.detach() for k, v in model.named_parameters()}
    mask = magnitude_prune(params, Mask.ones_like(params, prunable_names(model)), 0.7)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    trigger = keyed_trigger_set(2021, 100, 10, 1, (8, 8))
    result = watermark(model, digits, trigger, TrainConfig(epochs=EPOCHS), mask, per_batch=32)
    unmarked = build_model("resnet20", 1, 10)
    unmarked.load_state_dict(start)
    plain = train(unmarked, digits, TrainConfig(epochs=EPOCHS), mask)
    return model, unmarked, mask, trigger, result, plain


def test_watermark_keeps_the_mask_and_logs_both_accuracies_per_epoch(marked_and_unmarked) -> None:
    model, _, mask, _, result, plain = marked_and_unmarked
    params = dict(model.named_parameters())
    assert all(torch.equal(params[n] != 0, mask[n]) for n in mask)
    assert [h["epoch"] for h in result.history] == list(range(1, EPOCHS + 1))
    assert result.history[-1]["trigger_accuracy"] > result.history[0]["trigger_accuracy"]
    assert result.accuracy > plain.accuracy - 0.03  # the watermark costs little test accuracy


def test_local_verification_shows_ownership_of_marked_model_only(
    marked_and_unmarked, digits: ImageData
) -> None:
    model, unmarked, _, trigger, result, _ = marked_and_unmarked
    mean, std = digits.channel_stats()
    marked = verify_local(model, trigger, mean, std, 10)
    innocent = verify_local(unmarked, trigger, mean, std, 10)
    assert marked.score == pytest.approx(result.trigger_accuracy)
    assert marked.passed and marked.p_value < 1e-6 and Verdict((marked,)).owned
    assert not innocent.passed and innocent.p_value > 1e-3 and not Verdict((innocent,)).owned


def test_suspect_chance_charges_a_model_that_answers_one_class() -> None:
    labels = torch.tensor([3] * 30 + list(range(10)) * 7)
    constant = torch.full_like(labels, 3)
    evidence = trigger_evidence(constant, labels, 10, "suspect")
    assert evidence.details["chance"] == pytest.approx(37 / 100)
    naive = trigger_evidence(constant, labels, 10, "uniform")
    assert naive.passed and not evidence.passed  # 37 % agreement is chance for this model, not for 1/classes


def test_threshold_is_the_least_accuracy_that_passes() -> None:
    needed = required_matches(100, 0.1, 1e-6)
    assert binomial_p_value(needed, 100, 0.1) <= 1e-6 < binomial_p_value(needed - 1, 100, 0.1)


def test_evidence_refuses_a_partial_answer() -> None:
    with pytest.raises(InputError, match="99 predictions for 100"):
        trigger_evidence(torch.zeros(99, dtype=torch.long), torch.zeros(100, dtype=torch.long), 10)


def test_keyed_claim_rebuilds_the_trigger_set_and_catches_altered_labels() -> None:
    trigger = keyed_trigger_set(77, 40, 10, 3, (32, 32))
    part = TriggerClaim.of(trigger, 10, None).to_json()
    rebuilt = TriggerClaim.from_json(part).trigger_set()
    assert torch.equal(rebuilt.images, trigger.images) and torch.equal(rebuilt.labels, trigger.labels)
    part["labels"][0] = (part["labels"][0] + 1) % 10
    with pytest.raises(InputError, match="differ"):
        TriggerClaim.from_json(part).trigger_set()


def test_folder_claim_reloads_adi_set_and_refuses_another_folder(
    adi_trigger_set: Path, tmp_path: Path
) -> None:
    trigger = load_trigger_folder(adi_trigger_set, 1, (8, 8), num_classes=10)
    part = TriggerClaim.of(trigger, 10, None, "uniform").to_json()
    assert torch.equal(TriggerClaim.from_json(part).trigger_set().images, trigger.images)
    (tmp_path / "1.jpg").write_bytes((adi_trigger_set / "pics" / "1.jpg").read_bytes())
    (tmp_path / "labels-cifar.txt").write_text("6\n")
    with pytest.raises(InputError, match="sha256"):
        TriggerClaim.from_json({**part, "count": 1, "labels": [6]}).trigger_set(tmp_path)


def test_predict_labels_matches_argmax_of_the_model(marked_and_unmarked, digits: ImageData) -> None:
    model, *_ = marked_and_unmarked
    mean, std = digits.channel_stats()
    images = digits.test_images[:50]
    model.eval()
    with torch.no_grad():
        expected = model((images.float() / 255 - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)).argmax(1)
    assert torch.equal(predict_labels(model, images, mean, std), expected)


def test_incomplete_claim_is_refused_with_a_clear_error() -> None:
    part = TriggerClaim.of(keyed_trigger_set(1, 5, 10, 1, (8, 8)), 10, None, "uniform").to_json()
    del part["seed"]
    with pytest.raises(InputError, match="incomplete"):
        TriggerClaim.from_json(part).trigger_set()
    for field, bad in (("classes", "10"), ("labels", [1.5] * 5), ("shape", [1, 8, 2.9]), ("count", True)):
        with pytest.raises(InputError):
            TriggerClaim.from_json({**part, field: bad})


def relabelled(model: torch.nn.Module, order: torch.Tensor) -> torch.nn.Module:
    """A copy whose classifier rows are permuted: it answers order^-1 of what ``model`` answers."""
    copy = build_model("resnet20", 1, 10)
    copy.load_state_dict(model.state_dict())
    with torch.no_grad():
        copy.fc.weight.copy_(model.fc.weight[order])
        copy.fc.bias.copy_(model.fc.bias[order])
    return copy.eval()


def test_a_relabelled_owner_copy_is_shown_and_a_relabelled_innocent_is_not(
    marked_and_unmarked, digits: ImageData
) -> None:
    model, unmarked, _, trigger, _, _ = marked_and_unmarked
    mean, std = digits.channel_stats()
    order = torch.randperm(10, generator=torch.Generator().manual_seed(3))
    owner = verify_local(relabelled(model, order), trigger, mean, std, 10)
    innocent = verify_local(relabelled(unmarked, order), trigger, mean, std, 10)
    assert owner.details["as_labelled"]["p_value"] > 0.01  # read as labelled, the copy agrees at chance
    assert owner.details["relabelled"] and owner.passed and owner.p_value < FORGERY_LEVEL
    assert owner.details["best_relabelling"]["relabelling"] == {str(c): a for a, c in enumerate(order.tolist())}
    assert not innocent.passed and innocent.p_value > 1e-3


def test_answers_under_other_names_are_read_too_and_an_unrelabelled_copy_pays_a_factor_two() -> None:
    labels = torch.arange(100) % 10
    renamed = trigger_evidence(labels + 1000, labels, 10)
    assert renamed.passed and renamed.details["relabelled"] and renamed.score == 1.0
    as_labelled = trigger_evidence(labels, labels, 10)
    plain = binomial_p_value(100, 100, as_labelled.details["chance"])
    assert not as_labelled.details["relabelled"] and as_labelled.p_value == pytest.approx(2 * plain)


@pytest.mark.parametrize("classes", [2, 3, 10])
def test_the_trigger_test_keeps_its_false_claim_rate_on_independent_answers(classes: int) -> None:
    """Keyed labels are uniform and independent of any innocent model: on such answers (uniform, or skewed to a
    few classes) the share of p-values <= alpha, both readings and the best relabelling included, stays <= alpha."""
    generator = torch.Generator().manual_seed(classes)
    p_values = {model: [] for model in ("suspect", "uniform")}
    for trial in range(600):
        labels = torch.randint(0, classes, (60,), generator=generator)
        weights = torch.rand(classes, generator=generator) ** (1 + 3 * (trial % 2))  # every other trial skewed
        answers = torch.multinomial(weights, 60, replacement=True, generator=generator)
        for model, found in p_values.items():
            found.append(trigger_evidence(answers, labels, classes, model).p_value)
    for found in p_values.values():
        for alpha in (0.2, 0.1, 0.05):
            assert sum(p <= alpha for p in found) / len(found) <= alpha


def test_a_copy_that_expects_inputs_255_times_larger_is_read_at_its_own_scale(
    marked_and_unmarked, digits: ImageData
) -> None:
    """The thief multiplies his inputs by 255 and divides the stem by 255: the same function on his inputs.
    The scale is read off the suspect's stem and first BatchNorm, for the owner's copy and an innocent alike."""
    model, unmarked, _, trigger, _, _ = marked_and_unmarked
    claim = TriggerClaim.of(trigger, 10, digits.normalization(), "suspect")
    found = {}
    for name, suspect in (("owner", model), ("innocent", unmarked)):
        weights = {k: v.clone() for k, v in suspect.state_dict().items()}
        as_trained = verify_weights(weights, claim)
        weights["conv.weight"] /= 255
        found[name] = verify_weights(weights, claim)
        assert as_trained.details["input_scale"] == 1.0
        assert 255 / SCALE_TOLERANCE < found[name].details["input_scale"] < 255 * SCALE_TOLERANCE
    assert found["owner"].passed and found["owner"].p_value < FORGERY_LEVEL
    assert not found["innocent"].passed and found["innocent"].p_value > 1e-3


def test_the_smoothing_pass_adds_gradients_and_leaves_weights_and_statistics_as_they_were(digits: ImageData) -> None:
    torch.manual_seed(0)
    model = build_model("resnet20", 1, 10).train()
    model.conv.weight.data[0] = 0  # a pruned filter: noise is added there too, and taken away exactly
    before = {k: v.clone() for k, v in model.state_dict().items()}
    mean, std = digits.channel_stats()
    inputs = (digits.train_images[:20].float() / 255 - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)
    SmoothedTriggerLoss(4, 0.3, seed=1)(model, inputs, digits.train_labels[:20])
    after = model.state_dict()
    assert all(torch.allclose(after[k].float(), v.float(), atol=1e-6) for k, v in before.items() if "num_batches" not in k)
    assert torch.equal(after["conv.weight"][0], torch.zeros_like(after["conv.weight"][0]))
    assert model.fc.weight.grad is not None and model.fc.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("free, level", [(False, FORGERY_LEVEL), (True, 1e-6)], ids=["mask kept", "dense"])
def test_the_trigger_set_survives_five_epochs_of_adam(marked_and_unmarked, digits: ImageData, free, level) -> None:
    """A thief's usual fine-tuning: Adam at 1e-3 for 5 epochs, with the mask kept, and with pruned weights
    freed too (a stronger attack than the paper's)."""
    model, _, mask, trigger, _, _ = marked_and_unmarked
    tuned, _ = fine_tuning(model.state_dict(), mask, data=digits, epochs=5, lr=1e-3, optimizer="adam", free=free)
    attacked = build_model("resnet20", 1, 10)
    attacked.load_state_dict(tuned)
    found = verify_local(attacked.eval(), trigger, *digits.channel_stats(), 10)
    assert found.passed and found.p_value <= level


def test_verify_reads_the_owners_protected_copy_at_the_scale_it_expects(protected_owner) -> None:
    """The protected ticket with its stem divided by 255, through the whole ``verify``: the scale is read off
    the copy and the trigger set is asked at it, so the copy answers as the protected ticket does."""
    ticket, claim, _ = protected_owner
    shipped = next(e for e in verify(ticket.weights, claim).evidence if e.name == "trigger")
    weights = {k: v.clone() for k, v in ticket.weights.items()}
    weights["conv.weight"] /= 255
    scaled = next(e for e in verify(weights, claim).evidence if e.name == "trigger")
    assert shipped.details["input_scale"] == 1.0
    assert 255 / SCALE_TOLERANCE < scaled.details["input_scale"] < 255 * SCALE_TOLERANCE
    assert abs(scaled.details["as_labelled"]["agreed"] - shipped.details["as_labelled"]["agreed"]) <= 8


RAW_PIXELS = (torch.zeros(1), torch.ones(1))


def test_a_copy_that_takes_raw_pixels_is_read_in_its_own_units(
    marked_and_unmarked, digits: ImageData
) -> None:
    """The owner's normalisation folded into the stem and the first BatchNorm: the copy classifies raw pixels
    in [0, 1] as the original does, and misses T when fed the owner's units. The map is read off the copy,
    for the owner's copy and an innocent alike; untouched, each reads as the identity."""
    model, unmarked, _, trigger, result, _ = marked_and_unmarked
    mean, std = digits.channel_stats()
    claim = TriggerClaim.of(trigger, 10, digits.normalization(), "suspect")
    found = {}
    for name, suspect in (("owner", model), ("innocent", unmarked)):
        weights = {k: v.clone() for k, v in suspect.state_dict().items()}
        as_trained = verify_weights(weights, claim)
        found[name] = verify_weights(take_other_units(weights, mean, std, RAW_PIXELS), claim)
        assert as_trained.details["input_units"] == OWNER_UNITS
        assert as_trained.details["input_scale"] == 1.0 and as_trained.details["input_shift"] == [0.0]
        estimate = as_trained.details["input_shift_estimate"][0] / as_trained.details["input_scale_estimate"]
        assert abs(estimate) < SHIFT_TOLERANCE / 2
        assert found[name].details["input_units"] == ESTIMATED_UNITS
        assert found[name].details["input_scale"] == pytest.approx(float(std), rel=0.2)
        assert found[name].details["input_shift"][0] == pytest.approx(float(mean), abs=0.1)
    copy = build_model("resnet20", 1, 10)
    copy.load_state_dict(take_other_units(model.state_dict(), mean, std, RAW_PIXELS))
    copy.eval()
    answers = predict_labels(copy, digits.test_images, *RAW_PIXELS)
    assert (answers == digits.test_labels).float().mean() > result.accuracy - 0.05
    assert trigger_accuracy(copy, trigger, mean, std) < 0.5
    assert found["owner"].passed and found["owner"].p_value < FORGERY_LEVEL
    assert not found["innocent"].passed and found["innocent"].p_value > 1e-3


def test_the_normalisation_a_suspect_file_carries_is_found_by_its_keys() -> None:
    mean, std = torch.tensor([0.5, 0.4, 0.3]), torch.tensor([0.2, 0.2, 0.2])
    network = {"bn.running_mean": torch.zeros(3), "bn.running_var": torch.ones(3), "fc.weight": torch.ones(3, 3)}
    carried = carried_normalization({**network, "normalize.mean": mean, "normalize.std": std}, 3)
    assert carried == Normalization(tuple(mean.tolist()), tuple(std.tolist()))
    assert carried_normalization({**network, "pixel_mean": mean, "pixel_std": std}, 3) is not None
    assert carried_normalization(network, 3) is None
    assert carried_normalization({"normalize.mean": mean, "normalize.std": std}, 1) is None  # other channels
    assert carried_normalization({"normalize.mean": mean, "normalize.std": -std}, 3) is None
    assert carried_normalization({"a.mean": mean, "a.std": std, "b.mean": mean, "b.std": std}, 3) is None


def test_verify_feeds_a_repackaged_copy_in_the_units_it_carries_and_sets_a_decoy_aside(
    protected_owner,
) -> None:
    """The protected ticket under ``net.`` beside a normalisation: rewritten to take pixels standardised with
    mean and std 0.5, it is fed in those units; untouched beside a claim that it takes raw pixels (a decoy its
    BatchNorm statistics contradict), it is fed in the owner's."""
    ticket, claim, _ = protected_owner
    mean, std = load_claim(claim).trigger.normalization.tensors()
    shipped = next(e for e in verify(ticket.weights, claim).evidence if e.name == "trigger")
    half = (torch.tensor([0.5]), torch.tensor([0.5]))
    found = {}
    for name, network, (carried_mean, carried_std) in (
        ("carried", take_other_units(ticket.weights, mean, std, half), half),
        ("decoy", ticket.weights, RAW_PIXELS),
    ):
        repackaged = {
            **{f"net.{n}": t for n, t in network.items()},
            "normalize.mean": carried_mean,
            "normalize.std": carried_std,
            "temperature": torch.tensor(1.5),
        }
        found[name] = next(e for e in verify(repackaged, claim).evidence if e.name == "trigger")
        details = found[name].details
        assert details["suspect_normalization"] == {"mean": carried_mean.tolist(), "std": carried_std.tolist()}
        assert abs(details["as_labelled"]["agreed"] - shipped.details["as_labelled"]["agreed"]) <= 8
    assert found["carried"].details["input_units"] == SUSPECT_UNITS
    assert found["decoy"].details["input_units"] == OWNER_UNITS
