"""mTLS workload identity (the `mtls` option): a request without a client certificate is refused,
even with a valid token, and so is one carrying a forged client-certificate header (nginx's
`X-Client-Cert`, Envoy's `X-Forwarded-Client-Cert`) naming an identity: the scanner is no trusted
proxy. Refused means answered 401 (a 403 or 404 would mean the forgery authenticated and only
authorization stopped it), or the TLS handshake refused for want of a certificate.

The scan presents no client certificate, so against a service that terminates TLS itself every
case ends at the handshake; against one behind a proxy, scan the service's own address (the proxy
would replace the forged header with the certificate it verified).
"""

from __future__ import annotations

import argparse
import datetime
import ssl
from urllib.parse import quote

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from ...scan import paths
from ...scan.probe import Scan
from ...scan.report import CheckResult, verdict

NAME = "mtls"
DEFAULT_IDENTITY = "spiffe://scan.invalid/forged"
HANDSHAKE_REFUSED = "refused at the TLS handshake"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--mtls-identity",
        default=DEFAULT_IDENTITY,
        help="the workload identity the forged certificate headers name; give one in MTLS_IDENTITIES "
        "so that accepting the forgery would let the scanner in",
    )


def forged_certificate(identity: str) -> str:
    """A self-signed certificate naming `identity` (as its SPIFFE ID, or its common name), as PEM."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "scan-forged")])
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
    )
    if identity.startswith("spiffe://"):
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity)]), critical=False
        )
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode()


def _handshake_refused(exc: httpx.TransportError) -> bool:
    """The server ended the TLS handshake (a required certificate missing), as opposed to the
    scanner refusing the server's certificate or the instance being unreachable."""
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, ssl.SSLCertVerificationError):
            return False
        if isinstance(cause, ssl.SSLError | ConnectionResetError | BrokenPipeError):
            return True
        cause = cause.__cause__ or cause.__context__
    return isinstance(exc, httpx.RemoteProtocolError | httpx.ReadError)


def check(scan: Scan) -> CheckResult:
    identity: str = getattr(scan.arguments, "mtls_identity", DEFAULT_IDENTITY)
    pem = forged_certificate(identity)
    escaped = quote(pem, safe="")
    cases: dict[str, int | str] = {}
    problems: list[str] = []
    attempts = {
        "no client certificate, valid token": {},
        "forged X-Client-Cert": {"X-Client-Cert": escaped},
        "forged X-Forwarded-Client-Cert (Cert)": {
            "X-Forwarded-Client-Cert": f'Hash=00;Cert="{escaped}";URI={identity}',
        },
        "forged X-Forwarded-Client-Cert (URI)": {"X-Forwarded-Client-Cert": f"URI={identity}"},
    }
    for name, headers in attempts.items():
        try:
            response = scan.probe.request("GET", paths.protected_path(), token=scan.token, headers=headers)
        except httpx.TransportError as exc:
            if scan.probe.https and _handshake_refused(exc):
                cases[name] = HANDSHAKE_REFUSED
                continue
            cases[name] = type(exc).__name__
            problems.append(f"{name}: could not talk to the instance ({type(exc).__name__})")
            continue
        cases[name] = response.status_code
        if response.status_code != 401:
            problems.append(f"{name}: answered {response.status_code}, not 401")
    success = "requests without a verified client certificate, or with a forged one, are refused"
    return verdict(NAME, problems, success, cases=cases)
