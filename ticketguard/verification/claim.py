"""The owner's secret claim: what was embedded where, in which shipped ticket, and when; optionally signed.

The Ed25519 signature covers a canonical JSON encoding of the claim body (sorted keys, no spaces, UTF-8), so
anyone holding the owner's public key can check that the claim is the owner's and unchanged since it was made.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from ticketguard.artifacts.ticket import MANIFEST
from ticketguard.core.errors import InputError
from ticketguard.core.files import atomic_path, read_json, sha256_file
from ticketguard.core.schema import SHA256_SCHEMA, check_json, nullable
from ticketguard.schemes.base import SCHEMES
from ticketguard.schemes.signature import Signature
from ticketguard.schemes.trigger import PLAIN_NAME, TriggerClaim
from ticketguard.verification.align import Reference
from ticketguard.verification.timestamp import TrustedTime, check_token, request_token

CLAIM_FORMAT = "ticketguard-claim/1"
PRIVATE_KEY_FILE = "owner.key"
PUBLIC_KEY_FILE = "owner.pub"
DEFENCE_KEY = "defence"
REFERENCE_KEY = "reference"
MAX_TOKEN_BASE64 = 4 * (64 * 1024) // 3 + 4  # a TSA answer is read up to 64 KiB
DEFENCE_SCHEMA = {
    "type": "object",
    "required": ["threshold", "quantile"],
    "properties": {
        "threshold": {"type": "number", "minimum": 0},
        "quantile": {"type": "number", "minimum": 0, "exclusiveMaximum": 1},
    },
    "additionalProperties": False,
}
# The whole claim at the boundary; each section's own schema is checked again by its from_json.
CLAIM_SCHEMA = {
    "type": "object",
    "required": ["format"],
    "properties": {
        "format": {"const": CLAIM_FORMAT},
        "created": {"type": "string"},
        **{key: nullable(scheme.schema) for key, scheme in SCHEMES.items() if scheme.top_level},
        "ticket_files": nullable(
            {"type": "object", "propertyNames": PLAIN_NAME, "additionalProperties": SHA256_SCHEMA}
        ),
        "extensions": nullable({
            "type": "object",
            # the reference is checked field by field by Reference.from_json
            "properties": {
                **{key: scheme.schema for key, scheme in SCHEMES.items() if not scheme.top_level},
                DEFENCE_KEY: DEFENCE_SCHEMA,
                REFERENCE_KEY: {"type": "object"},
            },
            "additionalProperties": False,
        }),
        "rfc3161": nullable({
            "type": "object",
            "required": ["token"],
            "properties": {"token": {"type": "string", "minLength": 1, "maxLength": MAX_TOKEN_BASE64}},
            "additionalProperties": False,
        }),
        "ed25519": nullable({
            "type": "object",
            "properties": {"public_key": {"type": "string"}, "signature": {"type": "string"}},
            "additionalProperties": False,
        }),
    },
}


@dataclass(frozen=True)
class DefenceClaim:
    """The add-on defence's part of the claim: the owner's magnitude threshold t and the quantile it came from."""

    threshold: float
    quantile: float

    def __post_init__(self) -> None:
        for name, value in (("threshold", self.threshold), ("quantile", self.quantile)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise InputError(f"the claim's defence {name} must be a finite number, got {value!r}")
        if self.threshold < 0 or not 0 <= self.quantile < 1:
            raise InputError(f"the claim's defence needs t >= 0 and a quantile in [0, 1), got {self}")

    def to_json(self) -> dict[str, float]:
        return {"threshold": self.threshold, "quantile": self.quantile}

    @classmethod
    def from_json(cls, data: Any) -> DefenceClaim:
        check_json(data, DEFENCE_SCHEMA, "the claim's defence section")
        return cls(data["threshold"], data["quantile"])


@dataclass
class Claim:
    """Secret evidence of ownership: the QR signature (V2), the trigger set (V3), the add-on defence's t and the
    protected ticket's compact record (``reference``, what a disguised suspect is aligned to), each optional, and the
    hashes of the shipped ticket they were made for.

    Each scheme in ``SCHEMES`` keeps its section in the field named by its claim key (``signature``,
    ``trigger``).
    """

    signature: Signature | None
    ticket_files: dict[str, str]
    trigger: TriggerClaim | None = None
    defence: DefenceClaim | None = None
    reference: Reference | None = None
    created: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    public_key: str | None = None
    signed: str | None = None
    timestamp_token: str | None = None
    """An RFC 3161 token (base64 DER) over ``commitment(claim)``: a trusted time at which the body existed."""

    def sections(self) -> dict[str, Any]:
        """Each registered scheme's section by claim key, None where the claim has none."""
        return {key: getattr(self, key) for key in SCHEMES}

    def body(self) -> dict[str, Any]:
        """Everything the Ed25519 signature covers."""
        top_level: dict[str, Any] = {}
        extensions: dict[str, Any] = {}
        for key, section in self.sections().items():
            scheme = SCHEMES[key]
            written = None if section is None else scheme.section_to_json(section)
            if scheme.top_level:
                top_level[key] = written
            elif written is not None:
                extensions[key] = written
        if self.defence is not None:
            extensions[DEFENCE_KEY] = self.defence.to_json()
        if self.reference is not None:
            extensions[REFERENCE_KEY] = self.reference.to_json()
        return {
            "format": CLAIM_FORMAT,
            "created": self.created,
            **top_level,
            "ticket_files": dict(self.ticket_files),
            "extensions": extensions,
        }

    def to_json(self) -> dict[str, Any]:
        data = self.body()
        if self.signed is not None:
            data["ed25519"] = {"public_key": self.public_key, "signature": self.signed}
        if self.timestamp_token is not None:
            data["rfc3161"] = {"token": self.timestamp_token}
        return data

    @classmethod
    def from_json(cls, data: Any) -> Claim:
        """A claim, refused unless it fits CLAIM_SCHEMA (every number finite and of the right kind)."""
        if not isinstance(data, dict) or data.get("format") != CLAIM_FORMAT:
            raise InputError(f"not a {CLAIM_FORMAT} claim file")
        check_json(data, CLAIM_SCHEMA, "the claim")
        signed, extensions = data.get("ed25519") or {}, data.get("extensions") or {}
        sections = {}
        for key, scheme in SCHEMES.items():
            section = (data if scheme.top_level else extensions).get(key)
            sections[key] = None if section is None else scheme.section_from_json(section)
        defence, reference = extensions.get(DEFENCE_KEY), extensions.get(REFERENCE_KEY)
        return cls(
            **sections,
            ticket_files=dict(data.get("ticket_files") or {}),
            defence=None if defence is None else DefenceClaim.from_json(defence),
            reference=None if reference is None else Reference.from_json(reference),
            created=data.get("created", ""),
            public_key=signed.get("public_key"),
            signed=signed.get("signature"),
            timestamp_token=(data.get("rfc3161") or {}).get("token"),
        )


