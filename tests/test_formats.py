"""Golden files pinning the formats a user keeps: a ticket folder's ticket.json, claim.json and the key files.

Each artifact is built here from fixed inputs and compared with its copy under tests/golden/, so any change to
a format shows up as a failing test and, once accepted, as a diff of the golden files in review. The
golden files must stay readable: each is loaded back (Ticket.load, Claim.from_json, load_public_key).

To change a format deliberately, regenerate the golden files and commit the diff with the change:

    TICKETGUARD_UPDATE_GOLDEN=1 python -m pytest -q tests/test_formats.py

With TICKETGUARD_UPDATE_GOLDEN=1 the tests rewrite the golden files instead of comparing, then still check
that the new files load back.

The owner's private key is not committed as such: owner.key.txt describes its PEM and DER structure with the
32-byte seed zeroed out. The seed is the fixed test seed below, so the test can put it back and compare bytes.
"""

from __future__ import annotations

import base64
import difflib
import json
import os
import stat
from datetime import datetime
from pathlib import Path

import pytest
import torch
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

import ticketguard.verification.claim
from ticketguard.artifacts.ticket import MANIFEST, Ticket
from ticketguard.core.masks import Mask, prunable_names
from ticketguard.data import Normalization
from ticketguard.data.triggers import keyed_trigger_set
from ticketguard.models import build_model
from ticketguard.schemes.signature import Region, Signature
from ticketguard.schemes.trigger import TriggerClaim
from ticketguard.verification.align import Reference
from ticketguard.verification.claim import (
    PRIVATE_KEY_FILE,
    PUBLIC_KEY_FILE,
    Claim,
    DefenceClaim,
    check_signature,
    generate_keys,
    load_claim,
    load_private_key,
    load_public_key,
    save_claim,
    sign,
    ticket_hashes,
)

GOLDEN = Path(__file__).parent / "golden"
UPDATE_GOLDEN = "TICKETGUARD_UPDATE_GOLDEN"
PRIVATE_KEY_DESCRIPTION = "owner.key.txt"
TEST_SEED = bytes(range(1, 33))  # the fixed test key: known to anyone who reads this file, so no secret
CLAIM_CREATED = "2026-01-01T12:00:00+00:00"
DUMMY_TOKEN = base64.b64encode(b"not a real RFC 3161 token: only the claim's JSON layout is pinned").decode()
NORMALISED = "<normalised>"
NEWLINE = b"\n"
NORMALIZATION = Normalization((0.5,), (0.25,))
SIGNATURE = Signature(
    "ACME-R20-2026", 2, "H", 3, True, (Region("blocks.7.conv1.weight", 5, 9, (32, 32, 3, 3)),)
)


def compare_with_golden(name: str, actual: str) -> None:
    """Assert ``actual`` equals tests/golden/``name``; rewrite that file instead under UPDATE_GOLDEN=1."""
    path = GOLDEN / name
    if os.environ.get(UPDATE_GOLDEN) == "1":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(actual, encoding="utf-8")
        return
    assert path.is_file(), f"{path} is missing; create it with {UPDATE_GOLDEN}=1"
    expected = path.read_text(encoding="utf-8")
    if actual != expected:
        diff = "".join(difflib.unified_diff(
            expected.splitlines(keepends=True), actual.splitlines(keepends=True),
            f"golden/{name}", f"written/{name}",
        ))
        pytest.fail(
            f"the {name} format changed; if that is deliberate, rerun with {UPDATE_GOLDEN}=1 and commit the "
            f"golden diff:\n{diff}"
        )


def patterned(shape: torch.Size, offset: int) -> torch.Tensor:
    """Values in {-1, -7/8, ..., 1}, exact in float32. torch does not promise bit-identical random
    initialisation across versions and CPU kernels, and these bytes feed sha256 fields and the reference, so
    the weights come from integers rather than from the seeded init."""
    count = torch.Size(shape).numel()
    return (((torch.arange(count) * 5 + offset) % 17 - 8).float() / 8).view(shape)


