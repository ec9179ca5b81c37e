"""Layer 1, transport: security headers on every response, strict CORS, trusted hosts, the
trusted-proxy-aware client address, and the streaming body limit."""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.types import Message, Receive, Scope, Send

from {{ cookiecutter.package_name }}.app import create_app
from {{ cookiecutter.package_name }}.config import Settings
from {{ cookiecutter.package_name }}.security import route_policy
from {{ cookiecutter.package_name }}.security.transport import ClientAddress, rate_limit_bucket, socket_peer

from .conftest import TokenFactory, bearer, running
from .test_errors import assert_problem

API_HEADERS = {
    "content-security-policy": "default-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
    "cross-origin-opener-policy": "same-origin",
    "cross-origin-embedder-policy": "require-corp",
    "cross-origin-resource-policy": "same-origin",
    "cache-control": "no-store",
}
PROBLEM = "urn:{{ cookiecutter.project_slug }}:problem:"
TWO_YEARS = 2 * 365 * 24 * 3600
ALLOWED_ORIGIN = "https://app.example.com"  # conftest's ALLOWED_ORIGINS
REFUSED_ORIGINS = [
    "https://evil.example",
    "null",
    "https://app.example.com.evil.com",
    "https://evilapp.example.com",
    "http://app.example.com",
    "https://app.example.com:8443",
    "https://sub.app.example.com",
    "https://app.example.co",
    "",
]


def assert_security_headers(response: httpx.Response, *, hsts: bool = False) -> None:
    for name, value in API_HEADERS.items():
        assert response.headers.get_list(name) == [value], name
    policy = response.headers["permissions-policy"]
    for feature in ("camera", "microphone", "geolocation", "payment", "usb"):
        assert f"{feature}=()" in policy
    assert "server" not in response.headers
    assert "x-powered-by" not in response.headers
    if hsts:
        match = re.fullmatch(r"max-age=(\d+); includeSubDomains", response.headers["strict-transport-security"])
        assert match and int(match.group(1)) >= TWO_YEARS
    else:
        assert "strict-transport-security" not in response.headers


@pytest.fixture(autouse=True)
def probe_routes_are_public(monkeypatch: pytest.MonkeyPatch) -> None:
    """The probe routes below have no policy: they are on the public list for these tests, as an
    owner puts a public route of theirs there (else the service refuses to start, deny by default)."""
    monkeypatch.setattr(route_policy, "PUBLIC_ROUTES", route_policy.PUBLIC_ROUTES | {"/boom", "/banner", "/whoami"})


def add_probe_routes(app: FastAPI) -> FastAPI:
    """Routes outside /api/ that show what the pipeline did: a crash, a banner, the client address."""

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("boom")

    @app.get("/banner")
    async def banner() -> PlainTextResponse:
        return PlainTextResponse(
            "hi", headers={"Server": "uvicorn", "X-Powered-By": "FastAPI", "Cache-Control": "public, max-age=60"}
        )

    @app.get("/whoami")
    async def whoami(request: Request) -> JSONResponse:
        return JSONResponse({"client": request.client.host if request.client else None})

    return app


@pytest.fixture
def app(settings: Settings) -> FastAPI:
    return add_probe_routes(create_app(settings))


# --- security headers ------------------------------------------------------------------------

Call = Callable[[httpx.AsyncClient, TokenFactory], Awaitable[httpx.Response]]
STATUS_CASES: dict[int, Call] = {
    200: lambda http, _: http.get("/health/live"),
    204: lambda http, _: http.options(
        "/api/v1/orgs", headers={"Origin": ALLOWED_ORIGIN, "Access-Control-Request-Method": "POST"}
    ),
    400: lambda http, token: http.post("/api/v1/orgs", json={"nope": 1}, headers=bearer(token())),
    401: lambda http, _: http.get("/api/v1/orgs/00000000-0000-0000-0000-000000000000"),
    403: lambda http, token: http.post("/api/v1/orgs", json={"name": "x"}, headers=bearer(token(scope="orgs:read"))),
    404: lambda http, _: http.get("/nope"),
    405: lambda http, _: http.post("/health/live"),
    413: lambda http, token: http.post("/api/v1/orgs", content=b"x" * 2_000_000, headers=bearer(token())),
    500: lambda http, _: http.get("/boom"),
}


