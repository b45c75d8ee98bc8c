import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ticketguard import imp
from ticketguard.data import ImageData
from ticketguard.errors import InputError
from ticketguard.imp import SearchConfig, find_extreme_ticket, matches
from ticketguard.masks import load_mask
from ticketguard.training import TrainConfig, TrainResult, state_copy

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
    config = SearchConfig(train=TrainConfig(epochs=2), rewind_epoch=1)
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


def test_real_search_on_digits_finds_a_sparser_matching_ticket(digits: ImageData, tmp_path) -> None:
    config = SearchConfig(ratios=(0.5, 0.3), max_rounds=3, rewind_epoch=1, train=TrainConfig(epochs=3))
    ticket = find_extreme_ticket(digits, config, tmp_path, CPU)
    history = ticket.metadata["search"]["history"]
    assert len(history) == 4 and history[0]["ratio"] is None
    assert ticket.mask.density() < 1.0
    assert ticket.normalization == digits.normalization()
    assert matches(ticket.accuracy, ticket.metadata["dense_accuracy"], config.eps)
    model = ticket.build_model()
    assert all(torch.equal(dict(model.named_parameters())[n] != 0, ticket.mask[n]) for n in ticket.mask)


def test_resuming_with_other_settings_is_refused(digits: ImageData, tmp_path) -> None:
    small = digits.subset(10, 5)
    config = SearchConfig(ratios=(0.5,), max_rounds=1, rewind_epoch=0, train=TrainConfig(epochs=1))
    find_extreme_ticket(small, config, tmp_path, CPU)
    other = SearchConfig(ratios=(0.4,), max_rounds=1, rewind_epoch=0, train=TrainConfig(epochs=1))
    with pytest.raises(InputError, match="ratios"):
        find_extreme_ticket(small, other, tmp_path, CPU)
    find_extreme_ticket(small, other, tmp_path, CPU, restart=True)


def test_bad_schedules_are_refused() -> None:
    with pytest.raises(InputError, match="shrink"):
        SearchConfig(ratios=(0.1, 0.2))
    with pytest.raises(InputError, match=r"\(0, 1\)"):
        SearchConfig(ratios=(1.5,))
    with pytest.raises(InputError, match="rewind epoch"):
        SearchConfig(rewind_epoch=5, train=TrainConfig(epochs=5))


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
    assert _history(resumed)[: len(finished)] == finished
    assert _history(resumed) == _history(reference)
    assert load_mask(resumed / "mask.safetensors") == load_mask(reference / "mask.safetensors")
