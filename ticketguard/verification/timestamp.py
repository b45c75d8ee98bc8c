"""RFC 3161 trusted timestamps: a Time-Stamp Authority (TSA) signs a sha256 digest together with the time.

A claim's digest stamped by a TSA that a third party trusts shows that the claim existed at that time, without
trusting the owner's clock. The protocol objects and their verification are rfc3161-client's; the two wrappers
it lacks (a request for a digest that is already a sha256, and a bare token read as a granted TSA response)
are declared with cryptography's ASN.1 module rather than written byte by byte.
"""

from __future__ import annotations

import asyncio
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated

import httpx
from cryptography import x509
from cryptography.hazmat import asn1
from rfc3161_client import TimeStampResponse, VerificationError, VerifierBuilder, decode_timestamp_response

from ticketguard.core.errors import InputError

SHA256_OID = x509.ObjectIdentifier("2.16.840.1.101.3.4.2.1")
DIGEST_BYTES = 32
MAX_RESPONSE_BYTES = 64 * 1024
QUERY_TYPE = "application/timestamp-query"
# RFC 3161 names the answer timestamp-reply; some TSAs still send the draft's timestamp-response.
REPLY_TYPES = ("application/timestamp-reply", "application/timestamp-response")
GRANTED = 0
# Raw bytes only: a compressed answer could expand far past MAX_RESPONSE_BYTES before it is counted.
HEADERS = {"Content-Type": QUERY_TYPE, "Accept-Encoding": "identity"}


@asn1.sequence
class _AlgorithmIdentifier:
    algorithm: x509.ObjectIdentifier
    parameters: asn1.Null | None


@asn1.sequence
class _MessageImprint:
    hash_algorithm: _AlgorithmIdentifier
    hashed_message: bytes


@asn1.sequence
class _TimeStampReq:
    """TimeStampReq of RFC 3161 section 2.4.1, without extensions."""

    version: int
    message_imprint: _MessageImprint
    req_policy: x509.ObjectIdentifier | None
    nonce: int | None
    cert_req: Annotated[bool, asn1.Default(False)]


@asn1.sequence
class _PKIStatusInfo:
    status: int


@asn1.sequence
class _TimeStampResp:
    """TimeStampResp of RFC 3161 section 2.4.2: the form in which rfc3161-client reads and checks a token."""

    status: _PKIStatusInfo
    time_stamp_token: asn1.TLV


@dataclass(frozen=True)
class TrustedTime:
    """What a verified token asserts: the TSA's time and who the TSA is."""

    time: datetime
    authority: str

    def to_json(self) -> dict[str, str]:
        return {"time": self.time.isoformat(), "authority": self.authority}


def request_token(digest: bytes, url: str, timeout_s: float = 30.0) -> bytes:
    """Send a TimeStampReq for the sha256 ``digest`` (32 bytes, with a random nonce and certReq=True) to
    the TSA at ``url`` over HTTP POST (content type application/timestamp-query) with a hard total deadline,
    check the response status and that the returned token covers this digest and nonce; return the token's
    DER bytes.

    The token's signature is not judged here: whether the TSA is trusted is for ``check_token`` to decide."""
    _check_digest(digest)
    nonce = secrets.randbits(64)
    query = asn1.encode_der(_TimeStampReq(
        version=1,
        message_imprint=_MessageImprint(
            hash_algorithm=_AlgorithmIdentifier(algorithm=SHA256_OID, parameters=asn1.Null()),
            hashed_message=digest,
        ),
        req_policy=None,
        nonce=nonce,
        cert_req=True,
    ))
    answer = _post(url, query, timeout_s)
    try:
        response = decode_timestamp_response(answer)
        if response.status != GRANTED:
            reason = "; ".join(response.status_string) or "no reason given"
            raise InputError(f"the TSA at {url} refused the request with status {response.status} ({reason})")
        info = response.tst_info
        if info.message_imprint.hash_algorithm != SHA256_OID or info.message_imprint.message != digest:
            raise InputError(f"the TSA at {url} stamped another digest than the one sent; do not use it")
        if info.nonce != nonce:
            raise InputError(f"the TSA at {url} answered with another request's nonce; try again")
        return response.time_stamp_token()
    except ValueError as error:
        if isinstance(error, InputError):
            raise
        raise InputError(f"the TSA at {url} sent an answer that is not an RFC 3161 response") from None


