"""Throwaway X.509 certificates for the tests, made with `cryptography`: a CA, and server and client
certificates it signs (or that sign themselves), written as PEM files where TLS servers need them."""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

ONE_DAY = datetime.timedelta(days=1)


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Tests"), x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    )


@dataclass(frozen=True)
class Issued:
    """A certificate and its private key."""

    certificate: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def cert_pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    @property
    def key_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    def write(self, directory: Path, name: str) -> tuple[Path, Path]:
        """`<name>.crt` and `<name>.key` in `directory`: the certificate's and the key's files."""
        cert, key = directory / f"{name}.crt", directory / f"{name}.key"
        cert.write_bytes(self.cert_pem)
        key.write_bytes(self.key_pem)
        key.chmod(0o600)
        return cert, key


def _build(
    subject: x509.Name,
    issuer: Issued | None,
    *,
    ca: bool,
    sans: list[x509.GeneralName],
    usage: list[x509.ObjectIdentifier],
    not_before: datetime.datetime,
    not_after: datetime.datetime,
) -> Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    signer = issuer.key if issuer else key
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.certificate.subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if issuer is not None:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()), critical=False
        )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
    else:
        builder = builder.add_extension(
            x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True
        )
        builder = builder.add_extension(x509.ExtendedKeyUsage(usage), critical=False)
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return Issued(builder.sign(signer, hashes.SHA256()), key)


def now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def make_ca(common_name: str = "Test CA") -> Issued:
    return _build(
        _name(common_name), None, ca=True, sans=[], usage=[], not_before=now() - ONE_DAY, not_after=now() + 30 * ONE_DAY
    )


def server_certificate(ca: Issued, host: str = "127.0.0.1") -> Issued:
    return _build(
        _name(host),
        ca,
        ca=False,
        sans=[x509.IPAddress(ipaddress.ip_address(host)), x509.DNSName("localhost")],
        usage=[ExtendedKeyUsageOID.SERVER_AUTH],
        not_before=now() - ONE_DAY,
        not_after=now() + 30 * ONE_DAY,
    )


def client_certificate(
    ca: Issued | None,
    *,
    spiffe_id: str | None = None,
    common_name: str = "workload",
    expired: bool = False,
) -> Issued:
    """A client certificate signed by `ca`, or self-signed when `ca` is None; with `spiffe_id` as
    its URI SAN when given; already expired when `expired`."""
    not_after = now() - ONE_DAY if expired else now() + 30 * ONE_DAY
    return _build(
        _name(common_name),
        ca,
        ca=False,
        sans=[x509.UniformResourceIdentifier(spiffe_id)] if spiffe_id else [],
        usage=[ExtendedKeyUsageOID.CLIENT_AUTH],
        not_before=now() - 2 * ONE_DAY,
        not_after=not_after,
    )