@pytest.mark.parametrize("status", sorted(STATUS_CASES))
async def test_every_response_carries_the_security_headers(
    client: httpx.AsyncClient, make_token: TokenFactory, status: int
) -> None:
    response = await STATUS_CASES[status](client, make_token)
    assert response.status_code == status
    assert_security_headers(response)


async def test_ready_probe_carries_the_security_headers(client: httpx.AsyncClient) -> None:
    response = await client.get("/health/ready")
    assert response.status_code == 200
    assert_security_headers(response)


async def test_rate_limited_response_carries_the_security_headers(settings_for: Callable[..., Settings]) -> None:
    async with running(create_app(settings_for(rate_limit_ip="1/minute"))) as http:
        await http.get("/api/v1/orgs/00000000-0000-0000-0000-000000000000")
        response = await http.get("/api/v1/orgs/00000000-0000-0000-0000-000000000000")
    assert_problem(response, 429)
    assert_security_headers(response)


async def test_dependency_outage_response_carries_the_security_headers(
    settings_for: Callable[..., Settings], unused_redis_url: str
) -> None:
    app = create_app(settings_for(redis_url=unused_redis_url, rate_limit_failure_mode="closed"))
    async with running(app, reset=False) as http:
        response = await http.get("/api/v1/orgs/00000000-0000-0000-0000-000000000000")
        ready = await http.get("/health/ready")
    assert_problem(response, 503)
    assert_security_headers(response)
    assert ready.status_code == 503
    assert_security_headers(ready)


@pytest.fixture
def unused_redis_url() -> str:
    import socket

    with socket.socket() as sock:  # a port that was free a moment ago: nothing listens there
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"redis://127.0.0.1:{port}/0"


async def test_hsts_of_at_least_two_years_is_sent_in_production_on_every_response(
    settings_for: Callable[..., Settings], make_token: TokenFactory
) -> None:
    settings = settings_for(environment="production", trusted_hosts=["localhost"])
    async with running(add_probe_routes(create_app(settings))) as http:
        for status in (200, 401, 404, 500):
            response = await STATUS_CASES[status](http, make_token)
            assert response.status_code == status
            assert_security_headers(response, hsts=True)


async def test_server_banners_are_removed_and_cache_control_forced(client: httpx.AsyncClient) -> None:
    response = await client.get("/banner")
    assert response.status_code == 200
    assert_security_headers(response)


async def test_docs_page_gets_its_own_origin_csp_and_everything_else_the_strict_one(client: httpx.AsyncClient) -> None:
    docs = await client.get("/docs")
    assert docs.status_code == 200
    csp = docs.headers["content-security-policy"]
    assert "script-src 'self';" in csp
    assert "style-src 'self';" in csp
    assert "unsafe-inline" not in csp and "https:" not in csp
    assert "frame-ancestors 'none'" in csp
    assert docs.headers["cross-origin-embedder-policy"] == "require-corp"
    assert docs.headers["x-frame-options"] == "DENY"
    for path in ("/openapi.json", "/docs/swagger-ui-bundle.js", "/docs/swagger-initializer.js"):
        response = await client.get(path)
        assert response.status_code == 200, path
        assert_security_headers(response)


async def test_docs_paths_keep_the_strict_csp_when_docs_are_disabled(settings_for: Callable[..., Settings]) -> None:
    async with running(create_app(settings_for(docs_enabled=False))) as http:
        for path in ("/docs", "/docs/swagger-ui-bundle.js", "/docs/swagger-initializer.js", "/openapi.json"):
            response = await http.get(path)
            assert_problem(response, 404)
            assert_security_headers(response)


# --- CORS ------------------------------------------------------------------------------------


def preflight(origin: str, method: str = "POST", headers: str | None = None) -> dict[str, str]:
    request = {"Origin": origin, "Access-Control-Request-Method": method}
    if headers is not None:
        request["Access-Control-Request-Headers"] = headers
    return request