def canonical(body: dict[str, Any]) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def commitment(claim: Claim) -> str:
    """sha256 of the claim's canonical body: publishable (a model card, a transparency log) without revealing
    the secret, since the body holds the trigger seed or labels and the reference mask, which no one can guess."""
    return hashlib.sha256(canonical(claim.body())).hexdigest()


def check_commitment(claim: Claim, published: str) -> None:
    """Refuse a claim whose body is not the one committed to by ``published`` (64 hex digits)."""
    text = published.strip().lower()
    if len(text) != 64 or any(c not in "0123456789abcdef" for c in text):
        raise InputError(f"a commitment is 64 hex digits from `ticketguard commit`, got {published!r}")
    if commitment(claim) != text:
        raise InputError("the claim does not match the published commitment: it was changed or is another claim")


def stamp(claim: Claim, tsa_url: str, timeout_s: float = 30.0) -> Claim:
    """Have the time-stamping authority at ``tsa_url`` sign the claim's commitment, in place: from then on the
    claim provably existed at the TSA's time, which no later claim can backdate."""
    token = request_token(bytes.fromhex(commitment(claim)), tsa_url, timeout_s)
    claim.timestamp_token = base64.b64encode(token).decode()
    return claim


def trusted_time(claim: Claim, tsa_certificate_pem: bytes) -> TrustedTime:
    """The time the claim's RFC 3161 token asserts, checked against the TSA certificate (or CA chain) the user
    trusts; refused when the claim has no token, the token is malformed, untrusted or covers another body."""
    if claim.timestamp_token is None:
        raise InputError("the claim carries no RFC 3161 timestamp; stamp it with `ticketguard timestamp CLAIM --tsa URL`")
    try:
        token = base64.b64decode(claim.timestamp_token, validate=True)
    except ValueError:
        raise InputError("the claim's RFC 3161 token is not valid base64") from None
    return check_token(token, bytes.fromhex(commitment(claim)), tsa_certificate_pem)