def fixed_ticket() -> Ticket:
    """A tiny resnet20 ticket from fixed inputs: patterned weights, a fixed mask, fixed accuracy numbers."""
    model = build_model("resnet20", 1, 10)
    rewind, trained = {}, {}
    for index, (name, tensor) in enumerate(model.state_dict().items()):
        if not tensor.is_floating_point():  # num_batches_tracked
            rewind[name], trained[name] = tensor.clone(), tensor.clone()
        elif name.endswith("running_var"):  # a variance is positive
            variance = ((torch.arange(tensor.numel()) + index) % 4 + 1).float() / 4
            rewind[name] = trained[name] = variance.view_as(tensor)
        else:
            rewind[name], trained[name] = patterned(tensor.shape, index), patterned(tensor.shape, index + 3)
    mask = Mask({
        name: (torch.arange(trained[name].numel()) % (index % 3 + 2) != 0).view_as(trained[name])
        for index, name in enumerate(prunable_names(model))
    })
    weights = {name: t * mask[name] if name in mask else t for name, t in trained.items()}
    metadata = {
        "dense_accuracy": 0.9375,
        "config": {"train": {"epochs": 4, "batch_size": 128, "lr": 0.1, "seed": 0}},
        "search": {
            "ratios": [0.5],
            "counts": [1],
            "best_round": 1,
            "history": [
                {"round": 0, "ratio": None, "density": 1.0, "accuracy": 0.9375, "matched": True},
                {"round": 1, "ratio": 0.5, "density": mask.density(), "accuracy": 0.921875, "matched": True},
            ],
        },
    }
    return Ticket(
        "resnet20", 1, 10, (8, 8), "digits", [str(i) for i in range(10)], mask, rewind, weights,
        accuracy=0.921875, metadata=metadata, normalization=NORMALIZATION,
    )


def normalised_manifest(manifest: dict) -> dict:
    """ticket.json without what legitimately differs between runs of the same code on the same inputs."""
    manifest = dict(manifest)
    # The versions record the ticketguard, torch and python that wrote the folder: they change with every
    # release and machine. Their keys are pinned, their values are not.
    assert all(isinstance(v, str) and v for v in manifest["versions"].values())
    manifest["versions"] = {name: NORMALISED for name in manifest["versions"]}
    # created is the time of writing (Ticket.save takes no date); its form, ISO 8601 in UTC, is checked here.
    assert datetime.fromisoformat(manifest["created"]).utcoffset().total_seconds() == 0
    manifest["created"] = NORMALISED
    return manifest


@pytest.fixture
def ticket_folder(tmp_path: Path) -> Path:
    """The fixed ticket saved, its ticket.json replaced by the normalised one (a folder that still loads: the
    tensor files' hashes are untouched), so that the claim made from it is the same on every machine."""
    folder = fixed_ticket().save(tmp_path / "ticket")
    manifest = normalised_manifest(json.loads((folder / MANIFEST).read_text()))
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return folder


def fixed_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(TEST_SEED)


def fixed_claim(ticket_folder: Path) -> Claim:
    """A claim with every section: QR signature, keyed trigger set, defence, reference, Ed25519, RFC 3161."""
    ticket = Ticket.load(ticket_folder)
    trigger = keyed_trigger_set(20260101, 8, ticket.num_classes, ticket.in_channels, ticket.input_size)
    claim = Claim(
        SIGNATURE,
        ticket_hashes(ticket_folder),
        TriggerClaim.of(trigger, ticket.num_classes, NORMALIZATION, "suspect", accuracy=0.921875,
                        trigger_accuracy=1.0),
        DefenceClaim(0.0625, 0.005),
        Reference.of(
            ticket.architecture, ticket.in_channels, ticket.num_classes, ticket.weights, ticket.mask
        ),
        created=CLAIM_CREATED,
    )
    sign(claim, fixed_key())  # Ed25519 signatures are deterministic, so this one is pinned too
    claim.timestamp_token = DUMMY_TOKEN
    return claim


def describe_private_key(pem: bytes, mode: int) -> str:
    """owner.key with its 32-byte seed zeroed: the PEM lines, the file mode and the DER around the seed."""
    lines = pem.decode("ascii").splitlines()
    der = base64.b64decode("".join(lines[1:-1]), validate=True)
    assert der.count(TEST_SEED) == 1, "the PKCS8 DER must hold the raw 32-byte seed exactly once"
    redacted = der.replace(TEST_SEED, bytes(32))
    body = base64.b64encode(redacted).decode()
    before, after = der.split(TEST_SEED)
    return "\n".join([
        f"# {PRIVATE_KEY_FILE} as generate_keys writes it, with the 32-byte Ed25519 seed zeroed",
        f"mode {stat.S_IMODE(mode):04o}",
        f"bytes {len(pem)}, ends with a newline: {pem.endswith(NEWLINE)}",
        f"der {before.hex()} <32-byte seed> {after.hex()}".rstrip(),
        lines[0],
        *[body[i : i + 64] for i in range(0, len(body), 64)],
        lines[-1],
        "",
    ])


