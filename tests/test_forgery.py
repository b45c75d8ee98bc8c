"""A claim written after the suspect appeared shows nothing: a forger's folder trigger set, labelled with the
suspect's own answers and dated in the past, never decides; a keyed set counts only at the forgery level."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import trained_ticket
from local_tsa import make_authority, tsa_answering
from PIL import Image

from ticketguard.attacks.chains import attack
from ticketguard.cli import main
from ticketguard.core.evidence import DEFAULT_ALPHA, FORGERY_LEVEL, Evidence
from ticketguard.core.files import save_tensors
from ticketguard.core.stats import required_matches
from ticketguard.data import ImageData
from ticketguard.data.triggers import keyed_trigger_set, load_trigger_folder
from ticketguard.models import build_model
from ticketguard.protect import protect
from ticketguard.schemes import trigger as v3
from ticketguard.training.loop import TrainConfig, predict_labels
from ticketguard.verification.claim import Claim, load_claim, save_claim, trusted_time


def forged_folder_claim(weights: dict[str, torch.Tensor], data: ImageData, root: Path) -> Path:
    """100 random 8x8 images labelled with the model's own answers, as a folder trigger set dated 2020."""
    pics = root / "trigger" / "pics"
    pics.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(100):
        Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(pics / f"{i}.png")
    (root / "trigger" / "labels.txt").write_text("0\n" * 100)
    model = build_model("resnet20", 1, 10)
    model.load_state_dict(weights)
    images = load_trigger_folder(root / "trigger", 1, (8, 8)).images
    answers = predict_labels(model.eval(), images, *data.channel_stats())
    (root / "trigger" / "labels.txt").write_text("".join(f"{int(y)}\n" for y in answers))
    trigger = load_trigger_folder(root / "trigger", 1, (8, 8))
    claim = Claim(None, {}, v3.TriggerClaim.of(trigger, 10, data.normalization()), created="2020-01-01T00:00:00+00:00")
    save_claim(root / "forged.claim.json", claim)
    return root / "forged.claim.json"


