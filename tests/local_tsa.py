"""A local RFC 3161 time-stamping authority for tests and for trying `ticketguard timestamp` out: a CA and a TSA
certificate made with cryptography, replies signed by ``openssl ts -reply``, served over HTTP on 127.0.0.1.

    python tests/local_tsa.py runs/tsa --port 8318     # then --tsa http://127.0.0.1:8318/tsa, --tsa-cert runs/tsa/chain.pem

Never a TSA to trust for real claims: its keys lie unencrypted in the folder.
"""

from __future__ import annotations

import argparse
import http.server
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

REPLY_TYPE = "application/timestamp-reply"

# what a test server does with one POST: the handler and the request body
Behaviour = Callable[[http.server.BaseHTTPRequestHandler, bytes], None]

OPENSSL_TSA_CONFIG = """\
[ tsa ]
default_tsa = test_tsa
[ test_tsa ]
serial = {folder}/serial
crypto_device = builtin
signer_cert = {folder}/tsa.pem
signer_key = {folder}/tsa.key
signer_digest = sha256
default_policy = 1.2.3.4.1
digests = sha256, sha512
accuracy = secs:1
ordering = no
tsa_name = yes
ess_cert_id_chain = no
ess_cert_id_alg = sha256
"""


@dataclass(frozen=True)
class Authority:
    """A root CA and the TSA certificate it issued, as PEM files in ``folder``."""

    folder: Path
    ca_pem: bytes
    tsa_pem: bytes


def _name(common_name: str) -> x509.Name:
    return x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "ticketguard tests"),
        x509.NameAttribute(NameOID.COMMON_NAME, common_name),
    ])


def _certificate(
    subject: str, key: ec.EllipticCurvePrivateKey, issuer: str, issuer_key: ec.EllipticCurvePrivateKey,
    tsa: bool,
) -> x509.Certificate:
    now = datetime.now(UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=not tsa, path_length=None), critical=True)
    )
    if tsa:
        # RFC 3161 section 2.3: the TSA certificate's only, critical, extended key usage is timeStamping.
        time_stamping = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.TIME_STAMPING])
        builder = builder.add_extension(time_stamping, critical=True)
    return builder.sign(issuer_key, hashes.SHA256())


def make_authority(folder: Path, ca_name: str = "Test Root CA") -> Authority:
    folder.mkdir(parents=True, exist_ok=True)
    ca_key, tsa_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = _certificate(ca_name, ca_key, ca_name, ca_key, tsa=False)
    tsa = _certificate("Test TSA", tsa_key, ca_name, ca_key, tsa=True)
    pem = serialization.Encoding.PEM
    (folder / "tsa.key").write_bytes(
        tsa_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    (folder / "tsa.pem").write_bytes(tsa.public_bytes(pem))
    (folder / "serial").write_text("01\n")
    (folder / "tsa.cnf").write_text(OPENSSL_TSA_CONFIG.format(folder=folder))
    return Authority(folder, ca.public_bytes(pem), tsa.public_bytes(pem))


def reply(authority: Authority, query: bytes) -> bytes:
    """What the TSA answers to a TimeStampReq: a TimeStampResp signed by ``openssl ts -reply``."""
    query_file = authority.folder / "query.tsq"
    query_file.write_bytes(query)
    return subprocess.run(
        ["openssl", "ts", "-reply", "-config", str(authority.folder / "tsa.cnf"), 
         "-queryfile", str(query_file)],
        check=True, capture_output=True, timeout=30,
    ).stdout


def answer(handler: http.server.BaseHTTPRequestHandler, status: int, content_type: str, body: bytes) -> None:
    handler.send_response(status)
    handler.send_header("Content-Type", content_type)
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


def tsa_answering(authority: Authority) -> Behaviour:
    """A TSA's behaviour: every TimeStampReq gets a signed reply."""
    return lambda handler, query: answer(handler, 200, REPLY_TYPE, reply(authority, query))


def serve_forever(authority: Authority, port: int) -> None:
    """Answer every POST of a TimeStampReq with a signed reply until interrupted."""
    behaviour = tsa_answering(authority)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            behaviour(self, self.rfile.read(min(int(self.headers["Content-Length"]), 65536)))

    with http.server.HTTPServer(("127.0.0.1", port), Handler) as server:
        print(f"TSA at http://127.0.0.1:{port}/tsa; trust {authority.folder / 'chain.pem'}", flush=True)
        server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="where the CA, the TSA's key and chain.pem are written")
    parser.add_argument("--port", type=int, default=8318)
    args = parser.parse_args()
    authority = make_authority(args.folder)
    (args.folder / "chain.pem").write_bytes(authority.tsa_pem + authority.ca_pem)
    serve_forever(authority, args.port)


if __name__ == "__main__":
    main()
