import json
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from ticketguard.core.errors import InputError
from ticketguard.core.masks import load_mask
from ticketguard.data import ImageData
from ticketguard.search import imp
from ticketguard.search.config import SearchConfig
from ticketguard.search.imp import find_extreme_ticket, matches, paired_test, resolution
from ticketguard.search.schedules import SCHEDULES
from ticketguard.training.loop import TrainConfig, TrainResult, state_copy

CPU = torch.device("cpu")


def test_matches_within_eps_of_dense_accuracy() -> None:
    assert matches(0.905, 0.91, 0.01) and matches(0.95, 0.91, 0.01)
    assert not matches(0.899, 0.91, 0.01)


def test_schedule_prunes_until_failure_then_reverts_to_smaller_ratios(digits: ImageData, monkeypatch, tmp_path) -> None:
    """With accuracy that collapses below 30 % density, the search must stop just above 30 %."""

    def fake_train(model, data, config, mask=None, **kwargs):
        density = 1.0 if mask is None else mask.density()
        return TrainResult(accuracy=0.99 if density >= 0.3 else 0.5, rewind_state=state_copy(model))

    monkeypatch.setattr(imp, "train", fake_train)
    config = SearchConfig(train=TrainConfig(epochs=2), rewind_epoch=1, decide_on="test", validation_fraction=0,
                          pruning_schedule="paper")
    ticket = find_extreme_ticket(digits, config, tmp_path, CPU)
    search = ticket.metadata["search"]
    density, expected_counts = 1.0, []
    for ratio in config.ratios:  # the paper's rule, replayed on densities
        count = 0
        while density * (1 - ratio) >= 0.3:
            density *= 1 - ratio
            count += 1
        expected_counts.append(count)
    assert search["counts"] == expected_counts == [5, 0, 1, 3]
    assert ticket.mask.density() == pytest.approx(density, rel=1e-3)
    failures = [h for h in search["history"] if not h["matched"]]
    assert [h["ratio"] for h in failures] == list(config.ratios)
    for before, after in zip(search["history"], search["history"][1:]):
        base = max((h for h in search["history"][: after["round"]] if h["matched"]), key=lambda h: h["round"])
        assert after["density"] == pytest.approx(base["density"] * (1 - after["ratio"]), rel=1e-3)


def test_real_search_on_digits_decides_on_validation_and_reports_test_apart(digits: ImageData, tmp_path) -> None:
    config = SearchConfig(ratios=(0.5, 0.3), max_rounds=3, rewind_epoch=1, train=TrainConfig(epochs=3))
    ticket = find_extreme_ticket(digits, config, tmp_path, CPU)
    search = ticket.metadata["search"]
    history = search["history"]
    assert len(history) == 4 and history[0]["ratio"] is None
    assert ticket.mask.density() < 1.0
    fit, held = digits.split_validation(config.validation_fraction, config.train.seed)
    assert ticket.normalization == fit.normalization()
    assert search["validation"]["images"] == held.numel() == 287 and search["trainings"] == 4
    assert history[0]["validation_accuracy"] == search["validation"]["dense_accuracy"]
    for row in history[1:]:
        assert row["matched"] == (row["bound"] >= -row["margin"])
        assert row["margin"] == search["validation"]["margin"] >= config.eps
        assert row["estimate"] == pytest.approx((row["gained"] - row["lost"]) / 287)
        assert row["validation_accuracy"] - history[0]["validation_accuracy"] == pytest.approx(row["estimate"])
    assert history[search["best_round"]]["accuracy"] == ticket.accuracy
    model = ticket.build_model()
    assert all(torch.equal(dict(model.named_parameters())[n] != 0, ticket.mask[n]) for n in ticket.mask)


