"""Regressions no other test would catch, though the code is right today (OWASP ASVS 5.0 reading,
issue 32 item 8). Each runs against real servers: a real JWKS / discovery endpoint (over real TLS),
the real database and redis-server, and, for what the HTTP server itself decides, the service in
its own uvicorn process spoken to over a raw socket."""

from __future__ import annotations

import json
import re
import socket
import ssl
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from {{ cookiecutter.package_name }}.api.schemas import OrgOut, UserOut
from {{ cookiecutter.package_name }}.app import create_app
from {{ cookiecutter.package_name }}.config import Settings
from {{ cookiecutter.package_name }}.security.keys import DISCOVERY_PATH

from .certificates import make_ca, server_certificate
from .conftest import DATABASE, ServiceFactory, TokenFactory, bearer, owner_url, running
from .jwks_server import JwksServer, public_jwk
from .servers import LOOPBACK, ServiceProcess

PROTECTED = "/api/v1/orgs"


@pytest.fixture
def key_server() -> Iterator[JwksServer]:
    server = JwksServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def other_server() -> Iterator[JwksServer]:
    """Where a redirect points: it serves the right keys, so following it would work."""
    server = JwksServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def jwk(private_key: Any) -> dict[str, Any]:
    return public_jwk(private_key.public_key(), "a", use="sig", alg="RS256")


async def created_with(app: FastAPI, token: str) -> int:
    async with running(app) as http:
        response = await http.post(PROTECTED, json={"name": "Acme"}, headers=bearer(token))
    assert response.status_code in (201, 401), response.text
    return response.status_code


# --- JWKS and discovery: the configured address is the only place keys come from --------------------


async def test_jwks_client_never_follows_a_redirect(
    settings_for: Callable[..., Settings],
    make_token: TokenFactory,
    key_server: JwksServer,
    other_server: JwksServer,
    jwk: dict[str, Any],
) -> None:
    other_server.serve_keys(jwk)
    key_server.redirects = {"/.well-known/jwks.json": other_server.url}
    app = create_app(settings_for(jwt_public_key=None, jwt_jwks_url=key_server.url))
    assert await created_with(app, make_token(headers={"kid": "a"})) == 401
    assert key_server.fetches >= 1
    assert other_server.fetches == 0, "the redirect's target was never asked"


async def test_oidc_discovery_never_follows_a_redirect(
    settings_for: Callable[..., Settings],
    make_token: TokenFactory,
    key_server: JwksServer,
    other_server: JwksServer,
    jwk: dict[str, Any],
) -> None:
    issuer = key_server.url_for("/realm")
    # Behind the redirect: a document naming the right issuer, and the right keys.
    other_server.documents = {
        "/realm" + DISCOVERY_PATH: {"issuer": issuer, "jwks_uri": other_server.url_for("/certs")},
        "/certs": {"keys": [jwk]},
    }
    key_server.redirects = {"/realm" + DISCOVERY_PATH: other_server.url_for("/realm" + DISCOVERY_PATH)}
    app = create_app(settings_for(jwt_public_key=None, jwt_jwks_url=None, jwt_issuer=issuer))
    assert await created_with(app, make_token(iss=issuer, headers={"kid": "a"})) == 401
    assert other_server.fetches == 0, "the redirect's target was never asked"


@pytest.mark.parametrize("trusted", [True, False], ids=["trusted CA", "untrusted CA"])
async def test_jwks_over_tls_refuses_a_certificate_of_an_untrusted_ca(
    trusted: bool,
    settings_for: Callable[..., Settings],
    make_token: TokenFactory,
    jwk: dict[str, Any],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The same endpoint and keys: only whether the client trusts the certificate's CA differs, so
    the trusted case shows the refusal is the certificate's."""
    served_by, trusted_ca = make_ca("JWKS server's CA"), make_ca("Another CA")
    cert, key = server_certificate(served_by).write(tmp_path, "jwks")
    (tmp_path / "ca.crt").write_bytes((served_by if trusted else trusted_ca).cert_pem)
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "ca.crt"))  # what the service's client trusts
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    server = JwksServer()
    server.serve_keys(jwk)
    server.start(tls=context)
    try:
        app = create_app(settings_for(jwt_public_key=None, jwt_jwks_url=server.url))
        status = await created_with(app, make_token(headers={"kid": "a"}))
    finally:
        server.stop()
    assert status == (201 if trusted else 401)
    assert (server.fetches > 0) == trusted, "no document is read over an untrusted channel"


# --- credentials come from the Authorization header only ---------------------------------------------


async def test_a_token_in_the_query_string_or_a_cookie_is_not_a_credential(
    client: Any, make_token: TokenFactory
) -> None:
    token = make_token()
    assert (await client.post(PROTECTED, json={"name": "Acme"}, headers=bearer(token))).status_code == 201
    for params, cookie in (
        ({"access_token": token}, None),
        ({"api_key": token}, None),
        ({"token": token}, None),
        ({}, f"access_token={token}"),
        ({}, f'Authorization="Bearer {token}"'),
        ({}, f"api_key={token}"),
        ({}, f"session={token}"),
    ):
        headers = {"Cookie": cookie} if cookie else {}
        response = await client.post(PROTECTED, json={"name": "Acme"}, params=params, headers=headers)
        assert response.status_code == 401, (params, cookie)
        assert response.headers["content-type"] == "application/problem+json"