def check_token(token: bytes, digest: bytes, trusted_certificate_pem: bytes) -> TrustedTime:
    """Verify that the DER timestamp token covers sha256 ``digest``, is signed by the TSA whose certificate
    the user trusts (the PEM given, which may be the TSA's own certificate or the root CA that issued it), and
    return the asserted time and authority. Any failure raises ticketguard.core.errors.InputError with one clear
    sentence.

    OpenSSL, which checks the signature, accepts only chains that end in a self-signed certificate: a TSA
    certificate issued by a CA is trusted by giving it followed by its issuers' certificates in one PEM."""
    _check_digest(digest)
    trusted = _load_trusted(trusted_certificate_pem)
    response = _as_response(token)
    builder = VerifierBuilder()
    for certificate in trusted:
        builder = builder.add_root_certificate(certificate)
    tsa = next((certificate for certificate in trusted if not _is_ca(certificate)), None)
    if tsa is not None:
        # A trusted TSA certificate must be the very one that signed, not one that chains to the same CA.
        builder = builder.tsa_certificate(tsa)
    try:
        if response.tst_info.message_imprint.hash_algorithm != SHA256_OID:
            raise InputError("the timestamp token does not stamp a sha256 digest")
        builder.build().verify(response, digest)
        signer = _signer(response, trusted)
        asserted = response.tst_info.gen_time
    except (VerificationError, ValueError) as error:
        if isinstance(error, InputError):
            raise
        raise InputError(
            f"the timestamp token does not verify against the trusted certificate: {error}"
        ) from None
    if asserted.tzinfo is None:
        asserted = asserted.replace(tzinfo=UTC)
    return TrustedTime(asserted.astimezone(UTC), signer.subject.rfc4514_string())


def _check_digest(digest: bytes) -> None:
    if not isinstance(digest, bytes) or len(digest) != DIGEST_BYTES:
        raise InputError(f"a timestamp needs a sha256 digest of {DIGEST_BYTES} bytes, got {digest!r:.80}")


def _load_trusted(pem: bytes) -> list[x509.Certificate]:
    """The user's trusted certificates; a TSA certificate among them must come with the chain to its root."""
    try:
        trusted = list(dict.fromkeys(x509.load_pem_x509_certificates(bytes(pem))))
    except (ValueError, TypeError):
        raise InputError("the trusted TSA certificate is not a PEM X.509 certificate") from None
    subjects = {certificate.subject for certificate in trusted}
    for certificate in trusted:
        if certificate.issuer not in subjects:
            raise InputError(
                f"the trusted PEM holds {certificate.subject.rfc4514_string()} but not its issuer "
                f"{certificate.issuer.rfc4514_string()}; append the issuer's certificate or trust the root CA"
            )
    return trusted


def _is_ca(certificate: x509.Certificate) -> bool:
    try:
        return certificate.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        return False


def _as_response(token: bytes) -> TimeStampResponse:
    """Read a bare token as the granted TimeStampResp that carries it: what rfc3161-client verifies."""
    try:
        wrapped = asn1.encode_der(_TimeStampResp(
            status=_PKIStatusInfo(status=GRANTED), time_stamp_token=asn1.decode_der(asn1.TLV, bytes(token))
        ))
        return decode_timestamp_response(wrapped)
    except (ValueError, TypeError):
        raise InputError(
            "the timestamp token is not a DER RFC 3161 token; it may be truncated or damaged"
        ) from None


def _signer(response: TimeStampResponse, trusted: list[x509.Certificate]) -> x509.Certificate:
    """The certificate named by the token's one SignerInfo: embedded in the token or a trusted one."""
    (info,) = response.signed_data.signer_infos
    embedded = [x509.load_der_x509_certificate(der) for der in response.signed_data.certificates]
    for certificate in [*embedded, *trusted]:
        if certificate.issuer == info.issuer and certificate.serial_number == info.serial_number:
            return certificate
    raise VerificationError("no certificate in the token or trusted matches its signer")


def _post(url: str, query: bytes, timeout_s: float) -> bytes:
    """POST ``query``; one deadline covers connecting, sending and the whole answer, which is read only up to
    MAX_RESPONSE_BYTES so a slow or endless TSA cannot hold or fill the caller."""
    try:
        return asyncio.run(asyncio.wait_for(_post_async(url, query, timeout_s), timeout_s))
    except (TimeoutError, httpx.TimeoutException):
        raise InputError(
            f"the TSA at {url} did not answer within {timeout_s:g} s; retry or use another TSA"
        ) from None
    except httpx.HTTPError as error:
        raise InputError(
            f"could not reach the TSA at {url} ({error}); check the URL and the network"
        ) from None


async def _post_async(url: str, query: bytes, timeout_s: float) -> bytes:
    async with (
        httpx.AsyncClient(timeout=timeout_s, follow_redirects=False) as client,
        client.stream("POST", url, content=query, headers=HEADERS) as answer,
    ):
        if answer.status_code != 200:
            raise InputError(f"the TSA at {url} answered HTTP {answer.status_code}; check the URL")
        content_type = answer.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type not in REPLY_TYPES:
            raise InputError(
                f"the TSA at {url} answered with content type {content_type or 'none'!r}, not "
                f"{REPLY_TYPES[0]}; check that the URL is a timestamp service"
            )
        body = bytearray()
        async for chunk in answer.aiter_raw():
            body += chunk
            if len(body) > MAX_RESPONSE_BYTES:
                raise InputError(
                    f"the TSA at {url} sent more than {MAX_RESPONSE_BYTES} bytes; a timestamp reply is "
                    "a few KiB, so check the URL"
                )
        return bytes(body)
