import json
import os
import time
from pathlib import Path

import pytest
import torch
import torch.nn.utils.prune as torch_prune

import ticketguard
from ticketguard.artifacts.ticket import WEIGHTS_FILE
from ticketguard.cli import main
from ticketguard.cli.output import progress_bar
from ticketguard.models import build_model

QUICK = ["--epochs", "2", "--rewind-epoch", "1", "--ratios", "0.5", "--max-rounds", "1", "--train-per-class", "30"]


@pytest.fixture(scope="module")
def ticket_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "ticket"
    # a margin of 100 points: the one round always matches, so the folder's density is known
    assert main(["find", "--out", str(out), *QUICK, "--eps", "100"]) == 0
    return out


def test_find_writes_a_ticket_folder_that_info_describes(ticket_dir: Path, capsys) -> None:
    assert sorted(p.name for p in ticket_dir.iterdir()) == [
        "mask.safetensors", "rewind.safetensors", "search", "ticket.json", "weights.safetensors"]
    capsys.readouterr()
    assert main(["info", str(ticket_dir), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["kind"] == "ticket" and report["architecture"] == "resnet20" and report["dataset"] == "digits"
    assert [h["round"] for h in report["history"]] == [0, 1]
    assert report["history"][1]["matched"] and report["density"] == pytest.approx(0.5, abs=1e-3)
    assert len(report["layer_density"]) == 18


def test_info_prints_readable_tables(ticket_dir: Path, capsys) -> None:
    assert main(["info", str(ticket_dir)]) == 0
    printed = capsys.readouterr()
    assert "search history" in printed.out and "pruning spec" in printed.out and "blocks.0.conv1.weight" in printed.out
    assert "search history" not in printed.err  # results on stdout, so `info X > f` keeps them


def test_info_reads_a_torch_prune_checkpoint(tmp_path: Path, capsys) -> None:
    model = build_model("resnet20")
    for module in (model.blocks[0].conv1, model.blocks[1].conv2):
        torch_prune.l1_unstructured(module, "weight", amount=0.5)
    torch.save(model.state_dict(), tmp_path / "pruned.pth")
    assert main(["info", str(tmp_path / "pruned.pth"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["architecture"] == "resnet20" and report["source"] == "torch.nn.utils.prune"
    pruned = {"blocks.0.conv1.weight", "blocks.1.conv2.weight"}
    assert {name for name, density in report["layer_density"].items() if density < 1} == pruned
    assert all(report["layer_density"][name] == pytest.approx(0.5, abs=0.01) for name in pruned)


def test_info_reads_zeros_of_a_plain_safetensors_model(ticket_dir: Path, capsys) -> None:
    capsys.readouterr()
    assert main(["info", str(ticket_dir / WEIGHTS_FILE), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["architecture"] == "resnet20" and report["source"] == "zeros"
    assert report["layer_density"]["blocks.0.conv1.weight"] < 1.0
    assert report["layer_density"]["conv.weight"] == 1.0


class Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/ticketguard-cli-pwned",))


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["find", "--model", "vgg"], "unknown model"),
        (["find", "--data", "mnist"], "unknown data set"),
        (["find", "--data", "cifar10", "--data-dir", "{tmp}"], "neither"),
        (["find", "--ratios", "0.2,x"], "comma-separated"),
        (["find", "--ratios", "0.1,0.2"], "shrink"),
        (["info", "{tmp}/missing.pt"], "does not exist"),
        (["info", "{tmp}/evil.pt"], "refused"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(argv, message, tmp_path: Path, capsys) -> None:
    torch.save({"w": torch.ones(1), "x": Exploit()}, tmp_path / "evil.pt")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    if argv[0] == "find":
        argv = ["find", *QUICK, *argv[1:], "--out", str(tmp_path / "out")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
    assert not Path("/tmp/ticketguard-cli-pwned").exists()


def test_tampered_ticket_is_refused_by_info(ticket_dir: Path, tmp_path: Path, capsys) -> None:
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("ticket.json", "mask.safetensors", "rewind.safetensors", "weights.safetensors"):
        (copy / name).write_bytes((ticket_dir / name).read_bytes())
    data = bytearray((copy / "mask.safetensors").read_bytes())
    data[-1] ^= 1
    (copy / "mask.safetensors").write_bytes(bytes(data))
    assert main(["info", str(copy)]) == 2
    assert "sha256" in capsys.readouterr().err


def test_version_short_help_and_flags_shown_as_flags(capsys) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"ticketguard {ticketguard.__version__}"
    assert main(["verify", "-h"]) == 0
    help_text = capsys.readouterr().out
    assert "--json" in help_text and "<bool>" not in help_text and "--public-key" in help_text


@pytest.mark.parametrize("alpha", ["0", "1", "2", "nan", "-0.1"])
def test_a_false_claim_level_outside_zero_one_is_bad_input(ticket_dir: Path, tmp_path: Path, alpha: str, capsys) -> None:
    claim = tmp_path / "claim.json"
    claim.write_text('{"format": "ticketguard-claim/1", "signature": null, "ticket_files": {}, "extensions": {}}')
    assert main(["verify", str(ticket_dir), "--claim", str(claim), "--alpha", alpha]) == 2
    err = capsys.readouterr().err
    assert "must lie in (0, 1)" in err and "Traceback" not in err


def test_a_logged_run_prints_one_progress_line_per_step_with_the_time_left(capsys) -> None:
    """Under nohup the console is a file: each finished step is a line, not a bar nobody sees."""
    with progress_bar() as progress:
        task = progress.add_task("round 1", total=4, completed=1, status="")
        time.sleep(0.6)
        progress.update(task, advance=1, status="test acc 50.00%")
        progress.update(task, status="only the status changed")
        progress.advance(task)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("round 1:")]
    assert [line.split(" after")[0] for line in lines] == ["round 1: 2/4", "round 1: 3/4"]
    assert all("s left" in line for line in lines) and lines[0].endswith("test acc 50.00%")
    assert float(lines[0].split(", ")[1].split(" s left")[0]) >= 1  # two steps to go at >= 0.6 s a step


def test_the_time_left_leaves_out_the_first_steps_setup(capsys) -> None:
    """A training's first epoch also decodes the data: the estimate comes from the steps after it."""
    with progress_bar() as progress:
        task = progress.add_task("dense", total=10, status="")
        time.sleep(1.0)  # setup and the first step
        progress.advance(task)
        progress.advance(task)  # the steps after it are quick
        progress.advance(task)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("dense:")]
    left = [float(line.split(", ")[1].split(" s left")[0]) for line in lines]
    assert left[0] >= 9  # nine steps to go at >= 1 s a step, as far as one step shows
    assert left[2] < 1  # seven quick steps to go, not 7 x 1/3 s
