"""The owner's claim: JSON round trip, Ed25519 signing and checking, key files, and the signature CLI."""

from __future__ import annotations

import dataclasses
import json
import stat
from pathlib import Path

import pytest
import torch
from conftest import trained_ticket
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ticketguard.artifacts.ticket import Ticket
from ticketguard.cli import main
from ticketguard.core.errors import InputError
from ticketguard.core.files import save_tensors
from ticketguard.core.masks import magnitude_prune
from ticketguard.data import ImageData
from ticketguard.schemes.base import SCHEMES
from ticketguard.schemes.signature import Region, Signature
from ticketguard.verification.claim import (
    Claim,
    DefenceClaim,
    check_signature,
    commitment,
    generate_keys,
    load_claim,
    load_private_key,
    load_public_key,
    save_claim,
    sign,
)
from ticketguard.verification.verify import verify

SIGNATURE = Signature(
    "ACME-R20-2026", 2, "H", 3, True, (Region("blocks.7.conv1.weight", 5, 9, (64, 64, 3, 3)),)
)


def make_claim() -> Claim:
    return Claim(SIGNATURE, {"ticket.json": "ab" * 32}, defence=DefenceClaim(0.01, 0.005))


def ticket_folder(data: ImageData, folder: Path, seed: int) -> Path:
    trained_ticket(data, seed).save(folder)
    return folder


