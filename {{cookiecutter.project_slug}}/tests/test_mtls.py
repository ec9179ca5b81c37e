"""The `mtls` option over real TLS: a throwaway CA, server and client certificates (`cryptography`),
the service started with `serve` in its own process.

Shape 1, the service terminates TLS: expired, wrong-CA and self-signed client certificates (and
none at all) never complete the handshake; an unlisted identity is refused with 401; a listed one
reaches a real route with its own scopes; in `mtls+jwt` a token is needed too.
Shape 2, a proxy terminates TLS and forwards the certificate: believed only from the one proxy
address (MTLS_PROXY_ADDRESSES), never from the rest of a TRUSTED_PROXIES range, or from a proxy that
authenticates itself with its own certificate over the service's TLS (MTLS_PROXY_IDENTITIES), where
no header from anyone else replaces the handshake's identity; nginx's and Envoy's headers; real
nginx with ssl_verify_client, both as a sidecar and connecting to the service over mTLS. Served
TLS offers TLS 1.2+ with AEAD suites only.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from {{ cookiecutter.package_name }}.app import create_app
from {{ cookiecutter.package_name }}.config import Settings
from {{ cookiecutter.package_name }}.options.mtls import scan as mtls_scan
from {{ cookiecutter.package_name }}.scan.probe import Probe, Scan
from {{ cookiecutter.package_name }}.scan.report import Status

from .certificates import Issued, client_certificate, make_ca, server_certificate
from .conftest import AUDIENCE, ISSUER, PSEUDONYM_KEY, TokenFactory, bearer, pseudonym, running
from .servers import LOOPBACK, free_port, log_tail, stop_process

PACKAGE = "{{ cookiecutter.package_name }}"
LISTED = "spiffe://example.org/ns/billing/sa/invoicer"
READER = "spiffe://example.org/ns/reports/sa/reader"
UNLISTED = "spiffe://example.org/ns/billing/sa/stranger"
REPORTING_DN = "CN=reporting,O=Tests"
PROXY = "spiffe://example.org/ns/ingress-nginx/sa/ingress-nginx"  # a proxy's own identity
IDENTITIES = {LISTED: ["orgs:read", "orgs:write"], READER: ["orgs:read"], REPORTING_DN: ["orgs:read", "orgs:write"]}
UNTRUSTED_PEER = "127.0.0.2"
ORGS = "/api/v1/orgs"


@dataclass
class Pki:
    directory: Path
    ca: Issued
    ca_file: Path
    server_files: tuple[Path, Path]
    clients: dict[str, Issued] = field(default_factory=dict)

    def files(self, name: str) -> tuple[Path, Path]:
        return self.clients[name].write(self.directory, name)

    def context(self, name: str | None) -> ssl.SSLContext:
        """A client's TLS context: trusts the test CA, presents the named certificate (or none)."""
        context = ssl.create_default_context(cafile=self.ca_file)
        if name is not None:
            context.load_cert_chain(*self.files(name))
        return context


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    ca, other_ca = make_ca("Workload CA"), make_ca("Some other CA")
    ca_file = directory / "ca.crt"
    ca_file.write_bytes(ca.cert_pem)
    pki = Pki(directory, ca, ca_file, server_certificate(ca).write(directory, "server"))
    pki.clients = {
        "listed": client_certificate(ca, spiffe_id=LISTED),
        "reader": client_certificate(ca, spiffe_id=READER),
        "reporting": client_certificate(ca, common_name="reporting"),  # no SPIFFE ID: the subject DN
        "unlisted": client_certificate(ca, spiffe_id=UNLISTED),
        "expired": client_certificate(ca, spiffe_id=LISTED, expired=True),
        "wrong-ca": client_certificate(other_ca, spiffe_id=LISTED),
        "self-signed": client_certificate(None, spiffe_id=LISTED),
        "proxy": client_certificate(ca, spiffe_id=PROXY),
    }
    return pki


@dataclass
class Served:
    """`<service> serve` in its own process."""

    process: subprocess.Popen[bytes]
    port: int
    log_path: Path
    scheme: str

    @property
    def url(self) -> str:
        return f"{self.scheme}://{LOOPBACK}:{self.port}"

    def log_records(self) -> list[dict[str, Any]]:
        records = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                records.append(json.loads(line))
        return records

    def events(self, name: str) -> list[dict[str, Any]]:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            found = [record for record in self.log_records() if record.get("event") == name]
            if found:
                return found
            time.sleep(0.05)
        return []


@contextlib.contextmanager
def serving(directory: Path, env: dict[str, str]) -> Iterator[Served]:
    port = free_port()
    log_path = directory / f"serve-{port}.log"
    keep = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "PYTHONPATH", "VIRTUAL_ENV")}
    command = [sys.executable, "-m", f"{PACKAGE}.cli", "serve", "--host", LOOPBACK, "--port", str(port)]
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command, env={**keep, **env}, cwd=directory, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.monotonic() + 30
        while True:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("serve did not start:\n" + log_tail(log_path, 40))
            with contextlib.suppress(OSError), socket.create_connection((LOOPBACK, port), timeout=0.2):
                break
            time.sleep(0.05)
        yield Served(process, port, log_path, "https" if "MTLS_SERVER_CERT" in env else "http")
    finally:
        stop_process(process, timeout=15)