async def test_preflight_from_an_allowed_origin_is_answered_with_the_allowlist(client: httpx.AsyncClient) -> None:
    response = await client.options(
        "/api/v1/orgs", headers=preflight(ALLOWED_ORIGIN, "POST", "content-type, authorization")
    )
    assert response.status_code == 204
    assert response.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
    assert response.headers["access-control-allow-credentials"] == "true"
    assert response.headers["access-control-allow-methods"] == "GET, POST, PUT, DELETE"
    assert response.headers["access-control-allow-headers"] == "Content-Type, Authorization"
    assert response.headers["access-control-max-age"] == "86400"
    assert response.headers["vary"] == "Origin"
    assert response.content == b""


@pytest.mark.parametrize("origin", REFUSED_ORIGINS)
async def test_preflight_from_another_origin_is_refused_and_not_reflected(
    client: httpx.AsyncClient, origin: str
) -> None:
    response = await client.options("/api/v1/orgs", headers=preflight(origin))
    body = assert_problem(response, 403)
    assert body["type"] == PROBLEM + "cors-refused"
    assert not any(name.startswith("access-control-") for name in response.headers)
    assert response.headers["vary"] == "Origin"


@pytest.mark.parametrize("origin", REFUSED_ORIGINS)
async def test_simple_request_from_another_origin_gets_no_cors_headers(client: httpx.AsyncClient, origin: str) -> None:
    response = await client.get("/health/live", headers={"Origin": origin})
    assert response.status_code == 200
    assert not any(name.startswith("access-control-") for name in response.headers)
    assert response.headers["vary"] == "Origin"


async def test_simple_request_from_an_allowed_origin_is_allowed_with_credentials(client: httpx.AsyncClient) -> None:
    response = await client.get("/api/v1/orgs/00000000-0000-0000-0000-000000000000", headers={"Origin": ALLOWED_ORIGIN})
    assert_problem(response, 401)  # CORS headers also on refusals, so the browser can show them
    assert response.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
    assert response.headers["access-control-allow-credentials"] == "true"
    exposed = {name.strip().lower() for name in response.headers["access-control-expose-headers"].split(",")}
    assert {"x-trace-id", "retry-after", "ratelimit", "ratelimit-policy", "www-authenticate"} <= exposed
    assert response.headers["vary"] == "Origin"


@pytest.mark.parametrize("method", ["PATCH", "TRACE", "ET", "POST, PUT", "get", ""])
async def test_preflight_for_a_method_outside_the_allowlist_is_refused(client: httpx.AsyncClient, method: str) -> None:
    response = await client.options("/api/v1/orgs", headers=preflight(ALLOWED_ORIGIN, method))
    assert_problem(response, 403)
    assert "access-control-allow-origin" not in response.headers


@pytest.mark.parametrize("headers", ["x-custom", "authorization, cookie", "content-type,x-api-key"])
async def test_preflight_for_a_header_outside_the_allowlist_is_refused(client: httpx.AsyncClient, headers: str) -> None:
    response = await client.options("/api/v1/orgs", headers=preflight(ALLOWED_ORIGIN, "POST", headers))
    assert_problem(response, 403)
    assert "access-control-allow-origin" not in response.headers


async def test_wildcard_origin_allows_any_origin_but_never_with_credentials_nor_null(
    settings_for: Callable[..., Settings],
) -> None:
    async with running(create_app(settings_for(allowed_origins=["*"]))) as http:
        allowed = await http.options("/api/v1/orgs", headers=preflight("https://anyone.example"))
        simple = await http.get("/health/live", headers={"Origin": "https://anyone.example"})
        null = await http.options("/api/v1/orgs", headers=preflight("null"))
    assert allowed.status_code == 204
    assert allowed.headers["access-control-allow-origin"] == "*"
    assert "access-control-allow-credentials" not in allowed.headers
    assert simple.headers["access-control-allow-origin"] == "*"
    assert "access-control-allow-credentials" not in simple.headers
    assert_problem(null, 403)


async def test_no_allowed_origins_means_no_cross_origin_access(settings_for: Callable[..., Settings]) -> None:
    async with running(create_app(settings_for(allowed_origins=[]))) as http:
        response = await http.options("/api/v1/orgs", headers=preflight(ALLOWED_ORIGIN))
    assert_problem(response, 403)


