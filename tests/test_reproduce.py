"""`ticketguard reproduce` at a tiny scale on digits: every experiment runs, the report shows our numbers beside
the paper's, a rerun reuses the stored results, and bad input is refused in one line."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import CIFAR_JPEG, shared_data

from ticketguard.cli import main
from ticketguard.core.errors import InputError
from ticketguard.core.files import load_checkpoint
from ticketguard.core.masks import load_mask
from ticketguard.experiments import reproduce
from ticketguard.training.recipes import RECIPES

TINY = ["--data", "digits", "--scale", "0.2", "--epochs", "3"]
CAMPAIGN = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "cifar10-resnet20"


def test_reproduce_writes_every_table_beside_the_papers_numbers(tmp_path: Path, capsys) -> None:
    out = tmp_path / "reproduce"
    assert main(["reproduce", *TINY, "--out", str(out)]) == 0
    assert str(out / "report.md") in capsys.readouterr().err.replace("\n", "")
    report = (out / "report.md").read_text()
    for experiment in reproduce.EXPERIMENTS.values():
        assert f"## {experiment.title}" in report
    assert "Failed" not in report
    for number in ("19.369 %", "(5, 1, 8, 1)", "91.37 % (-0.29)", "91.46 % (91.0 %)", "91.66 % (16.0 %)",
                   "91.37 % -> 57.00 %", "5-10 %"):
        assert f"| {number} |" in report
    ticket = json.loads((out / "results" / "table1.json").read_text())
    assert f"| weights left | 19.369 % | {100 * ticket['density']:.2f} % |" in report
    for figure in ("fig2.png", "robustness.png", "qr-grid.png"):
        assert (out / figure).read_bytes()[:4] == b"\x89PNG"
    attacks = json.loads((out / "results" / "attacks.json").read_text())["rows"]
    assert {"magnitude pruning", "add-on + defence", "fine-tuning", "fake1", "fake2", "fake3"} <= {
        row["family"] for row in attacks
    }
    assert all(row["error"] is None for row in attacks)
    shipped = next(row for row in attacks if row["family"] == "none")
    assert shipped["qr_decodes"] and shipped["owned"]

    fig2 = json.loads((out / "results" / "fig2.json").read_text())
    assert fig2["accuracy_with_key"] == ticket["accuracy"]  # the search's last round, not trained again
    assert "ticket (with key)" not in json.loads((out / "fig2" / "retrained.json").read_text())
    status = reproduce.campaign_status(out)
    assert status.search_done and status.epochs_left == 0
    assert [stage.name for stage in status.stages if stage.state != "done"] == []
    assert {"dense training", "extreme ticket", "protect (V2 + V3)", "Figure 2 trainings", "attack grid"} <= {
        stage.name for stage in status.stages
    }
    capsys.readouterr()
    assert main(["reproduce", "--status", "--json", "--out", str(out)]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["epochs_left"] == 0 and shown["stages"][0]["detail"].endswith(" s")

    stamp = (out / "results" / "fig2.json").stat().st_mtime_ns
    assert main(["reproduce", "fig2", *TINY, "--out", str(out)]) == 0
    assert (out / "results" / "fig2.json").stat().st_mtime_ns == stamp
    assert main(["reproduce", *TINY, "--scale", "0.3", "--out", str(out)]) == 2


def test_plan_shrinks_data_epochs_and_grids_with_scale() -> None:
    small = reproduce.make_plan("resnet20", "cifar10", None, 0.02, (5000, 1000))
    full = reproduce.make_plan("resnet20", "cifar10", None, 1.0, (5000, 1000))
    assert (small.train_per_class, small.test_per_class, small.epochs) == (100, 20, 4)
    assert (full.train_per_class, full.test_per_class, full.epochs) == (None, None, 182)
    assert full.rewind_epoch == 3 and full.ratios == (0.2, 0.1, 0.05, 0.01)
    assert len(small.prune) < len(full.prune) and len(small.densities) < len(full.densities)


def test_the_cpu_preset_trains_the_fast_recipe_on_all_of_cifar10_and_can_run_small() -> None:
    data, epochs, scale = reproduce.resolve_preset("cifar10-cpu", None, None, None)
    plan = reproduce.make_preset_plan("cifar10-cpu", "resnet20", epochs, scale, (5000, 1000))
    assert (data, plan.data, plan.epochs, plan.train_per_class) == ("cifar10", "cifar10", 30, None)
    train = plan.train
    assert (train.schedule, train.label_smoothing, train.flip_tta, train.epochs) == ("onecycle", 0.1, True, 30)
    assert plan.search.pruning_schedule == "adaptive" and plan.search.train == train
    _, epochs, scale = reproduce.resolve_preset("cifar10-cpu", None, 3, 0.01)
    small = reproduce.make_preset_plan("cifar10-cpu", "resnet20", epochs, scale, (5000, 1000))
    assert (small.epochs, small.train_per_class, small.recipe) == (3, 50, "fast")
    gpu = reproduce.make_preset_plan("cifar10-gpu", "resnet20", 182, 1.0, (5000, 1000))
    assert (gpu.epochs, gpu.recipe, gpu.schedule) == (182, "paper", "paper")


def test_a_recipe_changed_under_the_same_name_is_refused(tmp_path: Path, monkeypatch) -> None:
    plan = reproduce.make_preset_plan("cifar10-cpu", "resnet20", 30, 1.0, (5000, 1000))
    reproduce.check_plan(tmp_path, plan)
    reproduce.check_plan(tmp_path, plan)  # the same plan goes on
    stored = json.loads((tmp_path / "plan.json").read_text())
    del stored["training"]["crop_padding"]  # as a folder written before the setting existed holds it
    (tmp_path / "plan.json").write_text(json.dumps(stored))
    reproduce.check_plan(tmp_path, plan)  # a setting added since, at its default, is no change
    fast = RECIPES["fast"]
    monkeypatch.setitem(RECIPES, "fast", lambda epochs, seed: dataclasses.replace(fast(epochs, seed), lr=0.3))
    with pytest.raises(InputError, match=r"other settings \(training\)"):
        reproduce.check_plan(tmp_path, plan)


def test_the_committed_campaign_folder_holds_the_cpu_presets_plan(tmp_path: Path) -> None:
    """The README's campaign command goes on from the committed folder only if its plan is the preset's."""
    _, epochs, scale = reproduce.resolve_preset("cifar10-cpu", None, None, None)
    plan = reproduce.make_preset_plan("cifar10-cpu", "resnet20", epochs, scale, (5000, 1000))
    shutil.copy(CAMPAIGN / "plan.json", tmp_path / "plan.json")
    reproduce.check_plan(tmp_path, plan)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["reproduce", "table9"], "unknown target"),
        (["reproduce", "--preset", "cifar10-tpu"], "unknown preset"),
        (["reproduce", "--preset", "cifar10-cpu", "--data", "digits"], "leave --data out"),
        (["reproduce", "--scale", "0"], "--scale"),
        (["reproduce", "--scale", "1.5"], "--scale"),
        (["reproduce", "--data", "cifar10"], "--data-dir"),
        (["reproduce", "--status"], "holds no reproduction"),
    ],
)
def test_reproduce_refuses_bad_input_in_one_line(
    tmp_path: Path, capsys, argv: list[str], message: str
) -> None:
    assert main([*argv, "--out", str(tmp_path)]) == 2
    error = capsys.readouterr().err.strip()
    assert message in error and "Traceback" not in error
    assert not (tmp_path / "plan.json").exists()


def _campaign(out: Path) -> list[str]:
    return [sys.executable, "-m", "ticketguard", "reproduce", "table1", "--preset", "cifar10-cpu", "--data-dir",
            str(shared_data(CIFAR_JPEG)), "--scale", "0.01", "--epochs", "4", "--device", "cpu", "--out", str(out)]


def _committed_and_cloned(folder: Path, work: Path) -> Path:
    """``folder`` as a fresh clone has it after it is committed with the campaign's .gitignore: git decides."""
    git = ["git", "-c", "user.name=campaign", "-c", "user.email=campaign@localhost", "-c", "commit.gpgsign=false"]
    origin = work / "origin"
    shutil.copytree(folder, origin / "campaign")
    shutil.copy(CAMPAIGN / ".gitignore", origin / "campaign" / ".gitignore")
    for command in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "campaign"]):
        subprocess.run([*git, *command], cwd=origin, check=True, capture_output=True)
    subprocess.run([*git, "clone", "-q", str(origin), str(work / "clone")], check=True, capture_output=True)
    return work / "clone" / "campaign"