def test_resuming_with_other_settings_is_refused(digits: ImageData, tmp_path) -> None:
    small = digits.subset(10, 5)
    config = SearchConfig(ratios=(0.5,), max_rounds=1, rewind_epoch=0, train=TrainConfig(epochs=1))
    find_extreme_ticket(small, config, tmp_path, CPU)
    stored = json.loads((tmp_path / "search.json").read_text())
    del stored["config"]["train"]["crop_padding"]  # as written before the setting existed: run at its default
    (tmp_path / "search.json").write_text(json.dumps(stored))
    find_extreme_ticket(small, config, tmp_path, CPU)
    other = SearchConfig(ratios=(0.4,), max_rounds=1, rewind_epoch=0, train=TrainConfig(epochs=1))
    with pytest.raises(InputError, match="ratios"):
        find_extreme_ticket(small, other, tmp_path, CPU)
    for changed in ({"validation_fraction": 0.3}, {"confidence": 0.9}, {"pruning_schedule": "paper"}):
        with pytest.raises(InputError, match=next(iter(changed))):
            find_extreme_ticket(small, replace(config, **changed), tmp_path, CPU)
    find_extreme_ticket(small, other, tmp_path, CPU, restart=True)


def test_each_schedule_has_its_own_default_ratios() -> None:
    default = SearchConfig()
    assert default.pruning_schedule == "adaptive" and default.ratios == SCHEDULES["adaptive"].default_ratios == (0.5, 0.01)
    assert SearchConfig(pruning_schedule="paper").ratios == SCHEDULES["paper"].default_ratios == (0.2, 0.1, 0.05, 0.01)
    assert SearchConfig(pruning_schedule="paper", ratios=(0.3,)).ratios == (0.3,)


def test_bad_schedules_are_refused() -> None:
    with pytest.raises(InputError, match="shrink"):
        SearchConfig(ratios=(0.1, 0.2))
    with pytest.raises(InputError, match=r"\(0, 1\)"):
        SearchConfig(ratios=(1.5,))
    with pytest.raises(InputError, match="rewind epoch"):
        SearchConfig(rewind_epoch=5, train=TrainConfig(epochs=5))
    with pytest.raises(InputError, match="pruning schedule"):
        SearchConfig(pruning_schedule="bisect")
    with pytest.raises(InputError, match="decided on"):
        SearchConfig(decide_on="train")
    with pytest.raises(InputError, match="validation-fraction"):
        SearchConfig(validation_fraction=0)
    with pytest.raises(InputError, match="confidence"):
        SearchConfig(confidence=0.4)


FIND = [sys.executable, "-m", "ticketguard", "find", "--epochs", "3", "--rewind-epoch", "1",
        "--ratios", "0.5,0.2", "--max-rounds", "4", "--train-per-class", "60"]


def _history(out: Path) -> list:
    path = out / "search" / "search.json"
    return json.loads(path.read_text())["history"] if path.is_file() else []