# --- trusted hosts ---------------------------------------------------------------------------


@pytest.mark.parametrize("host", ["evil.example", "localhost.evil.example", "127.0.0.2", "[::2]:8000", ""])
async def test_request_for_an_untrusted_host_is_a_400_problem(client: httpx.AsyncClient, host: str) -> None:
    response = await client.get("/health/live", headers={"Host": host})
    body = assert_problem(response, 400)
    assert body["type"] == PROBLEM + "host-not-allowed"
    assert_security_headers(response)


@pytest.mark.parametrize(
    "host",
    [
        "localhost:80@evil.example",  # userinfo-like: the host is evil.example, not localhost
        "[::1]evil.example",  # text after the IPv6 literal
        "[::1]:80evil.example",
        "localhost:8000:80",
        "localhost:80a",
        "localhost evil.example",
        "localhost/evil",
        "localhost,evil.example",
        "localhost:123456",
    ],
)
async def test_a_malformed_host_is_a_400_problem_even_when_it_starts_with_a_trusted_one(
    client: httpx.AsyncClient, audit_events: list[logging.LogRecord], host: str
) -> None:
    response = await client.get("/health/live", headers={"Host": host})
    body = assert_problem(response, 400)
    assert body["type"] == PROBLEM + "host-not-allowed"
    assert_security_headers(response)
    refused = [r for r in audit_events if r.getMessage() == "host_refused"]
    assert len(refused) == 1 and refused[0].malformed is True  # type: ignore[attr-defined]


@pytest.mark.parametrize("host", ["localhost", "localhost:8000", "LOCALHOST", "127.0.0.1:80", "[::1]:8000", "[::1]"])
async def test_default_development_hosts_are_trusted_with_any_port(client: httpx.AsyncClient, host: str) -> None:
    response = await client.get("/health/live", headers={"Host": host})
    assert response.status_code == 200


async def test_wildcard_trusted_host_matches_subdomains_only(settings_for: Callable[..., Settings]) -> None:
    async with running(create_app(settings_for(trusted_hosts=["*.example.com"]))) as http:
        sub = await http.get("/health/live", headers={"Host": "api.example.com"})
        apex = await http.get("/health/live", headers={"Host": "example.com"})
        lookalike = await http.get("/health/live", headers={"Host": "api.example.com.evil.net"})
        suffix = await http.get("/health/live", headers={"Host": "evilexample.com"})
    assert sub.status_code == 200
    for response in (apex, lookalike, suffix):
        assert_problem(response, 400)


# --- client address --------------------------------------------------------------------------

PROXIES = ["10.0.0.0/8", "2001:db8:ffff::/48"]


async def client_seen(
    settings_for: Callable[..., Settings],
    peer: str,
    headers: dict[str, str],
    proxies: list[str] = PROXIES,
    forwarded_header: str = "X-Forwarded-For",
) -> str:
    settings = settings_for(trusted_proxies=proxies, forwarded_header=forwarded_header)
    async with running(add_probe_routes(create_app(settings)), client=(peer, 4711)) as http:
        response = await http.get("/whoami", headers=headers)
    assert response.status_code == 200
    client: str = response.json()["client"]
    return client