@pytest.fixture(scope="module")
def shipped(digits: ImageData, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(protected ticket, signed claim, key folder) made through the CLI."""
    root = tmp_path_factory.mktemp("shipped")
    original = ticket_folder(digits.subset(40, 20, 0), root / "ticket", seed=0)
    assert main(["keygen", "--out", str(root / "keys")]) == 0
    assert (
        main(
            [
                "embed",
                str(original),
                "--signature",
                "ACME-R20-2026",
                "--out",
                str(root / "protected"),
                "--claim",
                str(root / "claim.json"),
                "--signing-key",
                str(root / "keys" / "owner.key"),
                "--epochs",
                "1",
                "--train-per-class",
                "40",
                "--device",
                "cpu",
                "--copies",
                "2",
            ]
        )
        == 0
    )
    return root / "protected", root / "claim.json", root / "keys"


def test_claim_round_trips_through_json_with_extensions(tmp_path: Path) -> None:
    save_claim(tmp_path / "claim.json", make_claim())
    loaded = load_claim(tmp_path / "claim.json")
    assert loaded.body() == make_claim().body() | {"created": loaded.created}
    assert loaded.signature == SIGNATURE and loaded.defence == DefenceClaim(0.01, 0.005)
    assert stat.S_IMODE((tmp_path / "claim.json").stat().st_mode) == 0o600


def test_every_registered_scheme_has_a_claim_field_and_a_place_in_the_schema() -> None:
    fields = {field.name for field in dataclasses.fields(Claim)}
    empty = Claim(None, {}).body()
    assert list(SCHEMES) == ["signature", "trigger"]  # the order of the claim's sections and of the evidence
    for key, scheme in SCHEMES.items():
        assert key == scheme.claim_key and key in fields
        # an absent top-level section is written as null, an absent extension is left out
        assert (key in empty) == scheme.top_level and key not in empty["extensions"]


def test_a_claim_without_any_scheme_section_cannot_show_anything() -> None:
    with pytest.raises(InputError, match="neither a QR signature nor a trigger set"):
        verify({}, Claim(None, {}))


def test_signed_claim_checks_and_any_change_is_refused(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    save_claim(tmp_path / "claim.json", sign(make_claim(), key))
    assert check_signature(load_claim(tmp_path / "claim.json"), key.public_key())
    data = json.loads((tmp_path / "claim.json").read_text())
    data["signature"]["regions"][0]["row"] = 6
    (tmp_path / "claim.json").write_text(json.dumps(data))
    with pytest.raises(InputError, match="was changed"):
        check_signature(load_claim(tmp_path / "claim.json"))


def test_claim_signed_by_another_key_is_refused() -> None:
    claim = sign(make_claim(), Ed25519PrivateKey.generate())
    with pytest.raises(InputError, match="another key"):
        check_signature(claim, Ed25519PrivateKey.generate().public_key())
    assert check_signature(make_claim()) is False


def test_keygen_writes_a_private_key_only_its_owner_can_read_and_never_overwrites(tmp_path: Path) -> None:
    private_path, public_path = generate_keys(tmp_path)
    assert stat.S_IMODE(private_path.stat().st_mode) == 0o600
    claim = sign(make_claim(), load_private_key(private_path))
    assert check_signature(claim, load_public_key(public_path))
    with pytest.raises(InputError, match="never overwritten"):
        generate_keys(tmp_path)
    assert main(["keygen", "--out", str(tmp_path)]) == 2


def test_cli_verify_shows_ownership_of_the_protected_ticket(
    shipped: tuple[Path, Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    protected, claim, keys = shipped
    assert (
        main(
            [
                "verify",
                str(protected),
                "--claim",
                str(claim),
                "--public-key",
                str(keys / "owner.pub"),
                "--json",
            ]
        )
        == 0
    )
    verdict = json.loads(capsys.readouterr().out)
    evidence = verdict["evidence"][0]
    assert verdict["owned"] and verdict["claim_signed"]
    assert evidence["details"]["decoded"] == "ACME-R20-2026" and evidence["p_value"] < 1e-6


def test_cli_extract_reads_a_pruned_safetensors_suspect_and_writes_the_image(
    shipped: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    protected, claim, _ = shipped
    ticket = Ticket.load(protected)
    pruned = magnitude_prune(ticket.weights, ticket.mask, 0.2)
    save_tensors(
        tmp_path / "suspect.safetensors",
        {n: t * pruned[n] if n in pruned else t for n, t in ticket.weights.items()},
    )
    assert (
        main(
            [
                "extract",
                str(tmp_path / "suspect.safetensors"),
                "--claim",
                str(claim),
                "--image",
                str(tmp_path / "code.png"),
            ]
        )
        == 0
    )
    assert (tmp_path / "code.png").is_file()
    assert main(["extract", str(protected)]) == 0


def test_cli_verify_refuses_an_unmarked_ticket(
    shipped: tuple[Path, Path, Path], digits: ImageData, tmp_path: Path
) -> None:
    _, claim, _ = shipped
    unmarked = ticket_folder(digits.subset(40, 20, 1), tmp_path / "unmarked", seed=1)
    assert main(["verify", str(unmarked), "--claim", str(claim)]) == 1
    assert main(["extract", str(unmarked)]) == 1


def test_cli_bad_inputs_exit_2(shipped: tuple[Path, Path, Path], tmp_path: Path, capsys) -> None:
    protected, claim, _ = shipped
    data = json.loads(claim.read_text())
    data["signature"]["payload"] = "EVIL-CORP"
    (tmp_path / "tampered.json").write_text(json.dumps(data))
    assert main(["verify", str(protected), "--claim", str(tmp_path / "tampered.json")]) == 2
    torch.save({"not": "tensors"}, tmp_path / "junk.pt")
    assert main(["verify", str(tmp_path / "junk.pt"), "--claim", str(claim)]) == 2
    data = json.loads(claim.read_text())
    data.pop("ed25519")
    data["signature"]["regions"][0]["layer"] = "missing.weight"
    (tmp_path / "unsigned.json").write_text(json.dumps(data))
    # a region the suspect lacks is evidence that cannot be computed: not shown (exit 1), with the reason
    assert main(["verify", str(protected), "--claim", str(tmp_path / "unsigned.json"), "--json"]) == 1
    assert "missing.weight" in json.loads(capsys.readouterr().out)["unavailable"][0]["reason"]
    assert (
        main(
            [
                "embed",
                str(protected),
                "--signature",
                "x" * 40,
                "--out",
                str(tmp_path / "out"),
                "--qr-version",
                "2",
            ]
        )
        == 2
    )


def test_verify_checks_the_claim_against_its_published_commitment(
    shipped: tuple[Path, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    protected, claim, _ = shipped
    capsys.readouterr()
    assert main(["commit", str(claim)]) == 0
    published = capsys.readouterr().out.strip()
    assert published == commitment(load_claim(claim)) and len(published) == 64
    assert main(["verify", str(protected), "--claim", str(claim), "--commitment", published, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["claim_commitment"] == "matches the published commitment"
    changed = load_claim(claim)
    changed.created = "2020-01-01T00:00:00+00:00"  # a backdated, unsigned copy of the same claim
    changed.signed = changed.public_key = None
    save_claim(tmp_path / "backdated.json", changed)
    assert main(["verify", str(protected), "--claim", str(tmp_path / "backdated.json"), "--commitment", published]) == 2
    assert "does not match the published commitment" in capsys.readouterr().err
    assert main(["verify", str(protected), "--claim", str(claim), "--commitment", "xyz"]) == 2
    assert "64 hex digits" in capsys.readouterr().err