@pytest.mark.slow
def test_the_cifar10_campaign_killed_mid_training_resumes_with_the_same_command(tmp_path: Path) -> None:
    """kill -9 during the first pruning round of the CPU preset (run small; rounds retrain epochs 3-4): the
    same command goes on from the round's last finished epoch and ends where an uninterrupted run ends; so does
    a fresh clone of the folder committed under the campaign's .gitignore, which keeps the round's training state
    and leaves out what a killed atomic write left, without training the finished dense network again."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    reference = tmp_path / "reference"
    subprocess.run(_campaign(reference), check=True, capture_output=True, env=env, timeout=600)

    resumed = tmp_path / "resumed"
    round_checkpoint = resumed / "search" / "rounds" / "001-checkpoint.pt"
    process = subprocess.Popen(_campaign(resumed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.monotonic() + 300
    while not round_checkpoint.is_file() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert round_checkpoint.is_file(), "the kill must land after an epoch of the first round was saved"
    assert not (resumed / "results" / "table1.json").exists()
    (resumed / "search" / ".search.json.1f2e.tmp").write_text("{")  # a write killed before its rename
    committed = _committed_and_cloned(resumed, tmp_path / "git")
    killed = load_checkpoint(round_checkpoint)
    for out in (resumed, committed):
        dense, running = reproduce.campaign_status(out).stages[:2]
        assert (dense.name, dense.state, running.name, running.state) == (
            "dense training", "done", "search round 1 (r = 0.5)", "running"
        )
        assert running.detail == f"{killed['epoch']} of 4 epochs finished"
    assert [p.relative_to(committed) for p in committed.rglob("*.pt")] == [round_checkpoint.relative_to(resumed)]
    assert not list(committed.rglob("*.tmp")) and (committed / "search" / "search.json").is_file()
    dense = committed / "search" / "rounds" / "000-weights.safetensors"
    dense_written = dense.stat().st_mtime_ns

    for out in (resumed, committed):
        subprocess.run(_campaign(out), check=True, capture_output=True, env=env, timeout=600)
        finished, expected = (json.loads((o / "results" / "table1.json").read_text()) for o in (out, reference))
        assert finished == expected
        mask = load_mask(out / "ticket" / "mask.safetensors")
        assert mask == load_mask(reference / "ticket" / "mask.safetensors")
    assert dense.stat().st_mtime_ns == dense_written, "the committed dense network was trained again"