@pytest.mark.parametrize(
    ("peer", "headers", "expected"),
    [
        # An untrusted peer is the client, whatever it claims.
        ("203.0.113.7", {"X-Forwarded-For": "198.51.100.1"}, "203.0.113.7"),
        ("203.0.113.7", {"Forwarded": "for=198.51.100.1"}, "203.0.113.7"),
        # A trusted proxy names the client.
        ("10.0.0.5", {"X-Forwarded-For": "198.51.100.1"}, "198.51.100.1"),
        ("10.0.0.5", {"X-Forwarded-For": "198.51.100.1:5555"}, "198.51.100.1"),
        # Walked from the right: the client's own (forged) entries on the left are ignored.
        ("10.0.0.5", {"X-Forwarded-For": "1.1.1.1, 198.51.100.1, 10.0.0.3"}, "198.51.100.1"),
        # Every hop trusted: the leftmost is the origin.
        ("10.0.0.5", {"X-Forwarded-For": "10.0.0.2, 10.0.0.3"}, "10.0.0.2"),
        # A malformed hop stops the walk at the last trusted address.
        ("10.0.0.5", {"X-Forwarded-For": "198.51.100.1, not-an-ip"}, "10.0.0.5"),
        ("10.0.0.5", {"X-Forwarded-For": ""}, "10.0.0.5"),
        # No header from a trusted proxy: the proxy itself.
        ("10.0.0.5", {}, "10.0.0.5"),
        # Only the header the proxy writes (FORWARDED_HEADER) is read. The other one came from the
        # client through the proxy: it neither names the client nor makes the proxy the client.
        ("10.0.0.5", {"Forwarded": "for=198.51.100.1"}, "10.0.0.5"),
        ("10.0.0.5", {"X-Forwarded-For": "198.51.100.1", "Forwarded": "for=1.1.1.1"}, "198.51.100.1"),
        ("10.0.0.5", {"X-Forwarded-For": "198.51.100.1", "Forwarded": "x"}, "198.51.100.1"),
        # IPv6 proxies and IPv4-mapped peers.
        ("2001:db8:ffff::9", {"X-Forwarded-For": "198.51.100.1"}, "198.51.100.1"),
        ("::ffff:10.0.0.5", {"X-Forwarded-For": "198.51.100.1"}, "198.51.100.1"),
    ],
)
async def test_client_address_believes_x_forwarded_for_only_from_trusted_proxies(
    settings_for: Callable[..., Settings], peer: str, headers: dict[str, str], expected: str
) -> None:
    assert await client_seen(settings_for, peer, headers) == expected


@pytest.mark.parametrize(
    ("peer", "headers", "expected"),
    [
        ("203.0.113.7", {"Forwarded": "for=198.51.100.1"}, "203.0.113.7"),
        # RFC 7239 Forwarded, quoted IPv6 with port, several elements.
        ("10.0.0.5", {"Forwarded": "for=198.51.100.1;proto=https"}, "198.51.100.1"),
        ("10.0.0.5", {"Forwarded": 'for="[2001:db8::1]:4711"'}, "2001:db8::1"),
        ("10.0.0.5", {"Forwarded": "for=1.1.1.1, for=198.51.100.1, for=10.0.0.3"}, "198.51.100.1"),
        ("10.0.0.5", {"Forwarded": "for=_hidden, for=10.0.0.3"}, "10.0.0.3"),
        # X-Forwarded-For is then the header the client controls.
        ("10.0.0.5", {"X-Forwarded-For": "198.51.100.1"}, "10.0.0.5"),
        ("10.0.0.5", {"Forwarded": "for=198.51.100.1", "X-Forwarded-For": "1.1.1.1"}, "198.51.100.1"),
    ],
)
async def test_client_address_reads_only_forwarded_when_the_proxy_writes_forwarded(
    settings_for: Callable[..., Settings], peer: str, headers: dict[str, str], expected: str
) -> None:
    assert await client_seen(settings_for, peer, headers, forwarded_header="Forwarded") == expected


@pytest.mark.parametrize(
    ("peer", "trusted", "client", "socket"),
    [
        ("10.0.0.5", PROXIES, "198.51.100.1", "10.0.0.5"),  # the address decided; the peer kept
        ("::ffff:10.0.0.5", PROXIES, "198.51.100.1", "10.0.0.5"),
        ("203.0.113.7", PROXIES, "203.0.113.7", "203.0.113.7"),  # no proxy: the peer is the client
        ("10.0.0.5", [], "10.0.0.5", "10.0.0.5"),
    ],
)
async def test_the_socket_peer_survives_the_client_address_decision(
    peer: str, trusted: list[str], client: str, socket: str
) -> None:
    """What a check that must know who sent the bytes reads (a forwarded client certificate is
    believed from one proxy address only), whatever X-Forwarded-For made the client."""
    import ipaddress

    seen: dict[str, Any] = {}

    async def inner(scope: Scope, receive: Receive, send: Send) -> None:
        seen["client"], seen["socket"] = scope["client"][0], socket_peer(scope)

    async def nothing() -> Message:
        raise AssertionError("not read")

    async def ignore(message: Message) -> None:
        raise AssertionError("not sent")

    networks = tuple(ipaddress.ip_network(network) for network in trusted)
    layer = ClientAddress(inner, trusted=networks)
    scope = {"type": "http", "client": (peer, 4711), "headers": [(b"x-forwarded-for", b"198.51.100.1")]}
    await layer(scope, nothing, ignore)
    assert seen == {"client": client, "socket": ipaddress.ip_address(socket)}


