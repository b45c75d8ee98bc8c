"""RFC 3161 timestamps end to end against a TSA run inside the test: certificates made with cryptography,
replies signed by ``openssl ts -reply`` and served over HTTP on 127.0.0.1."""

from __future__ import annotations

import hashlib
import http.server
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from local_tsa import REPLY_TYPE, Authority, Behaviour, answer, make_authority, reply, tsa_answering

from ticketguard.core.errors import InputError
from ticketguard.verification.timestamp import MAX_RESPONSE_BYTES, TrustedTime, check_token, request_token

DIGEST = hashlib.sha256(b"a ticketguard claim").digest()
TSA_SUBJECT = "CN=Test TSA,O=ticketguard tests"
def test_good_token_gives_the_tsa_time_and_authority(authority: Authority, serve) -> None:
    before = datetime.now(UTC).replace(microsecond=0)
    token = request_token(DIGEST, serve(tsa_answering(authority)), timeout_s=20)
    after = datetime.now(UTC)
    for trusted in (authority.ca_pem, authority.tsa_pem + authority.ca_pem):
        stamped = check_token(token, DIGEST, trusted)
        assert isinstance(stamped, TrustedTime)
        assert before <= stamped.time <= after and stamped.time.tzinfo is not None
        assert stamped.authority == TSA_SUBJECT
        assert stamped.to_json() == {"time": stamped.time.isoformat(), "authority": TSA_SUBJECT}


def test_token_for_another_digest_is_refused(authority: Authority, serve) -> None:
    token = request_token(DIGEST, serve(tsa_answering(authority)), timeout_s=20)
    with pytest.raises(InputError):
        check_token(token, hashlib.sha256(b"another claim").digest(), authority.ca_pem)


def test_token_checked_against_an_unrelated_ca_or_tsa_is_refused(
    authority: Authority, serve, tmp_path: Path
) -> None:
    token = request_token(DIGEST, serve(tsa_answering(authority)), timeout_s=20)
    stranger = make_authority(tmp_path / "stranger", ca_name="Test Root CA")
    for trusted in (stranger.ca_pem, stranger.tsa_pem + stranger.ca_pem, stranger.tsa_pem + authority.ca_pem):
        with pytest.raises(InputError):
            check_token(token, DIGEST, trusted)


def test_trusted_tsa_certificate_without_its_issuer_gets_advice(authority: Authority, serve) -> None:
    token = request_token(DIGEST, serve(tsa_answering(authority)), timeout_s=20)
    with pytest.raises(InputError, match="append the issuer"):
        check_token(token, DIGEST, authority.tsa_pem)


def test_truncated_or_garbage_token_is_an_input_error(authority: Authority, serve) -> None:
    token = request_token(DIGEST, serve(tsa_answering(authority)), timeout_s=20)
    damaged = bytearray(token)
    damaged[len(damaged) // 2] ^= 0x01
    bad_tokens = (token[:-1], token[: len(token) // 2], token + b"0", bytes(damaged), b"", bytes(range(99)))
    for bad in bad_tokens:
        with pytest.raises(InputError):
            check_token(bad, DIGEST, authority.ca_pem)
    with pytest.raises(InputError):
        check_token(token, DIGEST, b"not a certificate")
    with pytest.raises(InputError):
        check_token(token, DIGEST[:31], authority.ca_pem)


def test_tsa_that_stamps_another_digest_is_refused(authority: Authority, serve) -> None:
    other = hashlib.sha256(b"another claim").digest()
    # A TSA that ignores the query: it answers every request with a reply made for another digest and nonce.
    query = _query_for(authority, other)
    stale = reply(authority, query)
    url = serve(lambda handler, _: answer(handler, 200, REPLY_TYPE, stale))
    with pytest.raises(InputError, match="another digest"):
        request_token(DIGEST, url, timeout_s=20)


def _query_for(authority: Authority, digest: bytes) -> bytes:
    query_file = authority.folder / "other.tsq"
    subprocess.run(
        ["openssl", "ts", "-query", "-digest", digest.hex(), "-sha256", "-cert", "-out", str(query_file)],
        check=True, capture_output=True, timeout=30,
    )
    return query_file.read_bytes()


@pytest.mark.parametrize(
    ("behaviour", "message"),
    [
        (lambda handler, _: answer(handler, 500, "text/plain", b"boom"), "HTTP 500"),
        (lambda handler, _: answer(handler, 200, "text/html", b"<html></html>"), "content type"),
        (lambda handler, _: answer(handler, 200, REPLY_TYPE, bytes(MAX_RESPONSE_BYTES + 1)), "more than"),
        (lambda handler, _: answer(handler, 200, REPLY_TYPE, b"\x30\x03\x02\x01"), "not an RFC"),
    ],
    ids=["http-500", "wrong-content-type", "oversized", "garbage"],
)
def test_bad_tsa_answers_are_input_errors(serve, behaviour: Behaviour, message: str) -> None:
    with pytest.raises(InputError, match=message):
        request_token(DIGEST, serve(behaviour), timeout_s=10)


def test_silent_tsa_hits_the_deadline(serve) -> None:
    def silent(handler: http.server.BaseHTTPRequestHandler, _: bytes) -> None:
        handler.server.released.wait(30)

    url = serve(silent)
    started = datetime.now(UTC)
    with pytest.raises(InputError, match="did not answer"):
        request_token(DIGEST, url, timeout_s=0.5)
    assert datetime.now(UTC) - started < timedelta(seconds=5)


def test_unreachable_tsa_is_an_input_error() -> None:
    with pytest.raises(InputError):
        request_token(DIGEST, "http://127.0.0.1:9/tsa", timeout_s=5)