@pytest.fixture(scope="module")
def base_env(migrated_database: str, redis_url: str, public_pem: str) -> dict[str, str]:
    return {
        "ENVIRONMENT": "test",
        "DATABASE_URL": migrated_database,
        # A database of its own: this module's refusals do not lock out other modules' clients.
        "REDIS_URL": redis_url.rsplit("/", 1)[0] + "/5",
        "JWT_PUBLIC_KEY": public_pem,
        "JWT_ISSUER": ISSUER,
        "JWT_AUDIENCE": AUDIENCE,
        "AUDIT_PSEUDONYM_KEY": PSEUDONYM_KEY,
        "RATE_LIMIT_IP": "10000/minute",
        "LOCKOUT_FAILURES": "10000",
        "MTLS_IDENTITIES": json.dumps(IDENTITIES),
    }


def tls_env(pki: Pki, **more: str) -> dict[str, str]:
    cert, key = pki.server_files
    return {"MTLS_SERVER_CERT": str(cert), "MTLS_SERVER_KEY": str(key), "MTLS_CLIENT_CA": str(pki.ca_file), **more}


@pytest.fixture(scope="module")
def tls_service(pki: Pki, base_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """Shape 1, mode mtls: the service terminates TLS and requires a client certificate."""
    with serving(tmp_path_factory.mktemp("tls"), {**base_env, **tls_env(pki)}) as served:
        yield served


@pytest.fixture(scope="module")
def tls_jwt_service(pki: Pki, base_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """Shape 1, mode mtls+jwt."""
    env = {**base_env, **tls_env(pki, MTLS_MODE="mtls+jwt")}
    with serving(tmp_path_factory.mktemp("tls-jwt"), env) as served:
        yield served


def tls_client(served: Served, pki: Pki, certificate: str | None, peer: str = LOOPBACK) -> httpx.Client:
    """A TLS client presenting the named certificate (or none), from the `peer` address."""
    transport = httpx.HTTPTransport(local_address=peer, verify=pki.context(certificate))
    return httpx.Client(transport=transport, base_url=served.url, timeout=10)


# --- shape 1: the service terminates TLS ----------------------------------------------------


def create_org(http: httpx.Client, headers: dict[str, str] | None = None) -> httpx.Response:
    return http.post(ORGS, json={"name": "Acme"}, headers=headers)


def test_a_listed_workload_reaches_a_real_route_with_its_own_scopes(tls_service: Served, pki: Pki) -> None:
    with tls_client(tls_service, pki, "listed") as http:
        created = create_org(http)
        assert created.status_code == 201, created.text
        org = f"{ORGS}/{created.json()['id']}"
        # The creator became its owner: the workload is a subject like any token's.
        assert http.get(org).status_code == 200
    with tls_client(tls_service, pki, "reader") as http:
        assert create_org(http).status_code == 403  # orgs:write is not among its scopes
        assert http.get(org).status_code in (403, 404)  # authenticated, but not a member


def test_without_a_spiffe_id_the_subject_dn_is_the_identity(tls_service: Served, pki: Pki) -> None:
    with tls_client(tls_service, pki, "reporting") as http:
        created = create_org(http)
        assert created.status_code == 201, created.text
        assert http.get(f"{ORGS}/{created.json()['id']}").status_code == 200


def test_an_unlisted_identity_is_refused_with_401_and_an_audit_event(tls_service: Served, pki: Pki) -> None:
    with tls_client(tls_service, pki, "unlisted") as http:
        refused = create_org(http)
    assert refused.status_code == 401
    assert refused.headers["content-type"] == "application/problem+json"
    assert refused.headers["www-authenticate"].startswith("mTLS")
    events = tls_service.events("client_certificate_refused")
    assert [event["subject"] for event in events if event["reason"] == "identity_not_allowed"] == [
        pseudonym(UNLISTED)  # the identity, pseudonymised
    ]
    log = tls_service.log_path.read_text()
    assert UNLISTED not in log
    assert "BEGIN CERTIFICATE" not in log and "MII" not in log


@pytest.mark.parametrize("certificate", ["expired", "wrong-ca", "self-signed", None])
def test_a_bad_or_missing_client_certificate_never_completes_the_handshake(
    tls_service: Served, pki: Pki, certificate: str | None
) -> None:
    with tls_client(tls_service, pki, certificate) as http, pytest.raises(httpx.TransportError):
        create_org(http)
    # The same client with a good certificate gets through: the refusal was the certificate's.
    with tls_client(tls_service, pki, "listed") as http:
        assert create_org(http).status_code == 201


def test_mtls_plus_jwt_needs_both_an_allowed_certificate_and_a_token(
    tls_jwt_service: Served, pki: Pki, make_token: TokenFactory
) -> None:
    token = make_token(sub="alice")  # every scope
    with tls_client(tls_jwt_service, pki, "listed") as http:
        created = create_org(http, bearer(token))
        assert created.status_code == 201, created.text
        # The principal is the token's: alice owns the org, and reads it through the workload.
        assert http.get(f"{ORGS}/{created.json()['id']}", headers=bearer(token)).status_code == 200
        alone = create_org(http)
        assert alone.status_code == 401  # the certificate alone is not enough
        # What is missing is the caller's credential: its challenge, not the certificate's.
        assert alone.headers["www-authenticate"].endswith("Bearer") and "mTLS" not in alone.headers["www-authenticate"]
        refused = create_org(http, bearer(token + "x"))
        assert refused.status_code == 401
        # A refused token is the token's problem: the Bearer challenge, so the client refreshes it.
        assert refused.headers["www-authenticate"] == 'Bearer error="invalid_token"'
    with tls_client(tls_jwt_service, pki, "reader") as http:
        # The token's scopes, narrowed to the workload's: orgs:read only.
        assert create_org(http, bearer(token)).status_code == 403
    with tls_client(tls_jwt_service, pki, "unlisted") as http:
        assert create_org(http, bearer(token)).status_code == 401  # a token alone is not enough
    reasons = [event["reason"] for event in tls_jwt_service.events("client_certificate_refused")]
    assert "identity_not_allowed" in reasons
    failures = [(event["reason"], event.get("credential")) for event in tls_jwt_service.events("authentication_failed")]
    assert ("token_required", "mTLS") in failures


def test_the_scan_check_passes_when_the_handshake_refuses_the_scanner(
    tls_service: Served, pki: Pki, make_token: TokenFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SSL_CERT_FILE", str(pki.ca_file))  # the scanner trusts the server's CA
    result = run_scan(tls_service.url, make_token(), LISTED)
    assert result.status == Status.PASS, result
    assert set(result.details["cases"].values()) == {mtls_scan.HANDSHAKE_REFUSED}


# --- shape 2: a trusted proxy forwards the certificate -------------------------------------


@pytest.fixture(scope="module")
def behind_proxy(base_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """Plain HTTP; 127.0.0.1 is the proxy (a sidecar) that forwards X-Client-Cert."""
    env = {**base_env, "TRUSTED_PROXIES": LOOPBACK, "MTLS_PROXY_ADDRESSES": LOOPBACK}
    with serving(tmp_path_factory.mktemp("proxy"), env) as served:
        yield served


@pytest.fixture(scope="module")
def behind_envoy(base_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    env = {
        **base_env,
        "TRUSTED_PROXIES": LOOPBACK,
        "MTLS_PROXY_ADDRESSES": LOOPBACK,
        "MTLS_PROXY_HEADER": "X-Forwarded-Client-Cert",
    }
    with serving(tmp_path_factory.mktemp("envoy"), env) as served:
        yield served


def from_peer(served: Served, peer: str) -> httpx.Client:
    transport = httpx.HTTPTransport(local_address=peer)
    return httpx.Client(transport=transport, base_url=served.url, timeout=10)


def escaped(issued: Issued) -> str:
    """What nginx's $ssl_client_escaped_cert holds: the PEM, URL-encoded."""
    return quote(issued.cert_pem.decode(), safe="")


def test_a_certificate_forwarded_by_the_proxy_address_is_believed(behind_proxy: Served, pki: Pki) -> None:
    with from_peer(behind_proxy, LOOPBACK) as proxy:
        assert create_org(proxy, {"X-Client-Cert": escaped(pki.clients["listed"])}).status_code == 201
        assert create_org(proxy, {"X-Client-Cert": escaped(pki.clients["reader"])}).status_code == 403
        assert create_org(proxy, {"X-Client-Cert": escaped(pki.clients["unlisted"])}).status_code == 401
        assert create_org(proxy, {"X-Client-Cert": escaped(pki.clients["expired"])}).status_code == 401
        assert create_org(proxy, {"X-Client-Cert": "not a certificate"}).status_code == 401
        assert create_org(proxy).status_code == 401  # nothing forwarded: no certificate


def test_a_forwarded_certificate_from_an_untrusted_peer_is_refused(behind_proxy: Served, pki: Pki) -> None:
    forged = {"X-Client-Cert": escaped(pki.clients["listed"])}
    with from_peer(behind_proxy, UNTRUSTED_PEER) as client:
        refused = create_org(client, forged)
        also = create_org(client, {"X-Forwarded-Client-Cert": f"URI={LISTED}"})
    assert refused.status_code == 401 and also.status_code == 401
    assert refused.headers["content-type"] == "application/problem+json"
    reasons = [event["reason"] for event in behind_proxy.events("client_certificate_refused")]
    assert "forwarded_certificate_from_untrusted_peer" in reasons


def test_envoys_forwarded_client_cert_header(behind_envoy: Served, pki: Pki) -> None:
    listed, unlisted = escaped(pki.clients["listed"]), escaped(pki.clients["unlisted"])
    with from_peer(behind_envoy, LOOPBACK) as envoy:

        def status(value: str) -> int:
            return create_org(envoy, {"X-Forwarded-Client-Cert": value}).status_code

        assert status(f'By=spiffe://example.org/envoy;Hash=ab;Cert="{listed}";Subject="CN=x,O=y";URI={LISTED}') == 201
        assert status(f"Hash=ab;URI={LISTED}") == 201  # URI only: the SPIFFE ID Envoy verified
        assert status(f"Hash=ab;URI={READER}") == 403
        # Each hop appends its element: the last is the one the trusted proxy verified.
        assert status(f'Cert="{listed}",Cert="{unlisted}"') == 401
        assert status(f'Cert="{unlisted}",Cert="{listed}"') == 201
        assert status(f"URI={UNLISTED}") == 401
        assert status('Cert="unterminated') == 401
        # nginx's header is not the configured one: not read, so no certificate.
        assert create_org(envoy, {"X-Client-Cert": listed}).status_code == 401
    with from_peer(behind_envoy, UNTRUSTED_PEER) as client:
        assert create_org(client, {"X-Forwarded-Client-Cert": f"URI={LISTED}"}).status_code == 401


# --- production: whom a forwarded certificate is believed from -----------------------------------


@pytest.fixture(scope="module")
def production_env(base_env: dict[str, str]) -> dict[str, str]:
    from .test_settings import SAFE_PRODUCTION

    # API_KEY_PEPPER: what production requires of the api_keys option, where it is baked too.
    pepper = SAFE_PRODUCTION["API_KEY_PEPPER"]
    return {**base_env, "ENVIRONMENT": "production", "TRUSTED_HOSTS": f"{LOOPBACK},localhost", "API_KEY_PEPPER": pepper}


@pytest.fixture(scope="module")
def proxy_in_a_range(production_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """Production behind a sidecar at 127.0.0.1, with the whole of 127.0.0.0/8 in TRUSTED_PROXIES,
    as a pod network is in a cluster's: every other address there is a pod, not the proxy."""
    env = {**production_env, "TRUSTED_PROXIES": "127.0.0.0/8", "MTLS_PROXY_ADDRESSES": LOOPBACK}
    with serving(tmp_path_factory.mktemp("proxy-range"), env) as served:
        yield served


def test_a_peer_in_a_trusted_proxies_range_cannot_forward_a_certificate(proxy_in_a_range: Served, pki: Pki) -> None:
    # A copy of a listed workload's certificate (certificates are public), from another address of the range.
    copied = {"X-Client-Cert": escaped(pki.clients["listed"])}
    with from_peer(proxy_in_a_range, UNTRUSTED_PEER) as pod:
        refused = create_org(pod, copied)
        also = create_org(pod, {"X-Forwarded-Client-Cert": f"URI={LISTED}"})
    assert refused.status_code == 401 and also.status_code == 401
    assert refused.headers["content-type"] == "application/problem+json"
    assert refused.headers["www-authenticate"] == 'mTLS error="invalid_token"'
    reasons = [event["reason"] for event in proxy_in_a_range.events("client_certificate_refused")]
    assert "forwarded_certificate_from_untrusted_peer" in reasons
    with from_peer(proxy_in_a_range, LOOPBACK) as proxy:  # the one proxy address
        assert create_org(proxy, copied).status_code == 201


@pytest.fixture(scope="module")
def tls_with_a_proxy(
    pki: Pki, production_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Served]:
    """Production, serve terminates TLS; the proxy authenticates with its own certificate (PROXY);
    127.0.0.2 is in TRUSTED_PROXIES (its X-Forwarded-For is believed), 127.0.0.1 is not."""
    env = {**production_env, **tls_env(pki, TRUSTED_PROXIES=UNTRUSTED_PEER, MTLS_PROXY_IDENTITIES=json.dumps([PROXY]))}
    with serving(tmp_path_factory.mktemp("tls-proxy"), env) as served:
        yield served


def test_with_tls_served_a_header_never_replaces_the_handshake_identity(tls_with_a_proxy: Served, pki: Pki) -> None:
    forged = {"X-Client-Cert": escaped(pki.clients["listed"])}
    # A reader's connection claims to carry the listed workload's certificate; from a TRUSTED_PROXIES address too.
    for peer in (UNTRUSTED_PEER, LOOPBACK):
        with tls_client(tls_with_a_proxy, pki, "reader", peer) as http:
            refused = create_org(http, forged)
            assert refused.status_code == 401, (peer, refused.text)
            assert refused.headers["www-authenticate"] == 'mTLS error="invalid_token"'
            assert create_org(http).status_code == 403  # its own identity: orgs:read only
    reasons = [event["reason"] for event in tls_with_a_proxy.events("client_certificate_refused")]
    assert "forwarded_certificate_from_untrusted_peer" in reasons


def test_a_proxy_with_its_own_certificate_forwards_its_clients(tls_with_a_proxy: Served, pki: Pki) -> None:
    with tls_client(tls_with_a_proxy, pki, "proxy") as proxy:
        assert create_org(proxy, {"X-Client-Cert": escaped(pki.clients["listed"])}).status_code == 201
        assert create_org(proxy, {"X-Client-Cert": escaped(pki.clients["reader"])}).status_code == 403
        assert create_org(proxy, {"X-Client-Cert": escaped(pki.clients["unlisted"])}).status_code == 401
        # Forwarding nothing: the proxy's own certificate is never a caller.
        assert create_org(proxy).status_code == 401
        # Envoy's header is not the configured one: not read.
        assert create_org(proxy, {"X-Forwarded-Client-Cert": f"URI={LISTED}"}).status_code == 401


def test_through_nginx_over_mtls_to_the_service_the_clients_certificate_is_the_workload(
    tls_with_a_proxy: Served, pki: Pki
) -> None:
    """The Kubernetes ingress shape: nginx verifies the client, then connects to the service's own
    TLS with the proxy's certificate (the README's proxy_ssl_* lines)."""
    with nginx_verifying_clients(pki, tls_with_a_proxy.port, upstream_certificate="proxy") as url:

        def client(certificate: str) -> httpx.Client:
            return httpx.Client(base_url=url, verify=pki.context(certificate), timeout=10)

        with client("listed") as http:
            assert create_org(http).status_code == 201
        with client("reader") as http:
            assert create_org(http, {"X-Client-Cert": escaped(pki.clients["listed"])}).status_code == 403
        with client("unlisted") as http:
            assert create_org(http).status_code == 401


# --- served TLS: versions and suites ------------------------------------------------------------


def handshake(served: Served, pki: Pki, version: ssl.TLSVersion, ciphers: str | None = None) -> tuple[str, str]:
    """A TLS handshake with the service by a client limited to `version` (and to `ciphers`, an
    OpenSSL cipher list for TLS 1.2 and below): the negotiated version and suite."""
    context = pki.context("listed")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TLS 1.0 and 1.1, asked for on purpose
        context.minimum_version = context.maximum_version = version
    # Security level 0: this client offers whatever it is told to, old versions and weak suites too.
    context.set_ciphers(f"{ciphers or 'ALL'}:@SECLEVEL=0")
    with (
        socket.create_connection((LOOPBACK, served.port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname=LOOPBACK) as tls,
    ):
        cipher = tls.cipher()
        assert cipher is not None
        return str(tls.version()), cipher[0]


@pytest.mark.parametrize(
    "suite",
    [
        "ECDHE-ECDSA-AES128-SHA",  # CBC, SHA-1 MAC: what older uvicorn's default ("TLSv1") allowed
        "ECDHE-ECDSA-AES256-SHA",
        "ECDHE-ECDSA-AES128-SHA256",  # CBC, SHA-256 MAC: Python's own default list keeps it
        "ECDHE-ECDSA-AES256-SHA384",
    ],
)
def test_served_tls_refuses_a_cbc_suite(tls_service: Served, pki: Pki, suite: str) -> None:
    with pytest.raises(ssl.SSLError):
        handshake(tls_service, pki, ssl.TLSVersion.TLSv1_2, suite)


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1])
def test_served_tls_refuses_versions_before_1_2(tls_service: Served, pki: Pki, version: ssl.TLSVersion) -> None:
    with pytest.raises(ssl.SSLError):
        handshake(tls_service, pki, version)


def test_served_tls_offers_aead_suites_at_tls_1_2_and_tls_1_3(tls_service: Served, pki: Pki) -> None:
    assert handshake(tls_service, pki, ssl.TLSVersion.TLSv1_2) in {
        ("TLSv1.2", "ECDHE-ECDSA-AES256-GCM-SHA384"),
        ("TLSv1.2", "ECDHE-ECDSA-AES128-GCM-SHA256"),
        ("TLSv1.2", "ECDHE-ECDSA-CHACHA20-POLY1305"),
    }
    for suite in ("ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-ECDSA-CHACHA20-POLY1305"):
        assert handshake(tls_service, pki, ssl.TLSVersion.TLSv1_2, suite) == ("TLSv1.2", suite)
    version, _suite = handshake(tls_service, pki, ssl.TLSVersion.TLSv1_3)
    assert version == "TLSv1.3"


def run_scan(url: str, token: str, identity: str, source: str | None = None) -> Any:
    """The scan's mtls check, from the `source` address when given."""
    transport = httpx.HTTPTransport(local_address=source) if source else None
    probe = Probe(url, max_requests=20, max_seconds=30, transport=transport)
    try:
        arguments = mtls_scan_arguments(identity)
        return mtls_scan.check(Scan(probe=probe, token=token, arguments=arguments))
    finally:
        probe.close()


def mtls_scan_arguments(identity: str) -> Any:
    import argparse

    parser = argparse.ArgumentParser()
    mtls_scan.add_arguments(parser)
    return parser.parse_args(["--mtls-identity", identity])


def test_the_scan_check_passes_against_a_healthy_instance(behind_proxy: Served, make_token: TokenFactory) -> None:
    # Scanned from an address that is not the trusted proxy's, as a scanner is.
    result = run_scan(behind_proxy.url, make_token(), LISTED, source=UNTRUSTED_PEER)
    assert result.status == Status.PASS, result
    assert set(result.details["cases"].values()) == {401}


def test_the_scan_check_fails_when_a_forged_header_is_believed(behind_proxy: Served, make_token: TokenFactory) -> None:
    # Broken: the scanner's own address is the proxy's (MTLS_PROXY_ADDRESSES), so its forged header is believed.
    result = run_scan(behind_proxy.url, make_token(), LISTED)
    assert result.status == Status.FAIL
    # Authenticated as the forged identity: only authorization stopped it (the org does not exist).
    assert re.search("forged X-Client-Cert: answered 40[34], not 401", result.reason), result.reason


# --- shape 2 for real: nginx verifies the client certificate --------------------------------

NGINX_CONF = Path(__file__).resolve().parent.parent / "deploy" / "nginx" / "nginx.conf"
FORWARDED = "proxy_set_header X-Client-Cert $verified_client_cert;"
PLAIN_UPSTREAM = "proxy_pass http://service;"


def upstream_over_mtls(certificate: str, key: str) -> str:
    """The README's lines for nginx connecting to the service's own TLS with its own certificate."""
    return (
        "proxy_pass https://service;\n"
        f"proxy_ssl_certificate {certificate};\nproxy_ssl_certificate_key {key};\n"
        "proxy_ssl_trusted_certificate ca.crt;\nproxy_ssl_verify on;\nproxy_ssl_name localhost;\n"
        "proxy_ssl_protocols TLSv1.2 TLSv1.3;\n"
    )


@contextlib.contextmanager
def nginx_verifying_clients(
    pki: Pki, upstream_port: int, upstream_certificate: str | None = None, verify_client: str = "on"
) -> Iterator[str]:
    """The shipped nginx.conf in front of the service on `upstream_port`, with the README's TLS
    listener (`ssl_verify_client on`, or `verify_client`) in listen.conf; with
    `upstream_certificate`, connecting to the service over TLS with that certificate (the README's
    proxy_ssl_* lines). Yields nginx's https:// URL."""
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    if not os.access(nginx, os.X_OK):
        pytest.fail("nginx is not installed; install it with `apt-get install -y nginx` (Debian/Ubuntu)")
    shipped = NGINX_CONF.read_text()
    assert FORWARDED in shipped and PLAIN_UPSTREAM in shipped
    prefix = Path(tempfile.mkdtemp(prefix="nginx-mtls-"))
    prefix.chmod(0o755)
    conf = prefix / "conf"
    conf.mkdir(mode=0o755)
    for name in ("server.crt", "server.key", "ca.crt"):
        source = {"server.crt": pki.server_files[0], "server.key": pki.server_files[1], "ca.crt": pki.ca_file}[name]
        shutil.copy(source, conf / name)
        (conf / name).chmod(0o644)
    if upstream_certificate is not None:
        for path in pki.files(upstream_certificate):
            shutil.copy(path, conf / path.name)
            (conf / path.name).chmod(0o644)
        cert, key = (path.name for path in pki.files(upstream_certificate))
        shipped = shipped.replace(PLAIN_UPSTREAM, upstream_over_mtls(cert, key))
    (conf / "nginx.conf").write_text(shipped)
    port = free_port()
    (conf / "listen.conf").write_text(
        f"listen {LOOPBACK}:{port} ssl;\n"
        "ssl_certificate server.crt;\nssl_certificate_key server.key;\n"
        f"ssl_client_certificate ca.crt;\nssl_verify_client {verify_client};\n"
    )
    (conf / "upstream.conf").write_text(f"server {LOOPBACK}:{upstream_port};\n")
    log = prefix / "nginx.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [nginx, "-p", f"{prefix}/", "-c", str(conf / "nginx.conf"), "-g", "daemon off;"],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 20
        while True:
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail("nginx did not start:\n" + log_tail(log))
            with contextlib.suppress(OSError), socket.create_connection((LOOPBACK, port), timeout=0.2):
                break
            time.sleep(0.05)
        yield f"https://{LOOPBACK}:{port}"
    finally:
        stop_process(process)
        shutil.rmtree(prefix, ignore_errors=True)


@pytest.fixture(scope="module")
def nginx_mtls(pki: Pki, behind_proxy: Served) -> Iterator[str]:
    with nginx_verifying_clients(pki, behind_proxy.port) as url:
        yield url


def test_through_nginx_the_verified_certificate_is_the_workload(nginx_mtls: str, pki: Pki) -> None:
    def client(certificate: str | None) -> httpx.Client:
        return httpx.Client(base_url=nginx_mtls, verify=pki.context(certificate), timeout=10)

    with client("listed") as http:
        assert create_org(http).status_code == 201
    with client("reader") as http:
        # A header the client sends itself is replaced by the certificate nginx verified.
        assert create_org(http, {"X-Client-Cert": escaped(pki.clients["listed"])}).status_code == 403
    with client("unlisted") as http:
        assert create_org(http).status_code == 401
    for refused in ("expired", "wrong-ca", "self-signed", None):
        with client(refused) as http:
            # nginx answers 400 itself ("No required SSL certificate was sent" / "certificate error").
            assert create_org(http).status_code == 400, refused


def test_the_shipped_nginx_forwards_no_certificate_it_did_not_verify(behind_proxy: Served, pki: Pki) -> None:
    """nginx is the one proxy address: a header it passed through from a client would be believed."""
    from .servers import NginxProxy

    own = {"X-Client-Cert": escaped(pki.clients["listed"]), "X-Forwarded-Client-Cert": f"URI={LISTED}"}
    plain = NginxProxy(NGINX_CONF, [behind_proxy.port])  # the shipped files, a plain listener
    try:
        with httpx.Client(base_url=plain.url, timeout=10) as http:
            deadline = time.monotonic() + 20
            while True:
                try:
                    refused = create_org(http, own)
                    break
                except httpx.TransportError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
        assert refused.status_code == 401  # nothing forwarded: no certificate
    finally:
        plain.stop()
    # A TLS listener that asks for a certificate without requiring a verified one: the client's
    # self-signed certificate reaches nginx, unverified, and is not forwarded either.
    with (
        nginx_verifying_clients(pki, behind_proxy.port, verify_client="optional_no_ca") as url,
        httpx.Client(base_url=url, verify=pki.context("self-signed"), timeout=10) as http,
    ):
        assert create_org(http).status_code == 401
        assert create_org(http, own).status_code == 401


# --- in-process: the option's activation ------------------------------------------------------


async def test_with_identities_a_valid_token_without_a_certificate_is_refused(
    settings_for: Callable[..., Settings], make_token: TokenFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MTLS_IDENTITIES", json.dumps(IDENTITIES))
    async with running(create_app(settings_for())) as http:
        refused = await http.post(ORGS, json={"name": "Acme"}, headers=bearer(make_token()))
    assert refused.status_code == 401
    assert refused.headers["www-authenticate"] == 'mTLS error="invalid_token"'


async def test_without_identities_the_option_is_inactive_and_says_so(
    settings_for: Callable[..., Settings], make_token: TokenFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Development and tests only: production refuses to start without MTLS_IDENTITIES (below).
    monkeypatch.delenv("MTLS_IDENTITIES", raising=False)
    with caplog_of("{{ cookiecutter.package_name }}.options.mtls.extension") as records:
        app = create_app(settings_for())
    assert [getattr(record, "event", None) for record in records] == ["mtls_inactive"]
    async with running(app) as http:
        created = await http.post(ORGS, json={"name": "Acme"}, headers=bearer(make_token()))
    assert created.status_code == 201


@contextlib.contextmanager
def caplog_of(name: str) -> Iterator[list[logging.LogRecord]]:
    records: list[logging.LogRecord] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Collect(level=logging.DEBUG)
    target = logging.getLogger(name)
    target.addHandler(handler)
    try:
        yield records
    finally:
        target.removeHandler(handler)


async def test_with_a_proxy_client_ca_a_forwarded_certificate_must_be_issued_by_it(
    settings_for: Callable[..., Settings], pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Without MTLS_PROXY_CLIENT_CA the proxy's verification is believed: a self-signed certificate
    # naming a listed identity gets in, as a proxy that forwards what it did not verify would let it.
    monkeypatch.setenv("MTLS_IDENTITIES", json.dumps(IDENTITIES))
    monkeypatch.setenv("MTLS_PROXY_ADDRESSES", LOOPBACK)
    proxy = (LOOPBACK, 4711)
    forged = {"X-Client-Cert": escaped(pki.clients["self-signed"])}
    believed = create_app(settings_for(trusted_proxies=[LOOPBACK]))
    async with running(believed, proxy) as http:
        assert (await http.post(ORGS, json={"name": "Acme"}, headers=forged)).status_code == 201
    monkeypatch.setenv("MTLS_PROXY_CLIENT_CA", str(pki.ca_file))
    checked = create_app(settings_for(trusted_proxies=[LOOPBACK]))
    async with running(checked, proxy) as http:
        refused = await http.post(ORGS, json={"name": "Acme"}, headers=forged)
        assert refused.status_code == 401
        assert refused.headers["www-authenticate"] == 'mTLS error="invalid_token"'
        other_ca = {"X-Client-Cert": escaped(pki.clients["wrong-ca"])}
        assert (await http.post(ORGS, json={"name": "Acme"}, headers=other_ca)).status_code == 401
        issued = {"X-Client-Cert": escaped(pki.clients["listed"])}
        assert (await http.post(ORGS, json={"name": "Acme"}, headers=issued)).status_code == 201


def test_a_proxy_client_ca_that_is_not_a_ca_bundle_is_refused_by_name(pki: Pki, tmp_path: Path) -> None:
    from {{ cookiecutter.package_name }}.options.mtls.extension import load_mtls_settings

    not_a_ca = tmp_path / "leaf.crt"
    not_a_ca.write_bytes(pki.clients["listed"].cert_pem)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MTLS_PROXY_CLIENT_CA", str(not_a_ca))
        with pytest.raises(Exception, match="MTLS_PROXY_CLIENT_CA"):
            load_mtls_settings()


# --- settings ---------------------------------------------------------------------------------


def serve_refusal(env: dict[str, str]) -> str:
    """The one line `serve` prints when it refuses to start with `env`."""
    keep = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "PYTHONPATH", "VIRTUAL_ENV")}
    result = subprocess.run(
        [sys.executable, "-m", f"{PACKAGE}.cli", "serve", "--port", str(free_port())],
        env={**keep, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd="/",
    )
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "refusing to start" in lines[0], result.stderr
    return lines[0]


NO_TLS = {"MTLS_SERVER_CERT": "", "MTLS_SERVER_KEY": "", "MTLS_CLIENT_CA": ""}
PROXIES = json.dumps([PROXY])


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"MTLS_IDENTITIES": ""}, "MTLS_IDENTITIES: required in production"),
        ({"MTLS_IDENTITIES": "{not json"}, "MTLS_IDENTITIES"),
        ({"MTLS_IDENTITIES": '{"spiffe://a/b": ["orgs read"]}'}, "MTLS_IDENTITIES"),
        ({"MTLS_MODE": "jwt"}, "MTLS_MODE"),
        ({"MTLS_SERVER_KEY": ""}, "MTLS_SERVER_CERT, MTLS_SERVER_KEY and MTLS_CLIENT_CA"),
        ({"MTLS_CLIENT_CA": "/nonexistent/ca.crt"}, "MTLS_CLIENT_CA: no such file"),
        (NO_TLS, "MTLS_SERVER_CERT or MTLS_PROXY_ADDRESSES: required in production"),
        # The configuration the shipped Kubernetes files had: a pod-network range believed for certificates.
        ({**NO_TLS, "TRUSTED_PROXIES": "10.0.0.0/8"}, "MTLS_SERVER_CERT or MTLS_PROXY_ADDRESSES: required"),
        ({**NO_TLS, "MTLS_PROXY_ADDRESSES": "10.0.0.0/8"}, "MTLS_PROXY_ADDRESSES: 10.0.0.0/8 is a range"),
        ({**NO_TLS, "MTLS_PROXY_ADDRESSES": "127.0.0.1,fd00::/64"}, "MTLS_PROXY_ADDRESSES: fd00::/64 is a range"),
        ({**NO_TLS, "MTLS_PROXY_ADDRESSES": "sidecar"}, "MTLS_PROXY_ADDRESSES: 'sidecar' is not an IP address"),
        ({"MTLS_PROXY_ADDRESSES": "127.0.0.1"}, "MTLS_PROXY_ADDRESSES: not with MTLS_SERVER_CERT"),
        ({**NO_TLS, "MTLS_PROXY_ADDRESSES": LOOPBACK, "MTLS_PROXY_IDENTITIES": PROXIES}, "MTLS_PROXY_IDENTITIES: only"),
        ({"MTLS_PROXY_IDENTITIES": json.dumps([LISTED])}, f"MTLS_PROXY_IDENTITIES: {LISTED} is also in"),
        ({"MTLS_PROXY_IDENTITIES": "spiffe://a/proxy"}, "MTLS_PROXY_IDENTITIES: not JSON"),
    ],
)
def test_production_refuses_unsafe_mtls_settings_and_names_them(
    pki: Pki, public_pem: str, change: dict[str, str], named: str
) -> None:
    from .test_settings import SAFE_PRODUCTION

    production = {
        **SAFE_PRODUCTION,
        "TRUSTED_PROXIES": "",
        "MTLS_PROXY_ADDRESSES": "",
        "JWT_PUBLIC_KEY": public_pem.replace("\n", "\\n"),
        "MTLS_IDENTITIES": json.dumps(IDENTITIES),
        **tls_env(pki),
    }
    env = {name: value for name, value in {**production, **change}.items() if value}
    assert named in serve_refusal(env)


def test_check_config_refuses_production_without_identities(pki: Pki, public_pem: str) -> None:
    from .test_settings import SAFE_PRODUCTION

    keep = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "PYTHONPATH", "VIRTUAL_ENV")}
    env = {**keep, **SAFE_PRODUCTION, "JWT_PUBLIC_KEY": public_pem.replace("\n", "\\n"), **tls_env(pki)}
    del env["MTLS_PROXY_ADDRESSES"]  # serve terminates TLS: no proxy address
    command = [sys.executable, "-m", f"{PACKAGE}.cli", "check-config"]
    ok = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60, check=False, cwd="/")
    assert ok.returncode == 0, ok.stderr
    del env["MTLS_IDENTITIES"]
    refused = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60, check=False, cwd="/")
    assert refused.returncode == 1
    assert "refusing to start" in refused.stderr and "MTLS_IDENTITIES" in refused.stderr