async def test_forwarding_headers_are_ignored_without_trusted_proxies(settings_for: Callable[..., Settings]) -> None:
    seen = await client_seen(settings_for, "10.0.0.5", {"X-Forwarded-For": "198.51.100.1"}, proxies=[])
    assert seen == "10.0.0.5"


async def test_rate_limit_counts_the_client_behind_the_proxy(settings_for: Callable[..., Settings]) -> None:
    settings = settings_for(trusted_proxies=PROXIES, rate_limit_ip="1/minute")
    path = "/api/v1/orgs/00000000-0000-0000-0000-000000000000"
    async with running(create_app(settings), client=("10.0.0.5", 4711)) as http:
        first = await http.get(path, headers={"X-Forwarded-For": "198.51.100.1"})
        other = await http.get(path, headers={"X-Forwarded-For": "198.51.100.2"})
        again = await http.get(path, headers={"X-Forwarded-For": "9.9.9.9, 198.51.100.1"})
    assert first.status_code == 401
    assert other.status_code == 401
    assert_problem(again, 429)


# --- rate-limit bucket ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "prefix", "bucket"),
    [
        ("198.51.100.7", 64, "198.51.100.7"),  # IPv4: every address is its own bucket
        ("2001:db8:1:2:aaaa:bbbb:cccc:dddd", 64, "2001:db8:1:2::/64"),
        ("2001:db8:1:2::1", 64, "2001:db8:1:2::/64"),
        ("2001:db8:1:3::1", 64, "2001:db8:1:3::/64"),
        ("2001:db8:1:3::1", 56, "2001:db8:1::/56"),
        ("2001:db8:1:3::1", 128, "2001:db8:1:3::1/128"),
        ("::ffff:198.51.100.7", 64, "198.51.100.7"),
        ("not-an-address", 64, "not-an-address"),
    ],
)
def test_rate_limit_bucket_counts_an_ipv6_client_by_its_prefix_and_ipv4_by_address(
    address: str, prefix: int, bucket: str
) -> None:
    assert rate_limit_bucket(address, prefix) == bucket


def test_addresses_rotated_inside_one_slash_64_share_a_bucket_by_default(settings: Settings) -> None:
    assert settings.rate_limit_ipv6_prefix == 64
    rotated = {rate_limit_bucket(f"2001:db8:0:7::{n:x}", settings.rate_limit_ipv6_prefix) for n in range(1, 500)}
    assert rotated == {"2001:db8:0:7::/64"}


# --- WebSocket -------------------------------------------------------------------------------


async def websocket_handshake(app: FastAPI, path: str, headers: list[tuple[bytes, bytes]]) -> list[Message]:
    """Offer one WebSocket handshake straight to the ASGI app; the messages it sends back."""
    incoming: list[Message] = [{"type": "websocket.connect"}, {"type": "websocket.disconnect", "code": 1000}]
    sent: list[Message] = []

    async def receive() -> Message:
        return incoming.pop(0) if incoming else {"type": "websocket.disconnect", "code": 1000}

    async def send(message: Message) -> None:
        sent.append(message)

    scope: dict[str, Any] = {
        "type": "websocket",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "scheme": "ws",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", b"localhost"), (b"upgrade", b"websocket"), *headers],
        "client": ("203.0.113.7", 4711),
        "server": ("localhost", 80),
        "subprotocols": [],
    }
    await app(scope, receive, send)
    return sent


