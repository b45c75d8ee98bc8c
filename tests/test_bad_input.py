"""Hostile input through the CLI: each is refused with exit 2 and one line on stderr, and changes nothing.

Covers lost files (outputs that would overwrite or corrupt artifacts, half-written splits and merges),
manifests that switch the sha256 check off, wrong JSON types in ticket.json and claims, and numbers that make
no sense. Nothing here trains: every bad input is refused before training would start.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from ticketguard.artifacts.ticket import MANIFEST, WEIGHTS_FILE, Ticket
from ticketguard.cli import main
from ticketguard.core.files import save_tensors
from ticketguard.core.masks import Mask, magnitude_prune, prunable_names
from ticketguard.data.triggers import keyed_trigger_set
from ticketguard.models import build_model
from ticketguard.schemes import keymask
from ticketguard.schemes.signature import Region, Signature
from ticketguard.schemes.trigger import TriggerClaim
from ticketguard.verification.claim import Claim, DefenceClaim, save_claim


@pytest.fixture(scope="module")
def ticket_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained ResNet-20 ticket at 30 % density: a real folder, made in a second."""
    torch.manual_seed(0)
    model = build_model("resnet20", 1, 10)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    mask = magnitude_prune(weights, Mask.ones_like(weights, prunable_names(model)), 0.7)
    mask.apply_(model)
    ticket = Ticket("resnet20", 1, 10, (8, 8), "digits", [str(i) for i in range(10)], mask, weights,
                    {k: v.clone() for k, v in model.state_dict().items()}, accuracy=0.5)
    return ticket.save(tmp_path_factory.mktemp("shared") / "ticket")


@pytest.fixture
def ticket(ticket_folder: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(ticket_folder, tmp_path / "ticket"))