# --- response field sets ---------------------------------------------------------------------------

ORG_FIELDS = {"id", "name", "created_at"}
USER_FIELDS = {"id", "org_id", "email", "role", "metadata", "created_at"}


async def test_org_and_user_responses_carry_exactly_their_pinned_fields(client: Any, make_token: TokenFactory) -> None:
    """A field added to a table or a response model (created_by, an internal flag) must be a
    decision that changes this test, never a leak that nobody sees."""
    assert set(OrgOut.model_fields) == ORG_FIELDS
    assert set(UserOut.model_fields) == USER_FIELDS
    headers = bearer(make_token())
    org = (await client.post(PROTECTED, json={"name": "Acme"}, headers=headers)).json()
    # The owner's view (the creator's) adds who created it (field-level authorization, test_fields.py).
    assert set(org) == ORG_FIELDS | {"created_by"}
    assert set((await client.get(f"{PROTECTED}/{org['id']}", headers=headers)).json()) == ORG_FIELDS | {"created_by"}
    user = await client.post(
        f"{PROTECTED}/{org['id']}/users", json={"email": "ada@example.com", "role": "viewer"}, headers=headers
    )
    assert user.status_code == 201, user.text
    assert set(user.json()) == USER_FIELDS
    listed = (await client.get(f"{PROTECTED}/{org['id']}/users", headers=headers)).json()
    items = listed["items"] if isinstance(listed, dict) else listed
    assert [set(item) for item in items] == [USER_FIELDS]


# --- an org and its owner grant: one transaction ------------------------------------------------------

FAIL_GRANTS = {
    "sqlite": [
        "CREATE TRIGGER fail_grants BEFORE INSERT ON permissions BEGIN SELECT RAISE(ABORT, 'injected'); END",
    ],
    "postgresql": [
        "CREATE FUNCTION fail_grants() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RAISE EXCEPTION 'injected'; END $$",
        "CREATE TRIGGER fail_grants BEFORE INSERT ON permissions FOR EACH ROW EXECUTE FUNCTION fail_grants()",
    ],
}
UNFAIL_GRANTS = {
    "sqlite": ["DROP TRIGGER IF EXISTS fail_grants"],
    "postgresql": ["DROP TRIGGER IF EXISTS fail_grants ON permissions", "DROP FUNCTION IF EXISTS fail_grants()"],
}


async def execute(url: str, statements: list[str]) -> None:
    engine = create_async_engine(url)
    try:
        async with engine.begin() as connection:
            for statement in statements:
                await connection.execute(text(statement))
    finally:
        await engine.dispose()


async def test_a_failure_between_an_org_and_its_owner_grant_commits_neither(
    settings: Settings, make_token: TokenFactory, migrated_database: str
) -> None:
    """The database itself refuses the owner grant (a trigger): the org written just before must
    not stay behind without an owner."""
    admin = owner_url(migrated_database)
    async with running(create_app(settings)) as http:
        await execute(admin, FAIL_GRANTS[DATABASE])
        try:
            response = await http.post(PROTECTED, json={"name": "Orphan"}, headers=bearer(make_token()))
        finally:
            await execute(admin, UNFAIL_GRANTS[DATABASE])
        assert response.status_code == 500
        assert response.headers["content-type"] == "application/problem+json"
        assert "injected" not in response.text
        engine = create_async_engine(admin)
        try:
            async with engine.connect() as connection:
                orgs = (await connection.execute(text("SELECT count(*) FROM orgs WHERE name = 'Orphan'"))).scalar()
                grants = (await connection.execute(text("SELECT count(*) FROM permissions"))).scalar()
        finally:
            await engine.dispose()
    assert (orgs, grants) == (0, 0)


# --- what the HTTP server decides: through the real uvicorn process --------------------------------


def exchange(port: int, request: bytes) -> bytes:
    """Send raw bytes, read until the server closes the connection (every request here asks for
    `Connection: close`, or is one the server must close after)."""
    with socket.create_connection((LOOPBACK, port), timeout=30) as connection:
        connection.sendall(request)
        received = bytearray()
        while chunk := connection.recv(65536):
            received += chunk
    return bytes(received)


def statuses(answer: bytes) -> list[int]:
    """The status of every response in `answer` (a response follows the last one's body directly)."""
    return [int(status) for status in re.findall(rb"HTTP/1\.1 (\d{3}) ", answer)]


def log_lines(path: Path) -> list[dict[str, Any]]:
    """Every line the service wrote, each of which must be one JSON object (JSON Lines: split on
    LF only, as log shippers do)."""
    lines = path.read_bytes().split(b"\n")
    return [json.loads(line) for line in lines if line.strip()]