@pytest.mark.parametrize("path", ["/api/v1/orgs/00000000-0000-0000-0000-000000000000", "/health/live", "/ws"])
async def test_a_websocket_handshake_is_refused_before_any_other_layer_and_logged(
    app: FastAPI, make_token: TokenFactory, audit_events: list[logging.LogRecord], path: str
) -> None:
    forged = make_token("alice") + "x"
    async with running(app):
        sent = await websocket_handshake(app, path, [(b"authorization", f"Bearer {forged}".encode())])
    assert [message["type"] for message in sent] == ["websocket.close"]  # closed before accept: 403
    assert sent[0]["code"] == 1008
    events = [record.getMessage() for record in audit_events]
    assert events == ["websocket_refused"]  # the token was never looked at
    assert audit_events[0].client == "203.0.113.7"  # type: ignore[attr-defined]


# --- body limit ------------------------------------------------------------------------------

LIMIT = 1024


@pytest.fixture
def limited_app(settings_for: Callable[..., Settings]) -> FastAPI:
    return create_app(settings_for(max_body_bytes=LIMIT))


def assert_too_large(response: httpx.Response) -> None:
    body = assert_problem(response, 413)
    assert body["type"] == PROBLEM + "body-too-large"
    assert body["detail"] == f"The request body is larger than {LIMIT} bytes."
    assert_security_headers(response)


async def test_body_over_the_limit_with_content_length_is_refused_with_413(
    limited_app: FastAPI, make_token: TokenFactory
) -> None:
    async with running(limited_app) as http:
        response = await http.post("/api/v1/orgs", content=b"x" * (LIMIT + 1), headers=bearer(make_token()))
    assert_too_large(response)


async def test_body_over_the_limit_without_content_length_is_refused_with_413(
    limited_app: FastAPI, make_token: TokenFactory
) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(8):
            yield b"x" * 512

    async with running(limited_app) as http:
        request = http.build_request("POST", "/api/v1/orgs", content=chunks(), headers=bearer(make_token()))
        assert "content-length" not in request.headers
        response = await http.send(request)
    assert_too_large(response)


async def test_body_at_the_limit_passes_the_transport_layer(limited_app: FastAPI, make_token: TokenFactory) -> None:
    body = b'{"name": "' + b"a" * (LIMIT - 12) + b'"}'
    assert len(body) == LIMIT
    async with running(limited_app) as http:
        response = await http.post(
            "/api/v1/orgs", content=body, headers={**bearer(make_token()), "Content-Type": "application/json"}
        )
    assert_problem(response, 400)  # reached validation: the name is too long, not the body


async def call_asgi(app: FastAPI, headers: list[tuple[bytes, bytes]], chunks: list[bytes]) -> tuple[int, int, bytes]:
    """Send one POST /api/v1/orgs straight to the ASGI app, with headers httpx would not send.
    Returns the status, how many body chunks the app pulled, and the response body."""
    messages: list[Message] = [
        {"type": "http.request", "body": chunk, "more_body": index < len(chunks) - 1}
        for index, chunk in enumerate(chunks)
    ]
    pulled = 0

    async def receive() -> Message:
        nonlocal pulled
        if pulled < len(messages):
            pulled += 1
            return messages[pulled - 1]
        return {"type": "http.disconnect"}

    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    scope: dict[str, Any] = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/api/v1/orgs",
        "raw_path": b"/api/v1/orgs",
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", b"localhost"), (b"content-type", b"application/json"), *headers],
        "client": ("203.0.113.7", 4711),
        "server": ("localhost", 80),
    }
    await app(scope, receive, send)
    start = next(message for message in sent if message["type"] == "http.response.start")
    body = b"".join(message.get("body", b"") for message in sent if message["type"] == "http.response.body")
    return start["status"], pulled, body


async def test_lying_content_length_cannot_get_more_than_the_limit_through(
    limited_app: FastAPI, make_token: TokenFactory
) -> None:
    auth = (b"authorization", f"Bearer {make_token()}".encode())
    async with running(limited_app):
        status, pulled, body = await call_asgi(
            limited_app, [auth, (b"content-length", b"10")], [b"x" * 512 for _ in range(100)]
        )
    assert status == 413
    assert b"body-too-large" in body
    assert pulled == 3  # reading stopped at the first chunk over the limit