# --- certificate-bound tokens (RFC 8705, security/binding.py) --------------------------------


def x5t_s256(issued: Issued) -> str:
    """The certificate's `x5t#S256`: base64url SHA-256 of its DER, computed here, not by the service."""
    der = ssl.PEM_cert_to_DER_cert(issued.cert_pem.decode())
    return base64.urlsafe_b64encode(hashlib.sha256(der).digest()).rstrip(b"=").decode()


def test_a_certificate_bound_token_is_served_only_with_its_certificate_over_the_handshake(
    tls_jwt_service: Served, pki: Pki, make_token: TokenFactory
) -> None:
    token = make_token(sub="carol", cnf={"x5t#S256": x5t_s256(pki.clients["listed"])})
    with tls_client(tls_jwt_service, pki, "listed") as http:
        assert create_org(http, bearer(token)).status_code == 201
    with tls_client(tls_jwt_service, pki, "reporting") as http:  # an allowed workload, another certificate
        refused = create_org(http, bearer(token))
        assert refused.status_code == 401
        assert create_org(http, bearer(make_token(sub="carol"))).status_code == 201  # the plain token is served
    reasons = [event["reason"] for event in tls_jwt_service.events("authentication_failed")]
    assert "certificate_thumbprint_mismatch" in reasons


def test_a_certificate_bound_token_is_served_only_with_the_certificate_the_proxy_forwards(
    behind_proxy: Served, pki: Pki, make_token: TokenFactory
) -> None:
    token = make_token(sub="dave", cnf={"x5t#S256": x5t_s256(pki.clients["listed"])})
    with from_peer(behind_proxy, LOOPBACK) as proxy:
        assert create_org(proxy, {"X-Client-Cert": escaped(pki.clients["listed"]), **bearer(token)}).status_code == 201
        other = {"X-Client-Cert": escaped(pki.clients["reporting"]), **bearer(token)}
        assert create_org(proxy, other).status_code == 401
    with from_peer(behind_proxy, UNTRUSTED_PEER) as client:  # the same header from anyone else
        forged = {"X-Client-Cert": escaped(pki.clients["listed"]), **bearer(token)}
        assert create_org(client, forged).status_code == 401