def ticket_hashes(folder: str | Path) -> dict[str, str]:
    """sha256 of every file of the shipped ticket folder, so the claim names exactly what was shipped."""
    folder = Path(folder)
    names = sorted(p.name for p in folder.iterdir() if p.is_file() and p.suffix in (".safetensors", ".json"))
    if MANIFEST not in names:
        raise InputError(f"{folder} is not a ticket folder: {MANIFEST} is missing")
    return {name: sha256_file(folder / name) for name in names}


def sign(claim: Claim, private_key: Ed25519PrivateKey) -> Claim:
    """Sign the claim body in place with the owner's key; the public key travels with it."""
    raw = private_key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    claim.public_key = base64.b64encode(raw).decode()
    claim.signed = base64.b64encode(private_key.sign(canonical(claim.body()))).decode()
    return claim


def check_signature(claim: Claim, expected_key: Ed25519PublicKey | None = None) -> bool:
    """True when the claim is signed and it checks out (by ``expected_key`` if given); False if unsigned.

    A signed claim whose signature fails, or that was signed by another key than expected, is bad input.
    """
    if claim.signed is None:
        if expected_key is not None:
            raise InputError("the claim is not signed, but a public key was given to check it against")
        return False
    try:
        key = Ed25519PublicKey.from_public_bytes(base64.b64decode(claim.public_key or "", validate=True))
        signature = base64.b64decode(claim.signed, validate=True)
    except ValueError:
        raise InputError(
            "the claim's Ed25519 key or signature is not valid base64 of the right length"
        ) from None
    if expected_key is not None and _raw(expected_key) != _raw(key):
        raise InputError("the claim was signed with another key than the given public key")
    try:
        key.verify(signature, canonical(claim.body()))
    except InvalidSignature:
        raise InputError(
            "the claim's Ed25519 signature does not match its content: the claim was changed"
        ) from None
    return True


def _raw(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def save_claim(path: str | Path, claim: Claim) -> None:
    """Write the claim atomically, readable by its owner only (it is secret)."""
    with atomic_path(path) as tmp:
        os.chmod(tmp, 0o600)
        tmp.write_text(json.dumps(claim.to_json(), indent=2, ensure_ascii=False) + "\n")


def load_claim(path: str | Path) -> Claim:
    return Claim.from_json(read_json(path))


def generate_keys(folder: str | Path) -> tuple[Path, Path]:
    """A new Ed25519 key pair as PEM: the private key readable by its owner only, both written atomically."""
    folder = Path(folder)
    private_key = Ed25519PrivateKey.generate()
    private_path, public_path = folder / PRIVATE_KEY_FILE, folder / PUBLIC_KEY_FILE
    if private_path.exists():
        raise InputError(
            f"{private_path} exists; move it away or choose another folder, keys are never overwritten"
        )
    private_pem = private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public_pem = private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    with atomic_path(private_path) as tmp:
        os.chmod(tmp, 0o600)
        tmp.write_bytes(private_pem)
    with atomic_path(public_path) as tmp:
        tmp.write_bytes(public_pem)
        os.chmod(tmp, 0o644)
    return private_path, public_path


def load_private_key(path: str | Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(read_pem(path), password=None)
    except (ValueError, TypeError):
        raise InputError(
            f"{path} is not an unencrypted PEM private key; make one with `ticketguard keygen`"
        ) from None
    if not isinstance(key, Ed25519PrivateKey):
        raise InputError(f"{path} is not an Ed25519 private key; make one with `ticketguard keygen`")
    return key


def load_public_key(path: str | Path) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(read_pem(path))
    except ValueError:
        raise InputError(f"{path} is not a PEM public key; make one with `ticketguard keygen`") from None
    if not isinstance(key, Ed25519PublicKey):
        raise InputError(f"{path} is not an Ed25519 public key; make one with `ticketguard keygen`")
    return key


def read_pem(path: str | Path) -> bytes:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"PEM file {path} does not exist")
    data = path.read_bytes()
    if b"-----BEGIN" not in data:
        raise InputError(f"{path} is not a PEM file")
    return data