@pytest.mark.parametrize("value", [b"abc", b"-1", b"1e3", b" "])
async def test_malformed_content_length_is_a_400_problem(limited_app: FastAPI, value: bytes) -> None:
    async with running(limited_app):
        status, pulled, body = await call_asgi(limited_app, [(b"content-length", value)], [b"{}"])
    assert status == 400
    assert b"bad-content-length" in body
    assert pulled == 0


# --- content encoding ------------------------------------------------------------------------


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "br", "GZIP", "identity, gzip"])
async def test_a_content_encoded_body_is_a_415_problem(
    client: httpx.AsyncClient, make_token: TokenFactory, audit_events: list[logging.LogRecord], encoding: str
) -> None:
    response = await client.post(
        "/api/v1/orgs",
        content=gzip.compress(json.dumps({"name": "Acme"}).encode()),
        headers={**bearer(make_token()), "Content-Type": "application/json", "Content-Encoding": encoding},
    )
    body = assert_problem(response, 415)
    assert body["type"] == PROBLEM + "unsupported-content-encoding"
    assert_security_headers(response)
    assert "content_encoding_refused" in [record.getMessage() for record in audit_events]


async def test_an_identity_content_encoding_is_accepted(client: httpx.AsyncClient, make_token: TokenFactory) -> None:
    response = await client.post(
        "/api/v1/orgs", json={"name": "Acme"}, headers={**bearer(make_token()), "Content-Encoding": "identity"}
    )
    assert response.status_code == 201


# --- body read deadline ----------------------------------------------------------------------


async def send_slowly(app: FastAPI, token: str, chunks: int, every: float) -> tuple[int, dict[bytes, bytes], bytes]:
    """POST /api/v1/orgs with a body of `chunks` pieces, one every `every` seconds."""
    body = json.dumps({"name": "Acme"}).encode()
    pieces = [body] + [b" "] * (chunks - 1)  # trailing whitespace is still valid JSON
    messages: list[Message] = [
        {"type": "http.request", "body": piece, "more_body": index < len(pieces) - 1}
        for index, piece in enumerate(pieces)
    ]
    pulled = 0

    async def receive() -> Message:
        nonlocal pulled
        if pulled < len(messages):
            if pulled:
                await asyncio.sleep(every)
            pulled += 1
            return messages[pulled - 1]
        await asyncio.sleep(3600)  # no disconnect: the client just holds the connection
        raise AssertionError("unreachable")

    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    scope: dict[str, Any] = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/api/v1/orgs",
        "raw_path": b"/api/v1/orgs",
        "root_path": "",
        "query_string": b"",
        "headers": [
            (b"host", b"localhost"),
            (b"content-type", b"application/json"),
            (b"authorization", f"Bearer {token}".encode()),
        ],
        "client": ("203.0.113.7", 4711),
        "server": ("localhost", 80),
    }
    await app(scope, receive, send)
    start = next(message for message in sent if message["type"] == "http.response.start")
    content = b"".join(message.get("body", b"") for message in sent if message["type"] == "http.response.body")
    return start["status"], dict(start["headers"]), content


async def test_a_body_that_trickles_past_the_read_deadline_is_a_408_problem(
    settings_for: Callable[..., Settings], make_token: TokenFactory, audit_events: list[logging.LogRecord]
) -> None:
    app = create_app(settings_for(body_read_timeout_seconds=0.3))
    async with running(app):
        status, headers, content = await asyncio.wait_for(send_slowly(app, make_token(), chunks=20, every=0.1), 5)
    assert status == 408
    assert headers[b"content-type"] == b"application/problem+json"
    assert headers[b"connection"] == b"close"
    assert json.loads(content)["type"] == PROBLEM + "body-read-timeout"
    assert "body_read_timeout" in [record.getMessage() for record in audit_events]


async def test_a_body_that_arrives_in_pieces_within_the_deadline_is_read(
    settings_for: Callable[..., Settings], make_token: TokenFactory
) -> None:
    app = create_app(settings_for(body_read_timeout_seconds=2))
    async with running(app):
        status, _, _ = await send_slowly(app, make_token(), chunks=4, every=0.05)
    assert status == 201


def test_the_body_read_deadline_defaults_to_thirty_seconds(settings: Settings) -> None:
    assert settings.body_read_timeout_seconds == 30
