"""The `mtls` option over real TLS: a throwaway CA, server and client certificates (`cryptography`),
the service started with `serve` in its own process.

Shape 1, the service terminates TLS: expired, wrong-CA and self-signed client certificates (and
none at all) never complete the handshake; an unlisted identity is refused with 401; a listed one
reaches a real route with its own scopes; in `mtls+jwt` a token is needed too.
Shape 2, a trusted proxy terminates TLS and forwards the certificate: believed from TRUSTED_PROXIES
only, refused from anyone else; nginx's and Envoy's headers; and real nginx with ssl_verify_client.
"""

from __future__ import annotations

import contextlib
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


def tls_client(served: Served, pki: Pki, certificate: str | None) -> httpx.Client:
    return httpx.Client(base_url=served.url, verify=pki.context(certificate), timeout=10)


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
    """Plain HTTP; 127.0.0.1 is the trusted proxy that forwards X-Client-Cert."""
    with serving(tmp_path_factory.mktemp("proxy"), {**base_env, "TRUSTED_PROXIES": LOOPBACK}) as served:
        yield served


@pytest.fixture(scope="module")
def behind_envoy(base_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    env = {**base_env, "TRUSTED_PROXIES": LOOPBACK, "MTLS_PROXY_HEADER": "X-Forwarded-Client-Cert"}
    with serving(tmp_path_factory.mktemp("envoy"), env) as served:
        yield served


def from_peer(served: Served, peer: str) -> httpx.Client:
    transport = httpx.HTTPTransport(local_address=peer)
    return httpx.Client(transport=transport, base_url=served.url, timeout=10)


def escaped(issued: Issued) -> str:
    """What nginx's $ssl_client_escaped_cert holds: the PEM, URL-encoded."""
    return quote(issued.cert_pem.decode(), safe="")


def test_a_certificate_forwarded_by_a_trusted_proxy_is_believed(behind_proxy: Served, pki: Pki) -> None:
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
    # Broken: the scanner's own address is in TRUSTED_PROXIES, so its forged header is believed.
    result = run_scan(behind_proxy.url, make_token(), LISTED)
    assert result.status == Status.FAIL
    # Authenticated as the forged identity: only authorization stopped it (the org does not exist).
    assert re.search("forged X-Client-Cert: answered 40[34], not 401", result.reason), result.reason


# --- shape 2 for real: nginx verifies the client certificate --------------------------------

NGINX_CONF = Path(__file__).resolve().parent.parent / "deploy" / "nginx" / "nginx.conf"
DROPPED = 'proxy_set_header X-Client-Cert "";'
FORWARDED = "proxy_set_header X-Client-Cert $ssl_client_escaped_cert;"


@contextlib.contextmanager
def nginx_verifying_clients(pki: Pki, upstream_port: int) -> Iterator[str]:
    """The shipped nginx.conf with the README's two changes, in front of the service on
    `upstream_port`: a TLS listener with `ssl_verify_client on`, and X-Client-Cert set to the
    verified certificate instead of dropped. Yields nginx's https:// URL."""
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    if not os.access(nginx, os.X_OK):
        pytest.fail("nginx is not installed; install it with `apt-get install -y nginx` (Debian/Ubuntu)")
    shipped = NGINX_CONF.read_text()
    assert DROPPED in shipped
    prefix = Path(tempfile.mkdtemp(prefix="nginx-mtls-"))
    prefix.chmod(0o755)
    conf = prefix / "conf"
    conf.mkdir(mode=0o755)
    for name in ("server.crt", "server.key", "ca.crt"):
        source = {"server.crt": pki.server_files[0], "server.key": pki.server_files[1], "ca.crt": pki.ca_file}[name]
        shutil.copy(source, conf / name)
        (conf / name).chmod(0o644)
    (conf / "nginx.conf").write_text(shipped.replace(DROPPED, FORWARDED))
    port = free_port()
    (conf / "listen.conf").write_text(
        f"listen {LOOPBACK}:{port} ssl;\n"
        "ssl_certificate server.crt;\nssl_certificate_key server.key;\n"
        "ssl_client_certificate ca.crt;\nssl_verify_client on;\n"
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


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"MTLS_IDENTITIES": ""}, "MTLS_IDENTITIES: required in production"),
        ({"MTLS_IDENTITIES": "{not json"}, "MTLS_IDENTITIES"),
        ({"MTLS_IDENTITIES": '{"spiffe://a/b": ["orgs read"]}'}, "MTLS_IDENTITIES"),
        ({"MTLS_MODE": "jwt"}, "MTLS_MODE"),
        ({"MTLS_SERVER_KEY": ""}, "MTLS_SERVER_CERT, MTLS_SERVER_KEY and MTLS_CLIENT_CA"),
        ({"MTLS_CLIENT_CA": "/nonexistent/ca.crt"}, "MTLS_CLIENT_CA: no such file"),
        ({"MTLS_SERVER_CERT": "", "MTLS_SERVER_KEY": "", "MTLS_CLIENT_CA": ""}, "MTLS_SERVER_CERT or TRUSTED_PROXIES"),
    ],
)
def test_production_refuses_unsafe_mtls_settings_and_names_them(
    pki: Pki, public_pem: str, change: dict[str, str], named: str
) -> None:
    from .test_settings import SAFE_PRODUCTION

    production = {
        **SAFE_PRODUCTION,
        "TRUSTED_PROXIES": "",
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
    command = [sys.executable, "-m", f"{PACKAGE}.cli", "check-config"]
    ok = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60, check=False, cwd="/")
    assert ok.returncode == 0, ok.stderr
    del env["MTLS_IDENTITIES"]
    refused = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60, check=False, cwd="/")
    assert refused.returncode == 1
    assert "refusing to start" in refused.stderr and "MTLS_IDENTITIES" in refused.stderr