@pytest.fixture
def service(start_service: ServiceFactory) -> ServiceProcess:
    return start_service(serve=True, ALLOWED_ORIGINS="https://app.example.com", TRUSTED_HOSTS="127.0.0.1")


def test_trace_is_refused_and_echoes_nothing(service: ServiceProcess, make_token: TokenFactory) -> None:
    token = make_token()
    for path in ("/api/v1/orgs", "/health/live", "/docs", "/"):
        answer = exchange(
            service.port,
            f"TRACE {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n"
            "Cookie: secret=s3cr3t\r\nConnection: close\r\n\r\n".encode(),
        )
        status = statuses(answer)[0]
        assert status in (401, 404, 405), (path, answer[:200])
        assert token.encode() not in answer and b"s3cr3t" not in answer, path


def test_transfer_encoding_with_content_length_is_refused_or_reframed_never_smuggled(
    service: ServiceProcess, make_token: TokenFactory
) -> None:
    """RFC 9112 §6.3: with both, Transfer-Encoding wins and the connection closes after the
    response, or the request is refused. After the chunked body's end come the bytes of a second
    request; Content-Length (3) ends the body in the middle of the chunked one. A server that framed
    by Content-Length, or by Transfer-Encoding but kept the connection open, would answer that
    second request too: two status lines where there must be one. (The first request carries a
    credential, so the service reads its body, as it must before the connection can carry on.)

    httptools, the parser `serve` gets with uvicorn[standard], refuses the request (400). uvicorn's
    h11 parser, its fallback where httptools is not installed, frames by Transfer-Encoding but keeps
    the connection open and answers the second request: this test fails under it."""
    chunked_end = b"0\r\n\r\n"
    smuggled = b"GET /health/live HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    answer = exchange(
        service.port,
        b"POST /api/v1/orgs HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        + f"Authorization: Bearer {make_token()}\r\n".encode()
        + b"Content-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"
        + chunked_end
        + smuggled,
    )
    # 400 either way: refused by the server, or framed as chunked (an empty body, not valid JSON).
    assert statuses(answer) == [400], answer[:300]


# CR and LF cannot cross uvicorn's parser in a header (see the next test); these can, quotes and
# backslashes and a fake JSON tail included.
INJECTED = '"}, {"event": "forged", "x": "\\\\"'


def test_quotes_and_backslashes_in_origin_and_host_stay_inside_one_json_line(service: ServiceProcess) -> None:
    origin = "https://evil.example/" + INJECTED
    host = "evil.example" + INJECTED.replace(" ", "")
    for head in (f"Host: 127.0.0.1\r\nOrigin: {origin}\r\nAccess-Control-Request-Method: POST", f"Host: {host}"):
        request = f"OPTIONS /api/v1/orgs HTTP/1.1\r\n{head}\r\nConnection: close\r\n\r\n"
        answer = exchange(service.port, request.encode("latin-1"))
        assert statuses(answer)[0] in (400, 403), answer[:300]
    lines = log_lines(service.log_path)
    assert not any(line.get("event") == "forged" for line in lines)
    refused = {line["event"]: line for line in lines if line.get("event") in ("cors_refused", "host_refused")}
    assert refused["cors_refused"]["origin"] == origin
    assert refused["host_refused"]["host"] == host


def test_cr_and_lf_in_a_header_never_reach_the_log(service: ServiceProcess) -> None:
    """uvicorn refuses a header value with a bare CR or LF before the app sees it; a header split
    by them is two headers, neither of which forges a log line."""
    for raw in (
        b'Origin: https://a.example\r{"event": "forged"}\r\n',
        b'Origin: https://a.example\n{"event": "forged"}\r\n',
    ):
        request = b"OPTIONS /api/v1/orgs HTTP/1.1\r\nHost: 127.0.0.1\r\n" + raw + b"Connection: close\r\n\r\n"
        answer = exchange(service.port, request)
        assert statuses(answer) in ([400], []), answer[:200]
    assert not any(line.get("event") == "forged" for line in log_lines(service.log_path))


async def test_cr_lf_and_quotes_that_reach_the_app_stay_inside_one_json_line(
    settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    """Behind a server or proxy that lets CR and LF through, the log still holds one JSON object
    per line: the service's own formatter (on stdout) escapes them."""
    forged = '\r\n{"event": "forged"}\n"'
    app = create_app(settings)
    async with running(app) as http:
        capsys.readouterr()
        preflight = {"Origin": "https://evil.example" + forged, "Access-Control-Request-Method": "POST"}
        assert (await http.options(PROTECTED, headers=preflight)).status_code == 403
        assert (await http.get("/health/live", headers={"Host": "evil.example" + forged})).status_code == 400
        written = capsys.readouterr().out
    lines = [json.loads(line) for line in written.split("\n") if line.strip()]
    assert not any(line.get("event") == "forged" for line in lines)
    refused = {line["event"]: line for line in lines if line.get("event") in ("cors_refused", "host_refused")}
    assert refused["cors_refused"]["origin"] == "https://evil.example" + forged
    assert refused["host_refused"]["host"] == "evil.example" + forged