@pytest.fixture
def split(ticket: Path, tmp_path: Path) -> Path:
    keymask.save_split(*keymask.split_key(Ticket.load(ticket), 0.1, "omp"), tmp_path / "split")
    return tmp_path / "split"


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root`` with its bytes (None for a folder)."""
    return {str(p.relative_to(root)): None if p.is_dir() else p.read_bytes() for p in sorted(root.rglob("*"))}


def refused(argv: list[str], message: str, capsys: pytest.CaptureFixture[str], root: Path) -> str:
    """Run the CLI; assert exit 2, ``message`` in one line on stderr, no traceback and ``root`` unchanged."""
    before = snapshot(root)
    capsys.readouterr()
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert snapshot(root) == before
    return err


# 1. Lost files --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("force", [[], ["--force"]])
def test_attack_never_writes_into_a_ticket_folder(ticket: Path, tmp_path: Path, capsys, force) -> None:
    for out in (ticket / WEIGHTS_FILE, ticket / "attacked.safetensors", ticket):
        refused(["attack", ticket, "--attack", "magnitude:fraction=0.1", "--out", out, *force],
                "pins every file by sha256", capsys, tmp_path)
    Ticket.load(ticket)


def test_attack_refuses_an_existing_file_without_force(ticket: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "attacked.safetensors"
    out.write_bytes(b"the user's earlier result")
    refused(["attack", ticket, "--attack", "magnitude:fraction=0.1", "--out", out],
            "already exists; choose another --out or give --force", capsys, tmp_path)
    argv = ["attack", str(ticket), "--attack", "magnitude:fraction=0.1", "--out", str(out), "--force"]
    assert main(argv) == 0
    assert out.read_bytes() != b"the user's earlier result"


def test_attack_never_replaces_its_own_input(ticket: Path, tmp_path: Path, capsys) -> None:
    model = tmp_path / "model.safetensors"
    model.write_bytes((ticket / WEIGHTS_FILE).read_bytes())
    refused(["attack", model, "--attack", "magnitude:fraction=0.1", "--out", model, "--force"],
            "would replace the input", capsys, tmp_path)


@pytest.mark.parametrize("command", ["split", "merge"])
def test_split_and_merge_refuse_a_non_empty_output_and_force_replaces_only_their_own(
    command: str, split: Path, ticket: Path, tmp_path: Path, capsys
) -> None:
    args = [ticket] if command == "split" else [split / "locked", split / "key"]
    written = ["key", "locked"] if command == "split" else [
        "mask.safetensors", "rewind.safetensors", "ticket.json", "weights.safetensors"]
    out = tmp_path / "out"
    assert main([command, *map(str, args), "--out", str(out)]) == 0
    refused([command, *args, "--out", out], "already exists and is not empty", capsys, tmp_path)
    assert main([command, *map(str, args), "--out", str(out), "--force"]) == 0
    assert sorted(p.name for p in out.iterdir()) == written
    (out / "notes.txt").write_text("mine")
    refused([command, *args, "--out", out, "--force"], "holds notes.txt, which this command never writes",
            capsys, tmp_path)


def test_merge_never_replaces_its_own_input(split: Path, tmp_path: Path, capsys) -> None:
    refused(["merge", split / "locked", split / "key", "--out", split, "--force"],
            "would replace the input", capsys, tmp_path)
    refused(["split", split / "locked", "--out", ".", "--force"], "give --out a name of its own", capsys,
            tmp_path)


@pytest.mark.parametrize("existing", [False, True])
def test_an_interrupted_split_writes_neither_folder(
    existing: bool, ticket: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    if existing:
        assert main(["split", str(ticket), "--out", str(out), "--key-density", "0.2"]) == 0
    before = snapshot(tmp_path)

    def killed(*args: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(keymask, "save_key", killed)
    assert main(["split", str(ticket), "--out", str(out), "--force"]) == 130  # interrupted
    assert snapshot(tmp_path) == before  # no locked/ without key/, no temporary folder left


def test_an_interrupted_merge_writes_nothing(
    split: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = snapshot(tmp_path)

    def killed(self: Ticket, folder: Path) -> None:
        (Path(folder) / "mask.safetensors").parent.mkdir(parents=True, exist_ok=True)
        (Path(folder) / "mask.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(Ticket, "save", killed)
    argv = ["merge", str(split / "locked"), str(split / "key"), "--out", str(tmp_path / "merged")]
    assert main(argv) == 130  # interrupted
    assert snapshot(tmp_path) == before


def test_what_a_killed_run_left_is_cleared_not_refused(ticket: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    (out / "locked").mkdir(parents=True)
    (out / "locked" / ".mask.safetensors.k3x9.tmp").write_bytes(b"half")  # an older, unstaged run
    (tmp_path / ".out.5f2a.tmp" / "locked").mkdir(parents=True)  # a staged run killed before its rename
    (tmp_path / ".out.5f2a.tmp" / "locked" / "mask.safetensors").write_bytes(b"half")
    assert main(["split", str(ticket), "--out", str(out)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "ticket"]
    assert sorted(p.name for p in (out / "locked").iterdir()) == [
        "mask.safetensors", "rewind.safetensors", "ticket.json", "weights.safetensors"]
    keymask.load_pair(out / "locked", out / "key")


def test_evaluate_never_writes_its_results_into_a_ticket_folder(ticket: Path, tmp_path: Path, capsys) -> None:
    save_claim(tmp_path / "claim.json", Claim.from_json(claim_json()))
    refused(["evaluate", ticket, "--claim", tmp_path / "claim.json", "--out", ticket],
            "pins every file by sha256", capsys, tmp_path)


def test_a_claim_is_never_written_into_a_ticket_folder(ticket: Path, tmp_path: Path, capsys) -> None:
    refused(["embed", ticket, "--payload", "ACME", "--out", tmp_path / "marked", "--claim", ticket / "c.json",
             "--no-train"], "pins every file by sha256", capsys, tmp_path)


# 2. Integrity that cannot be switched off -----------------------------------------------------------------


def edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize(
    "files",
    [
        {},
        {"../../etc/hostname": "0" * 64},
        {"mask.safetensors": "0" * 64},
        "recorded",  # the true hashes plus a name outside the folder
    ],
)
def test_ticket_manifest_must_list_exactly_its_tensor_files(
    files, ticket: Path, tmp_path: Path, capsys
) -> None:
    def change(data: dict) -> None:
        data["files"] = {**data["files"], "../../etc/hostname": "0" * 64} if files == "recorded" else files

    edit_json(ticket / MANIFEST, change)
    refused(["info", ticket], "must list the sha256 of exactly mask.safetensors, rewind.safetensors, "
            "weights.safetensors", capsys, tmp_path)


def test_key_manifest_must_list_exactly_its_key_file(split: Path, tmp_path: Path, capsys) -> None:
    edit_json(split / "key" / "key.json", lambda data: data.update(files={}))
    refused(["merge", split / "locked", split / "key", "--out", tmp_path / "merged"],
            "must list the sha256 of exactly key.safetensors", capsys, tmp_path)


# 3. Wrong JSON types, at the boundary ---------------------------------------------------------------------


def _set(path: str, value: Any):
    """A change that sets the dotted ``path`` (list indices as numbers) to ``value``."""

    def change(data: Any) -> None:
        *parents, last = [int(k) if k.isdigit() else k for k in path.split(".")]
        for key in parents:
            data = data[key]
        data[last] = value

    return change


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (_set("architecture.in_channels", "1"), "architecture.in_channels: '1' is not of type 'integer'"),
        (_set("architecture.name", None), "architecture.name: None is not of type 'string'"),
        (_set("architecture.name", "mymodel"), "unknown model 'mymodel'; choose one of: resnet20"),
        (_set("architecture", []), "at architecture: [] is not of type 'object'"),
        (_set("architecture.num_classes", 10**9), "architecture.num_classes: 1000000000 is greater than"),
        (_set("architecture.num_classes", 100), "expected torch.float32 (100"),
        (_set("architecture.input_size", [8, 10**6]), "architecture.input_size.1: 1000000 is greater than"),
        (_set("dataset.classes", {"0": "zero"}), "at dataset.classes"),
        (_set("metadata", {"config": {"train": {"epochs": "3"}}}), "config.train.epochs: '3' is not"),
        (_set("accuracy", "0.9"), "at accuracy"),
        (_set("metadata", json.loads("[" * 40 + "]" * 40)), "nests deeper than 32 levels"),
    ],
)
def test_ticket_json_of_the_wrong_types_is_refused(
    change, message, ticket: Path, tmp_path: Path, capsys
) -> None:
    edit_json(ticket / MANIFEST, change)
    refused(["info", ticket], message, capsys, tmp_path)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('"accuracy": 1e400', "holds the number inf"),
        ('"accuracy": Infinity', "holds the number inf"),
        ('"accuracy": NaN', "holds the number nan"),
        ('"accuracy": ' + "[" * 100_000 + "]" * 100_000, "deeper than Python can read"),
        ('"accuracy": 1' + "0" * 5000, "is not valid JSON"),
    ],
)
def test_ticket_json_with_numbers_json_cannot_hold_is_refused(
    text: str, message: str, ticket: Path, tmp_path: Path, capsys
) -> None:
    manifest = (ticket / MANIFEST).read_text()
    (ticket / MANIFEST).write_text(manifest.replace('"accuracy": 0.5', text))
    refused(["info", ticket], message, capsys, tmp_path)


def claim_json() -> dict[str, Any]:
    signature = Signature("ACME", 2, "H", 3, True, (Region("blocks.7.conv1.weight", 5, 9, (64, 64, 3, 3)),))
    trigger = TriggerClaim.of(keyed_trigger_set(1, 5, 10, 1, (8, 8)), 10, None)
    return Claim(signature, {"ticket.json": "ab" * 32}, trigger, DefenceClaim(0.01, 0.005)).to_json()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (_set("signature.regions.0.row", -1), "signature.regions.0.row: -1 is less than the minimum of 0"),
        (_set("signature.kept_is_dark", "false"), "signature.kept_is_dark: 'false' is not of type 'boolean'"),
        (_set("signature.version", 2.9), "signature.version: 2.9 is not of type 'integer'"),
        (_set("signature.version", 41), "signature.version: 41 is greater than the maximum of 40"),
        (_set("signature.regions", [{"layer": "x", "row": 0, "col": 0, "shape": [1] * 4}] * 17), "too long"),
        (_set("signature", []), "at signature"),
        (_set("ticket_files", []), "at ticket_files"),
        (_set("extensions.trigger.shape", [1, "88", "88"]), "trigger.shape.1: '88' is not of type"),
        (_set("extensions.trigger.count", 10**12), "extensions.trigger.count: 1000000000000 is greater than"),
        (_set("extensions.trigger.labels_file", "../../etc/passwd"), "extensions.trigger.labels_file"),
        (_set("extensions.defence.threshold", "0.1"), "extensions.defence.threshold: '0.1' is not of type"),
        (_set("extensions.defence.threshold", float("inf")), "holds the number inf"),
        (_set("extensions.unknown", {}), "Additional properties are not allowed ('unknown' was unexpected)"),
    ],
)
def test_claims_of_the_wrong_types_are_refused(change, message, ticket: Path, tmp_path: Path, capsys) -> None:
    data = claim_json()
    change(data)
    (tmp_path / "claim.json").write_text(json.dumps(data))
    argv = ["verify", ticket, "--claim", tmp_path / "claim.json", "--device", "cpu"]
    refused(argv, message, capsys, tmp_path)


def test_a_valid_claim_still_loads(tmp_path: Path) -> None:
    save_claim(tmp_path / "claim.json", Claim.from_json(claim_json()))
    assert Claim.from_json(json.loads((tmp_path / "claim.json").read_text())).to_json() == claim_json()


# 4. Numbers that make no sense ----------------------------------------------------------------------------


def test_find_refuses_a_negative_round_count(tmp_path: Path, capsys) -> None:
    refused(["find", "--max-rounds", "-1", "--epochs", "2", "--rewind-epoch", "1", "--train-per-class", "5",
             "--out", tmp_path / "ticket"], "--max-rounds", capsys, tmp_path)


@pytest.mark.parametrize(
    ("option", "message"), [(["--input-size", "0"], "--input-size must lie in 8..4096"),
                            (["--port", "70000"], "--port must be a TCP port in 0..65535")]
)
def test_serve_refuses_impossible_sizes_and_ports(
    option, message, ticket: Path, tmp_path: Path, capsys
) -> None:
    refused(["serve", ticket, *option], message, capsys, tmp_path)


@pytest.mark.parametrize(
    ("option", "message"),
    [(["--prune", "2"], "--prune must be comma-separated fractions in [0, 1)"),
     (["--addon", "2"], "--addon must be comma-separated fractions in [0, 1]"),
     (["--prune", "0.1,abc"], "--prune must be"),
     (["--finetune-epochs", "0"], "--finetune-epochs must be >= 1")],
)
def test_evaluate_refuses_fractions_outside_the_unit_interval(
    option, message, ticket: Path, tmp_path: Path, capsys
) -> None:
    save_claim(tmp_path / "claim.json", Claim.from_json(claim_json()))
    refused(["evaluate", ticket, "--claim", tmp_path / "claim.json", "--out", tmp_path / "grid", *option],
            message, capsys, tmp_path)


@pytest.mark.parametrize(
    ("spec", "message"),
    [("magnitude:fraction=abc", "attack parameter fraction='abc' of 'magnitude' must be a finite number"),
     ("magnitude:fraction=nan", "must be a finite number, got nan"),
     ("random:fraction=0.1:seed=1.5", "seed='1.5' of 'random' must be an integer"),
     ("finetune:free=maybe", "must be true or false"),
     ("fake3:signature=x", "takes signature from the command's options"),
     ("magnitude:ratio=0.1", "takes no parameter ratio")],
)
def test_attack_specs_of_the_wrong_type_are_one_line(
    spec, message, ticket: Path, tmp_path: Path, capsys
) -> None:
    argv = ["attack", ticket, "--attack", spec, "--out", tmp_path / "x.safetensors"]
    refused(argv, message, capsys, tmp_path)


def test_watermark_refuses_a_billion_trigger_images(ticket: Path, tmp_path: Path, capsys) -> None:
    refused(["watermark", ticket, "--out", tmp_path / "marked", "--claim", tmp_path / "claim.json",
             "--trigger-seed", "1", "--trigger-count", "1000000000"],
            "a trigger set holds 1 to 100000 images, got 1000000000", capsys, tmp_path)


@pytest.mark.parametrize(
    ("tensors", "message"),
    [({}, "holds no tensors, so it is not a model"),
     ({"bias": torch.zeros(3)}, "holds no weight matrix or conv kernel, so it is not a model")],
)
def test_info_refuses_a_file_that_holds_no_model(tensors, message, tmp_path: Path, capsys) -> None:
    save_tensors(tmp_path / "empty.safetensors", tensors)
    refused(["info", tmp_path / "empty.safetensors"], message, capsys, tmp_path)