@pytest.mark.slow
def test_search_killed_mid_run_resumes_and_loses_no_finished_round(tmp_path: Path) -> None:
    reference = tmp_path / "reference"
    subprocess.run([*FIND, "--out", str(reference)], check=True, capture_output=True)

    resumed = tmp_path / "resumed"
    process = subprocess.Popen([*FIND, "--out", str(resumed)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while len(_history(resumed)) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    finished = _history(resumed)
    assert 2 <= len(finished) < len(_history(reference)), "the kill must land in the middle of the search"
    assert not (resumed / "ticket.json").exists()

    subprocess.run([*FIND, "--out", str(resumed)], check=True, capture_output=True)
    assert all("validation_accuracy" in row for row in finished)
    assert _history(resumed)[: len(finished)] == finished
    assert _history(resumed) == _history(reference)
    assert load_mask(resumed / "mask.safetensors") == load_mask(reference / "mask.safetensors")


def test_validation_split_is_stratified_disjoint_and_fixed_by_the_seed(digits: ImageData) -> None:
    fit, held = digits.split_validation(0.2, seed=3)
    _, same = digits.split_validation(0.2, seed=3)
    _, other = digits.split_validation(0.2, seed=4)
    assert torch.equal(held, same) and not torch.equal(held, other)
    assert fit.train_labels.numel() + held.numel() == digits.train_labels.numel()
    per_class = torch.bincount(digits.train_labels[held], minlength=10)
    totals = torch.bincount(digits.train_labels, minlength=10)
    assert torch.equal(per_class, (0.2 * totals).round().long())
    rest = torch.ones(digits.train_labels.numel(), dtype=torch.bool)
    rest[held] = False
    assert torch.equal(fit.train_images, digits.train_images[rest]) and torch.equal(fit.test_images, digits.test_images)
    tiny = digits.subset(2, 1)
    assert torch.bincount(tiny.split_validation(0.9, 0)[0].train_labels).min() == 1  # every class still trains


def test_paired_test_is_agresti_min_adjusted_wald() -> None:
    dense = torch.ones(287, dtype=torch.bool)
    dense[:5] = False
    rounds = dense.clone()
    rounds[:2] = True  # gained 2
    rounds[5:10] = False  # lost 5
    test = paired_test(rounds, dense, margin=0.01, confidence=0.95)
    shrunk, sd = -3 / 289, (2 + 5 + 1 - 9 / 289) ** 0.5 / 289
    assert (test.gained, test.lost, test.images) == (2, 5, 287)
    assert test.estimate == pytest.approx(-3 / 287)
    assert test.bound == pytest.approx(shrunk - 1.6448536 * sd)
    assert test.matched == (test.bound >= -0.01) and test.matched == (test.p_value <= 0.05)
    agreeing = paired_test(dense, dense, margin=0.01, confidence=0.95)
    assert 0 > agreeing.bound > -0.01 and agreeing.matched  # full agreement still has a width, and passes


def test_paired_test_error_rates_are_the_stated_ones() -> None:
    """Simulated rounds: one truly `margin` worse passes at most 1 - confidence of the time; one exactly as
    accurate as dense, with errors disjoint from dense's, passes at least `confidence` of the time at the
    margin ``resolution`` gives."""
    generator = torch.Generator().manual_seed(0)
    images, dense_errors, confidence = 2000, 100, 0.95
    margin = resolution(images, dense_errors, confidence)
    dense = torch.ones(images, dtype=torch.bool)
    dense[:dense_errors] = False

    def pass_rate(gain: float, loss: float) -> float:
        passed = 0
        for _ in range(1000):
            draw = torch.rand(images, generator=generator)
            rounds = torch.where(dense, draw >= loss, draw < gain)
            passed += paired_test(rounds, dense, margin, confidence).matched
        return passed / 1000

    dense_share = dense_errors / images
    worse = pass_rate(1.0, (dense_share + margin) / (1 - dense_share))  # gains every dense error, loses more
    assert worse <= 0.05 + 0.02
    equal = pass_rate(1.0, dense_share / (1 - dense_share))  # as accurate as dense, disjoint errors
    assert equal >= 0.95 - 0.02


def _fake_search(monkeypatch, test_accuracy, validation_wrong) -> None:
    """Replace training and validation: a round's test accuracy and its wrong validation images (a set of
    indices) depend only on the density of its mask."""

    def fake_train(model, data, config, mask=None, **kwargs):
        model.fake_density = 1.0 if mask is None else mask.density()
        return TrainResult(accuracy=test_accuracy(model.fake_density), rewind_state=state_copy(model))

    def fake_correct(split, model):
        correct = torch.ones(split.labels.numel(), dtype=torch.bool)
        correct[list(validation_wrong(model.fake_density, split.labels.numel()))] = False
        return correct

    monkeypatch.setattr(imp, "train", fake_train)
    monkeypatch.setattr(imp.HeldOutSplit, "correct", fake_correct)


def test_round_a_few_images_worse_on_a_small_validation_set_is_flagged_not_flipped(
    digits: ImageData, monkeypatch, tmp_path, caplog
) -> None:
    """100 validation images cannot resolve eps_f = 1 point (one image): the test says so and decides at the
    margin the split resolves, so three lost images do not end the search; ten lost images do."""
    _fake_search(monkeypatch, lambda d: 0.98, lambda d, n: range(2) if d == 1.0 else range(5 if d > 0.3 else 12))
    config = SearchConfig(ratios=(0.5,), max_rounds=2, rewind_epoch=1, validation_fraction=0.07,
                          train=TrainConfig(epochs=2))
    with caplog.at_level(logging.WARNING, logger="ticketguard.search.imp"):
        ticket = find_extreme_ticket(digits, config, tmp_path, CPU)
    search = ticket.metadata["search"]
    three, ten = search["history"][1:]
    assert search["validation"]["images"] == 100 and search["validation"]["dense_errors"] == 2
    assert search["validation"]["resolves_eps"] is False
    assert three["margin"] == search["validation"]["margin"] == pytest.approx(resolution(100, 2, 0.95))
    assert three["margin"] > 0.05 and "resolve accuracy differences of 11.77 points" in caplog.text
    assert "guesses" not in caplog.text
    assert (three["lost"], three["estimate"], three["matched"]) == (3, pytest.approx(-0.03), True)
    assert not matches(three["validation_accuracy"], search["validation"]["dense_accuracy"], config.eps)
    assert (ten["lost"], ten["matched"]) == (10, False)
    assert three["bound"] < -config.eps and ten["bound"] < -three["margin"]
    assert ticket.mask.density() == pytest.approx(0.5, abs=1e-3)


def test_adaptive_schedule_bisects_to_the_resolution_in_fewer_trainings(
    digits: ImageData, monkeypatch, tmp_path
) -> None:
    """Accuracy collapses below 30 % density: both schedules end within t = 1 % of the edge, adaptive sooner."""
    _fake_search(monkeypatch, lambda d: 0.99 if d >= 0.3 else 0.5, lambda d, n: range(0 if d >= 0.3 else n // 2))
    tickets = {}
    for kind in ("paper", "adaptive"):
        config = SearchConfig(train=TrainConfig(epochs=2), rewind_epoch=1, pruning_schedule=kind,
                              ratios=SCHEDULES["paper"].default_ratios)
        tickets[kind] = find_extreme_ticket(digits, config, tmp_path / kind, CPU)
    paper, adaptive = (tickets[k].metadata["search"] for k in ("paper", "adaptive"))
    for ticket in tickets.values():
        assert 0.3 <= ticket.mask.density() < 0.3 / (1 - 0.01)
    assert adaptive["trainings"] < paper["trainings"] and adaptive["stopped_by"] == "schedule"
    assert adaptive["counts"][0] == paper["counts"][0] == 5
    rounds = adaptive["history"]
    assert [r["ratio"] for r in rounds[1:7]] == [0.2] * 6 and rounds[7]["ratio"] == pytest.approx(0.1)
    for row in rounds[1:]:  # every round prunes from the last matching mask before it
        base = max((h for h in rounds[: row["round"]] if h["matched"]), key=lambda h: h["round"])
        assert row["density"] == pytest.approx(base["density"] * (1 - row["ratio"]), rel=1e-3)
    densest_failure = max(r["density"] for r in rounds if not r["matched"])  # within t below the ticket
    assert tickets["adaptive"].mask.density() > densest_failure >= tickets["adaptive"].mask.density() * (1 - 0.01)

    default = find_extreme_ticket(digits, SearchConfig(train=TrainConfig(epochs=2), rewind_epoch=1),
                                  tmp_path / "default", CPU)  # halving from 0.5, then the same bisection
    assert 0.3 <= default.mask.density() < 0.3 / (1 - 0.01)
    assert default.metadata["search"]["trainings"] < adaptive["trainings"]
    assert default.metadata["search"]["history"][1]["ratio"] == 0.5


def test_a_margin_that_admits_guessing_is_called_out(caplog) -> None:
    validation = {"images": 200, "dense_errors": 160, "dense_accuracy": 0.2, "resolution": 0.3, "margin": 0.3,
                  "resolves_eps": False}
    with caplog.at_level(logging.WARNING, logger="ticketguard.search.imp"):
        imp.warn_if_coarse(imp.SearchState(config={}, dense_accuracy=0.2, validation=validation), SearchConfig(), 10)
    assert "margin of 30.00 points" in caplog.text and "even a network that guesses could match" in caplog.text