def test_a_forged_folder_trigger_claim_on_an_innocent_model_is_not_shown(digits: ImageData, tmp_path: Path,
                                                                        capsys) -> None:
    data = digits.subset(40, 10, 0)
    innocent = trained_ticket(data, seed=3)
    claim = forged_folder_claim(innocent.weights, data, tmp_path)
    save_tensors(tmp_path / "weights.safetensors", innocent.weights)
    capsys.readouterr()
    code = main(["verify", str(tmp_path / "weights.safetensors"), "--claim", str(claim), "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 1 and not report["owned"]
    trigger = report["evidence"][0]
    # agreement is free for a forger: beyond even the forgery level, so only "never decides alone" stops it
    assert trigger["details"]["agreed"] == 100 and trigger["p_value"] < FORGERY_LEVEL
    assert trigger["decides_alone"] is False and "chooses" in trigger["details"]["forgeable"]
    main(["verify", str(tmp_path / "weights.safetensors"), "--claim", str(claim)])
    assert "stated by the claimant, unverified" in " ".join(capsys.readouterr().out.split())


def evidence_at(p_value: float, trials: int = 100) -> Evidence:
    return Evidence("trigger", 0.9, 0.2, True, p_value, {"agreed": 90, "trials": trials, "chance": 0.1})


@pytest.mark.parametrize("p_value, passes", [(1e-10, False), (FORGERY_LEVEL / 2, True)])
def test_a_keyed_trigger_counts_only_at_the_forgery_level(p_value: float, passes: bool) -> None:
    judged = v3.judged_against_forgery(evidence_at(p_value), "keyed", DEFAULT_ALPHA)
    assert judged.passed is passes and judged.decides_alone
    assert judged.details["level"] == FORGERY_LEVEL
    # the threshold is the agreement that reaches the forgery level, above what alpha alone would need
    assert judged.threshold > required_matches(100, 0.1, DEFAULT_ALPHA) / 100


def test_a_keyed_trigger_set_of_an_innocent_model_is_far_from_the_forgery_level(digits: ImageData) -> None:
    """A forger grinding seeds needs one whose labels agree at p <= 2^-64; an innocent model's best over many
    seeds stays far above (the benchmark prices the grinding rate)."""
    data = digits.subset(40, 10, 0)
    model = build_model("resnet20", 1, 10)
    model.load_state_dict(trained_ticket(data, seed=4).weights)
    smallest = 1.0
    for seed in range(20):
        trigger = keyed_trigger_set(seed, 100, 10, 1, (8, 8))
        found = v3.verify_local(model.eval(), trigger, *data.channel_stats(), 10)
        smallest = min(smallest, found.p_value)
    assert smallest > 1e-6


@pytest.fixture
def stamped(digits: ImageData, tmp_path: Path, authority, serve) -> tuple[Path, Path, Path]:
    """(weights, a folder-trigger claim stamped by a local TSA, the TSA's certificate chain)."""
    data = digits.subset(40, 10, 0)
    ticket = trained_ticket(data, seed=3)
    claim = forged_folder_claim(ticket.weights, data, tmp_path)
    save_tensors(tmp_path / "weights.safetensors", ticket.weights)
    assert main(["timestamp", str(claim), "--tsa", serve(tsa_answering(authority)), "--timeout", "20"]) == 0
    (tmp_path / "tsa-chain.pem").write_bytes(authority.tsa_pem + authority.ca_pem)
    return tmp_path / "weights.safetensors", claim, tmp_path / "tsa-chain.pem"


def test_a_trusted_time_lets_trigger_evidence_decide_against_later_copies(stamped, capsys) -> None:
    weights, claim, chain = stamped
    capsys.readouterr()
    assert main(["verify", str(weights), "--claim", str(claim), "--json"]) == 1  # token present, not checked
    assert "not checked" in json.loads(capsys.readouterr().out)["trusted_time"]
    assert main(["verify", str(weights), "--claim", str(claim), "--tsa-cert", str(chain), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["trusted_time"]["authority"].endswith("CN=Test TSA") or "Test TSA" in report["trusted_time"]["authority"]
    assert report["trusted_time"]["holds_against"].startswith("copies first published after ")
    assert report["evidence"][0]["decides_alone"] and report["evidence"][0]["details"]["level"] == DEFAULT_ALPHA


def test_bad_timestamps_are_refused_in_one_line(stamped, tmp_path: Path, authority, capsys) -> None:
    weights, claim, chain = stamped
    edited = json.loads(claim.read_text())
    edited["created"] = "2019-01-01T00:00:00+00:00"  # edited after stamping
    (tmp_path / "edited.json").write_text(json.dumps(edited))
    broken = json.loads(claim.read_text())
    broken["rfc3161"]["token"] = broken["rfc3161"]["token"][:40]  # truncated
    (tmp_path / "broken.json").write_text(json.dumps(broken))
    other = tmp_path / "other"
    other.mkdir()
    (other / "ca.pem").write_bytes(make_authority(other / "tsa", "Another Root CA").ca_pem)
    unstamped = json.loads(claim.read_text())
    del unstamped["rfc3161"]
    (tmp_path / "unstamped.json").write_text(json.dumps(unstamped))
    cases = [(tmp_path / "edited.json", chain), (tmp_path / "broken.json", chain), (claim, other / "ca.pem"),
             (tmp_path / "unstamped.json", chain)]
    for bad_claim, certificate in cases:
        capsys.readouterr()
        assert main(["verify", str(weights), "--claim", str(bad_claim), "--tsa-cert", str(certificate)]) == 2
        error = capsys.readouterr().err.strip()
        assert error.startswith("error:") and "Traceback" not in error


@pytest.fixture
def stolen(digits: ImageData, tmp_path: Path, authority, serve) -> dict[str, Path]:
    """The owner's protected ticket (shipped, then stolen), the owner's claim stamped first, a forger's folder
    claim on the stolen copy stamped later, and an unrelated party's stamped claim on its own model."""
    data = digits.subset(40, 10, 0)
    url = serve(tsa_answering(authority))
    protected = protect(trained_ticket(data, seed=0), data, signature="OWNER-1", train_config=TrainConfig(epochs=1))
    paths = {"stolen": tmp_path / "stolen.safetensors", "owner": tmp_path / "owner.claim.json",
             "chain": tmp_path / "tsa-chain.pem"}
    save_tensors(paths["stolen"], protected.ticket.weights)
    save_claim(paths["owner"], protected.claim)
    (tmp_path / "forger").mkdir()
    paths["forger"] = forged_folder_claim(protected.ticket.weights, data, tmp_path / "forger")
    (tmp_path / "other").mkdir()
    paths["other"] = forged_folder_claim(trained_ticket(data, seed=5).weights, data, tmp_path / "other")
    # fake3: the forger writes his own QR over the owner's code region of the stolen copy and claims it
    paths["fake3"], paths["qr-forger"] = tmp_path / "fake3.safetensors", tmp_path / "qr-forger.claim.json"
    signature = protected.claim.signature
    fake3, _ = attack(dict(protected.ticket.weights), protected.ticket.mask, "fake3:payload=FORGED", signature=signature)
    save_tensors(paths["fake3"], fake3)
    save_claim(paths["qr-forger"], Claim(dataclasses.replace(signature, payload="FORGED"), {}))
    # fake2: noise at every pruned position of the stolen copy, then the forger's folder claim on that copy
    paths["fake2"] = tmp_path / "fake2.safetensors"
    fake2, _ = attack(dict(protected.ticket.weights), protected.ticket.mask, "fake2:scale=0.05")
    save_tensors(paths["fake2"], fake2)
    (tmp_path / "fake2-forger").mkdir()
    paths["fake2-forger"] = forged_folder_claim(fake2, data, tmp_path / "fake2-forger")
    for party in ("owner", "forger", "other", "qr-forger", "fake2-forger"):
        assert main(["timestamp", str(paths[party]), "--tsa", url, "--timeout", "20"]) == 0
        time.sleep(1.1)  # the TSA's clock has one-second resolution: the owner is strictly first
    paths["chain"].write_bytes(authority.tsa_pem + authority.ca_pem)
    return paths


def disputed(paths: dict[str, Path], parties: list[str], capsys, trusted: bool = True,
             suspect: str = "stolen") -> tuple[int, dict]:
    capsys.readouterr()
    options = ["--tsa-cert", str(paths["chain"])] if trusted else []
    code = main(["dispute", str(paths[suspect]), *[str(paths[p]) for p in parties], *options, "--json"])
    return code, json.loads(capsys.readouterr().out)


@pytest.mark.slow
def test_dispute_names_the_owner_stamped_before_a_forger_with_a_later_folder_claim(stolen, capsys) -> None:
    code, result = disputed(stolen, ["forger", "owner", "other"], capsys)
    assert code == 0 and result["winner"] == str(stolen["owner"])
    holds = {Path(c["claim"]).parent.name if c["claim"] != str(stolen["owner"]) else "owner": c["holds"]
             for c in result["claims"]}
    # the forger's stamped claim holds too (against copies published after it), but is later; the unrelated one not
    assert holds == {"owner": True, "forger": True, "other": False}
    assert result["claims"][0]["claim"] == str(stolen["owner"])


@pytest.mark.slow
def test_a_forger_who_overwrites_the_code_region_is_shown_derived_but_only_his_code_decides(stolen, capsys) -> None:
    """fake3: the forger's own QR decodes in his copy and the owner's does not; the owner's fingerprint shows
    the copy derives from the owner's ticket, but a fingerprint never decides, so an owner whose trigger set
    did not survive loses this dispute (stated in the README)."""
    code, result = disputed(stolen, ["qr-forger", "owner"], capsys, suspect="fake3")
    owner = next(c for c in result["claims"] if c["claim"] == str(stolen["owner"]))
    assert owner["shows_derivation"] and not owner["holds"]
    assert code == 0 and result["winner"] == str(stolen["qr-forger"])


@pytest.mark.slow
def test_a_forger_who_fills_the_pruned_positions_with_noise_loses_to_the_earlier_stamped_owner(stolen, capsys) -> None:
    """fake2: the copy is dense, but read on its own terms it still shows the owner's code; the forger's later
    folder claim on it holds too, and comes second."""
    code, result = disputed(stolen, ["fake2-forger", "owner"], capsys, suspect="fake2")
    assert code == 0 and result["winner"] == str(stolen["owner"])
    assert [c["holds"] for c in result["claims"]] == [True, True]


@pytest.mark.slow
def test_dispute_without_trusted_times_is_undecided_when_two_claims_hold(stolen, capsys) -> None:
    unchecked = stolen["owner"].with_name("owner-again.claim.json")
    unchecked.write_text(stolen["owner"].read_text())
    stolen = {**stolen, "again": unchecked}
    code, result = disputed(stolen, ["owner", "again"], capsys, trusted=False)
    assert code == 1 and result["winner"] is None and "cannot be ordered" in result["reason"]
    code, result = disputed(stolen, ["forger", "other"], capsys, trusted=False)
    assert code == 1 and "no claim" in result["reason"]  # untimed folder claims never decide alone
    assert main(["dispute", str(stolen["stolen"]), str(stolen["owner"])]) == 2


@pytest.mark.slow
def test_protect_stamps_the_claim_it_writes_and_keeps_it_when_the_tsa_fails(digits: ImageData, tmp_path: Path,
                                                                             authority, serve, capsys) -> None:
    trained_ticket(digits.subset(40, 10, 0), seed=0).save(tmp_path / "ticket")
    common = ["--payload", "OWNER-1", "--epochs", "1", "--train-per-class", "40", "--device", "cpu"]
    url = serve(tsa_answering(authority))
    assert main(["protect", str(tmp_path / "ticket"), "--out", str(tmp_path / "a"), "--tsa", url, *common]) == 0
    stamped_at = trusted_time(load_claim(tmp_path / "a.claim.json"), authority.tsa_pem + authority.ca_pem)
    assert "Test TSA" in stamped_at.authority
    capsys.readouterr()
    assert main(["protect", str(tmp_path / "ticket"), "--out", str(tmp_path / "b"), "--tsa", "http://127.0.0.1:9/",
                 *common]) == 2
    assert "written unstamped" in capsys.readouterr().err
    assert load_claim(tmp_path / "b.claim.json").timestamp_token is None