def restore_private_key(description: str, seed: bytes) -> bytes:
    """The PEM that ``describe_private_key`` described, with ``seed`` put back."""
    lines = description.splitlines()
    begin, end = lines.index("-----BEGIN PRIVATE KEY-----"), lines.index("-----END PRIVATE KEY-----")
    der = base64.b64decode("".join(lines[begin + 1 : end]), validate=True).replace(bytes(32), seed)
    body = base64.b64encode(der).decode()
    chunks = [body[i : i + 64] for i in range(0, len(body), 64)]
    return "\n".join([lines[begin], *chunks, lines[end], ""]).encode()


def test_ticket_json_matches_its_golden_file_and_the_golden_file_loads(ticket_folder: Path) -> None:
    compare_with_golden(MANIFEST, (ticket_folder / MANIFEST).read_text())
    # The golden ticket.json, beside the tensor files it names, is a folder the code reads.
    (ticket_folder / MANIFEST).write_text((GOLDEN / MANIFEST).read_text())
    loaded, ticket = Ticket.load(ticket_folder), fixed_ticket()
    assert loaded.mask == ticket.mask
    assert all(torch.equal(loaded.weights[k], ticket.weights[k]) for k in ticket.weights)
    assert all(torch.equal(loaded.rewind[k], ticket.rewind[k]) for k in ticket.rewind)
    assert (loaded.accuracy, loaded.metadata, loaded.normalization) == (
        ticket.accuracy, ticket.metadata, ticket.normalization
    )


def test_claim_json_matches_its_golden_file_and_the_golden_file_loads(
    ticket_folder: Path, tmp_path: Path
) -> None:
    claim = fixed_claim(ticket_folder)
    save_claim(tmp_path / "claim.json", claim)
    compare_with_golden("claim.json", (tmp_path / "claim.json").read_text(encoding="utf-8"))
    assert stat.S_IMODE((tmp_path / "claim.json").stat().st_mode) == 0o600  # a claim is secret
    golden = load_claim(GOLDEN / "claim.json")
    assert golden.to_json() == claim.to_json()
    assert golden.to_json() == Claim.from_json(json.loads((GOLDEN / "claim.json").read_text())).to_json()
    assert check_signature(golden, fixed_key().public_key())
    assert golden.trigger is not None  # the keyed set is rebuilt from the seed, with the labels it records
    assert golden.trigger.trigger_set().labels.tolist() == list(golden.trigger.labels)
    assert golden.ticket_files == ticket_hashes(ticket_folder)


def test_key_files_match_their_golden_files_and_the_golden_public_key_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # generate_keys draws a fresh key; the fixed test key stands in for it so that the files are comparable.
    monkeypatch.setattr(ticketguard.verification.claim.Ed25519PrivateKey, "generate", staticmethod(fixed_key))
    private_path, public_path = generate_keys(tmp_path)
    monkeypatch.undo()
    assert (private_path.name, public_path.name) == (PRIVATE_KEY_FILE, PUBLIC_KEY_FILE)
    pem = private_path.read_bytes()
    compare_with_golden(PRIVATE_KEY_DESCRIPTION, describe_private_key(pem, private_path.stat().st_mode))
    compare_with_golden(PUBLIC_KEY_FILE, public_path.read_text(encoding="ascii"))
    assert stat.S_IMODE(public_path.stat().st_mode) == 0o644
    raw = serialization.Encoding.Raw, serialization.PublicFormat.Raw
    golden_public = load_public_key(GOLDEN / PUBLIC_KEY_FILE)
    assert golden_public.public_bytes(*raw) == fixed_key().public_key().public_bytes(*raw)
    # The description, with the seed put back, is exactly the file generate_keys wrote, and it loads.
    restored = restore_private_key((GOLDEN / PRIVATE_KEY_DESCRIPTION).read_text(), TEST_SEED)
    assert restored == pem
    (tmp_path / "restored.key").write_bytes(restored)
    assert load_private_key(tmp_path / "restored.key").private_bytes_raw() == TEST_SEED
