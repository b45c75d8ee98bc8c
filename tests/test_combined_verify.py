"""ESWT + T: one claim holding a QR signature and a trigger set is verified on both, with one verdict."""

import json
from pathlib import Path

import pytest

from ticketguard.cli import main
from ticketguard.verification.claim import load_claim

QUICK_FIND = ["--epochs", "3", "--rewind-epoch", "1", "--ratios", "0.5", "--max-rounds", "1"]


@pytest.fixture(scope="module")
def protected(tmp_path_factory) -> Path:
    """A digits ticket with a QR signature (embed --no-train) and a keyed trigger set (watermark, the one
    training) in one claim."""
    root = tmp_path_factory.mktemp("combined")
    assert main(["find", "--out", str(root / "ticket"), *QUICK_FIND]) == 0
    assert main(["embed", str(root / "ticket"), "--signature", "OWNER-1", "--out", str(root / "signed"),
                 "--claim", str(root / "claim.json"), "--no-train"]) == 0
    assert main(["watermark", str(root / "signed"), "--trigger-seed", "11", "--per-batch", "32",
                 "--out", str(root / "marked"), "--claim", str(root / "claim.json"), "--epochs", "6"]) == 0
    assert main(["keygen", "--out", str(root / "keys")]) == 0
    return root


def test_verify_reports_signature_and_trigger_evidence(protected: Path, capsys) -> None:
    capsys.readouterr()
    assert main(["verify", str(protected / "marked"), "--claim", str(protected / "claim.json"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    evidence = {e["name"]: e for e in report["evidence"]}
    assert set(evidence) == {"qr-signature", "trigger", "fingerprint"}
    assert evidence["trigger"]["passed"] and evidence["trigger"]["p_value"] < 1e-6
    # the owner's defence reads its weakest 0.5 % as pruned; all else of its mask is there
    assert evidence["fingerprint"]["passed"] and evidence["fingerprint"]["score"] >= 0.99


def test_ticket_before_watermarking_fails_the_trigger_check(protected: Path, capsys) -> None:
    capsys.readouterr()
    main(["verify", str(protected / "ticket"), "--claim", str(protected / "claim.json"), "--json"])
    report = json.loads(capsys.readouterr().out)
    assert not report["owned"]
    assert not next(e for e in report["evidence"] if e["name"] == "trigger")["passed"]


def test_sign_after_watermark_makes_a_claim_that_checks_out(protected: Path, tmp_path: Path, capsys) -> None:
    claim = tmp_path / "claim.json"
    claim.write_bytes((protected / "claim.json").read_bytes())
    assert load_claim(claim).signed is None
    assert main(["sign", str(claim), "--signing-key", str(protected / "keys" / "owner.key")]) == 0
    assert main(["verify", str(protected / "marked"), "--claim", str(claim),
                 "--public-key", str(protected / "keys" / "owner.pub")]) == 0
    tampered = json.loads(claim.read_text())
    tampered["extensions"]["trigger"]["labels"][0] = (tampered["extensions"]["trigger"]["labels"][0] + 1) % 10
    claim.write_text(json.dumps(tampered))
    capsys.readouterr()
    assert main(["verify", str(protected / "marked"), "--claim", str(claim)]) == 2


def test_a_bare_weight_file_is_verified_on_both_pieces_of_evidence(protected: Path, capsys) -> None:
    capsys.readouterr()
    code = main(["verify", str(protected / "marked" / "weights.safetensors"), "--claim",
                 str(protected / "claim.json"), "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["unavailable"] == []
    assert {e["name"]: e["passed"] for e in report["evidence"]} == {
        "qr-signature": True, "trigger": True, "fingerprint": True}


def test_watermark_trains_once_and_records_it(protected: Path) -> None:
    metadata = json.loads((protected / "marked" / "ticket.json").read_text())["metadata"]
    assert metadata["protection"]["trained"] is True and metadata["protection"]["start"] == "rewind"
    signed = json.loads((protected / "signed" / "ticket.json").read_text())
    assert signed["metadata"]["protection"]["trained"] is False and signed["accuracy"] is None


def test_an_unrelated_weight_file_is_not_shown(protected: Path, tmp_path: Path) -> None:
    assert main(["find", "--out", str(tmp_path / "other"), *QUICK_FIND, "--seed", "5"]) == 0
    assert main(["verify", str(tmp_path / "other" / "weights.safetensors"), "--claim",
                 str(protected / "claim.json")]) == 1
