"""Bursts against the real process: a traffic spike must queue for Redis connections, never look
like a Redis outage (503, or in `open` mode a skipped revocation check), and readiness probes
must not multiply into checks.

These run the service as production does (its own uvicorn process) against the session's real
redis-server and database, with hundreds of requests in flight at once on hundreds of connections.
"""

from __future__ import annotations

import asyncio
import collections
import uuid

import httpx
import jwt
import pytest
from redis.asyncio import Redis

from {{ cookiecutter.package_name }}.cli import main

from .conftest import ServiceFactory, TokenFactory, bearer
from .servers import ServiceProcess

CONNECTIONS = 250
REQUESTS = 300


@pytest.fixture
def service(start_service: ServiceFactory) -> ServiceFactory:
    def start(**settings: str) -> ServiceProcess:
        defaults = {
            "RATE_LIMIT_IP": "100000/minute",
            "RATE_LIMIT_SUBJECT": "100000/minute",
            "LOCKOUT_FAILURES": "10000",  # the bursts' tampered tokens all come from one address
            "LOG_LEVEL": "WARNING",
        }
        return start_service(**{**defaults, **settings})

    return start


async def burst(base_url: str, requests: list[tuple[str, str, dict[str, str], dict[str, str] | None]]) -> list[int]:
    """Send every request at once, on up to CONNECTIONS connections; their statuses."""
    limits = httpx.Limits(max_connections=CONNECTIONS, max_keepalive_connections=CONNECTIONS)
    async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=30) as http:
        responses = await asyncio.gather(
            *(http.request(method, path, headers=headers, json=body) for method, path, headers, body in requests)
        )
    failures = collections.Counter(r.json().get("type") for r in responses if r.status_code >= 500)
    assert not failures, f"5xx problem types: {dict(failures)}"
    return [response.status_code for response in responses]


async def create_org(base_url: str, token: str) -> str:
    async with httpx.AsyncClient(base_url=base_url, timeout=10) as http:
        response = await http.post("/api/v1/orgs", json={"name": "burst"}, headers=bearer(token))
    assert response.status_code == 201, response.text
    return f"/api/v1/orgs/{response.json()['id']}"


async def test_mixed_burst_gets_no_5xx(service: ServiceFactory, make_token: TokenFactory) -> None:
    process = service()
    alice, bob = make_token("alice"), make_token("bob")
    org = await create_org(process.base_url, alice)
    kinds: list[tuple[str, str, dict[str, str], dict[str, str] | None]] = [
        ("GET", org, bearer(alice), None),  # authorized read
        ("POST", f"{org}/users", bearer(alice), None),  # write (body filled in below)
        ("GET", org, bearer(bob), None),  # another subject's org: 403
        ("GET", org, bearer(make_token("alice", key=None) + "x"), None),  # tampered token: 401
        ("GET", org, {}, None),  # no token: 401
    ]
    requests = []
    for number in range(REQUESTS):
        method, path, headers, _ = kinds[number % len(kinds)]
        body = (
            {"email": f"u{number}-{uuid.uuid4().hex[:8]}@example.com", "role": "viewer"} if method == "POST" else None
        )
        requests.append((method, path, headers, body))
    statuses = await burst(process.base_url, requests)
    counted = collections.Counter(statuses)
    assert not [status for status in statuses if status >= 500], counted
    assert counted[200] == REQUESTS // len(kinds)
    assert counted[201] == REQUESTS // len(kinds)
    assert counted[403] == REQUESTS // len(kinds)
    assert counted[401] == 2 * REQUESTS // len(kinds)


async def test_burst_of_anonymous_requests_gets_only_401(service: ServiceFactory) -> None:
    process = service()
    statuses = await burst(process.base_url, [("GET", f"/api/v1/orgs/{uuid.uuid4()}", {}, None)] * REQUESTS)
    assert collections.Counter(statuses) == {401: REQUESTS}


async def test_open_mode_never_serves_a_revoked_token_in_a_burst(
    service: ServiceFactory, make_token: TokenFactory, cli_env: None
) -> None:
    process = service(RATE_LIMIT_FAILURE_MODE="open")
    token = make_token("alice")
    org = await create_org(process.base_url, token)  # the token is now in the service's verified cache
    claims = jwt.decode(token, options={"verify_signature": False})
    argv = ["token", "revoke", "--sub", claims["sub"], "--jti", claims["jti"], "--exp", str(claims["exp"])]
    assert await asyncio.to_thread(main, argv) == 0
    statuses = await burst(process.base_url, [("GET", org, bearer(token), None)] * REQUESTS)
    # Refused, each one: 401 for the revoked token, or 503 where this process was too overloaded
    # to read Redis's answer in time (store.Deadline) - never served without the check.
    assert set(collections.Counter(statuses)) <= {401, 503}
    assert collections.Counter(statuses)[401] > 0


async def test_readiness_probes_in_a_burst_share_one_check(service: ServiceFactory, redis_url: str) -> None:
    process = service()
    async with Redis.from_url(redis_url) as redis:
        before = (await redis.info("commandstats")).get("cmdstat_ping", {}).get("calls", 0)
        statuses = await burst(process.base_url, [("GET", "/health/ready", {}, None)] * 200)
        after = (await redis.info("commandstats")).get("cmdstat_ping", {}).get("calls", 0)
    assert collections.Counter(statuses) == {200: 200}
    assert after - before <= 2  # one check, two if the burst straddles the cache's one second
