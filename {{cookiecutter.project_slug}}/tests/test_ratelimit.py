"""Layers 3 and 5, rate limits: per client address before authentication, per subject after it,
per route where declared; exact across replicas; a declared answer when Redis is down."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from redis.asyncio import Redis

from {{ cookiecutter.package_name }}.app import create_app
from {{ cookiecutter.package_name }}.config import Settings

from .conftest import TokenFactory, bearer, running
from .servers import RedisServer, start_redis

PROBE = "/api/v1/orgs/00000000-0000-0000-0000-000000000000"  # no token: 401 once admitted
RATELIMIT = re.compile(r'^"(?P<name>[^"]+)";r=(?P<r>\d+);t=(?P<t>\d+)$')


def remaining(response: httpx.Response, policy: str) -> int:
    fields = [field.strip() for field in response.headers.get("ratelimit", "").split(",")]
    for field in fields:
        match = RATELIMIT.match(field)
        if match and match["name"] == policy:
            return int(match["r"])
    raise AssertionError(f"no RateLimit field for {policy!r} in {fields}")


@pytest.fixture(scope="module")
def killable_redis(redis_server: RedisServer | None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """The session's redis-server, or a private one when REDIS_URL points elsewhere."""
    if redis_server is not None:
        yield redis_server
        return
    server = start_redis(Path(tmp_path_factory.mktemp("redis-outage")))
    yield server
    server.stop()


async def test_address_limit_admits_exactly_the_limit_then_answers_429_problem(
    settings_for: Callable[..., Settings],
) -> None:
    app = create_app(settings_for(rate_limit_ip="5/minute"))
    async with running(app) as client:
        admitted = [await client.get(PROBE) for _ in range(5)]
        refused = await client.get(PROBE)
    assert [r.status_code for r in admitted] == [401] * 5
    assert refused.status_code == 429
    assert refused.headers["content-type"] == "application/problem+json"
    body = refused.json()
    assert body["status"] == 429
    assert body["type"].endswith(":problem:rate-limited")
    assert body["trace_id"] == refused.headers["x-trace-id"]


async def test_address_limit_answers_before_the_token_is_parsed(
    settings_for: Callable[..., Settings], make_token: TokenFactory
) -> None:
    app = create_app(settings_for(rate_limit_ip="2/minute"))
    async with running(app) as client:
        for _ in range(2):
            await client.get(PROBE)
        refused = await client.get(PROBE, headers=bearer("not-a-token"))
        valid = await client.get(PROBE, headers=bearer(make_token()))
    assert refused.status_code == 429  # a garbage token would be 401 had authentication run
    assert "www-authenticate" not in refused.headers
    assert valid.status_code == 429


async def test_headers_count_down_and_429_carries_integer_retry_after(
    settings_for: Callable[..., Settings], make_token: TokenFactory
) -> None:
    app = create_app(settings_for(rate_limit_ip="3/minute", rate_limit_subject="100/15minutes"))
    alice = bearer(make_token("alice"))
    async with running(app) as client:
        created = await client.post("/api/v1/orgs", json={"name": "Acme"}, headers=alice)
        org = f"/api/v1/orgs/{created.json()['id']}"
        second, third, fourth = [await client.get(org, headers=alice) for _ in range(3)]
    assert created.status_code == 201
    assert created.headers.get_list("ratelimit-policy") == ['"ip";q=3;w=60', '"subject";q=100;w=900']
    assert (remaining(created, "ip"), remaining(created, "subject")) == (2, 99)
    assert (second.status_code, remaining(second, "ip"), remaining(second, "subject")) == (200, 1, 98)
    assert (third.status_code, remaining(third, "ip"), remaining(third, "subject")) == (200, 0, 97)
    for success in (created, second, third):
        assert "retry-after" not in success.headers
        assert 0 < int(RATELIMIT.match(success.headers.get_list("ratelimit")[0])["t"]) <= 60  # type: ignore[index]
    assert fourth.status_code == 429
    assert remaining(fourth, "ip") == 0
    reset = int(RATELIMIT.match(fourth.headers["ratelimit"])["t"])  # type: ignore[index]
    assert fourth.headers["retry-after"] == str(max(1, reset))
    assert 1 <= int(fourth.headers["retry-after"]) <= 60


async def test_subject_limit_counts_each_subject_after_authentication(
    settings_for: Callable[..., Settings], make_token: TokenFactory
) -> None:
    app = create_app(settings_for(rate_limit_subject="2/minute"))
    alice, bob = bearer(make_token("alice")), bearer(make_token("bob"))
    async with running(app) as client:
        alice_responses = [await client.get(PROBE, headers=alice) for _ in range(3)]
        bob_response = await client.get(PROBE, headers=bob)
        anonymous = await client.get(PROBE)
    assert [r.status_code for r in alice_responses] == [403, 403, 429]
    assert remaining(alice_responses[2], "subject") == 0
    assert bob_response.status_code == 403
    assert remaining(bob_response, "subject") == 1
    assert anonymous.status_code == 401
    assert "subject" not in anonymous.headers.get("ratelimit-policy", "")


async def test_grant_changes_have_a_per_route_limit_per_subject(
    client: httpx.AsyncClient, make_token: TokenFactory
) -> None:
    alice, bob = bearer(make_token("alice")), bearer(make_token("bob"))
    org = (await client.post("/api/v1/orgs", json={"name": "Acme"}, headers=alice)).json()["id"]
    grants = [
        await client.put(f"/api/v1/orgs/{org}/grants/user{i}", json={"relation": "viewer"}, headers=alice)
        for i in range(11)
    ]
    assert [r.status_code for r in grants[:10]] == [201] * 10
    assert '"put_grant";q=10;w=60' in grants[0].headers.get_list("ratelimit-policy")
    assert (remaining(grants[0], "put_grant"), remaining(grants[9], "put_grant")) == (9, 0)
    refused = grants[10]
    assert refused.status_code == 429
    assert refused.json()["type"].endswith(":problem:rate-limited")
    assert int(refused.headers["retry-after"]) >= 1
    assert remaining(refused, "put_grant") == 0
    # Another subject has its own count: it reaches authorization (not the owner, so 403).
    other = await client.put(f"/api/v1/orgs/{org}/grants/user0", json={"relation": "owner"}, headers=bob)
    assert other.status_code == 403
    # Other routes of the same subject are not affected.
    assert (await client.get(f"/api/v1/orgs/{org}", headers=alice)).status_code == 200


async def test_health_probes_are_never_limited(settings_for: Callable[..., Settings]) -> None:
    app = create_app(settings_for(rate_limit_ip="1/minute"))
    async with running(app) as client:
        probes = [await client.get("/health/live") for _ in range(5)]
    assert [r.status_code for r in probes] == [200] * 5
    assert all("ratelimit" not in r.headers for r in probes)


async def test_spoofed_forwarded_for_does_not_escape_the_address_limit(
    settings_for: Callable[..., Settings],
) -> None:
    app = create_app(settings_for(rate_limit_ip="3/minute", trusted_proxies=[]))
    async with running(app) as client:
        statuses = [
            (await client.get(PROBE, headers={"X-Forwarded-For": f"198.51.100.{i}"})).status_code for i in range(5)
        ]
    assert statuses == [401, 401, 401, 429, 429]


async def test_behind_a_trusted_proxy_each_client_is_limited_separately(
    settings_for: Callable[..., Settings],
) -> None:
    app = create_app(settings_for(rate_limit_ip="2/minute", trusted_proxies=["10.0.0.0/8"]))
    async with running(app, client=("10.1.2.3", 5000)) as proxy:
        first = [(await proxy.get(PROBE, headers={"X-Forwarded-For": "198.51.100.1"})).status_code for _ in range(3)]
        second = [(await proxy.get(PROBE, headers={"X-Forwarded-For": "198.51.100.2"})).status_code for _ in range(3)]
    assert first == [401, 401, 429]
    assert second == [401, 401, 429]


async def test_two_replicas_sharing_redis_admit_exactly_the_limit_under_concurrency(
    settings_for: Callable[..., Settings],
) -> None:
    # A generous store timeout: 200 connections opening at once on a loaded machine must not turn
    # into 503s, since this test is about exactness, not latency.
    settings = settings_for(rate_limit_ip="50/minute", redis_timeout_seconds=10)
    one, two = create_app(settings), create_app(settings)
    async with running(one) as first, running(two, reset=False) as second:
        responses = await asyncio.gather(*(client.get(PROBE) for _ in range(100) for client in (first, second)))
    statuses = [r.status_code for r in responses]
    assert statuses.count(401) == 50
    assert statuses.count(429) == 150
    # Count and remaining come from one atomic step: every admitted request saw a different count.
    assert sorted(remaining(r, "ip") for r in responses if r.status_code == 401) == list(range(50))


async def test_memory_storage_without_redis_admits_exactly_the_limit(settings_for: Callable[..., Settings]) -> None:
    app = create_app(settings_for(redis_url=None, rate_limit_ip="4/minute"))
    async with running(app) as client:
        responses = await asyncio.gather(*(client.get(PROBE) for _ in range(10)))
    assert sorted(r.status_code for r in responses) == [401] * 4 + [429] * 6
    assert sorted(remaining(r, "ip") for r in responses if r.status_code == 401) == [0, 1, 2, 3]


class Events(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.names.append(getattr(record, "event", ""))


async def test_redis_outage_answers_503_when_failing_closed_and_recovers_without_restart(
    settings_for: Callable[..., Settings], killable_redis: RedisServer
) -> None:
    app = create_app(settings_for(redis_url=killable_redis.url, rate_limit_failure_mode="closed"))
    async with running(app) as client:
        assert (await client.get(PROBE)).status_code == 401
        killable_redis.kill()
        try:
            down = await asyncio.wait_for(client.get(PROBE), 3)
            health = await asyncio.wait_for(client.get("/health/live"), 3)
        finally:
            killable_redis.restart()
        recovered = await asyncio.wait_for(client.get(PROBE), 3)
    assert down.status_code == 503
    assert down.headers["content-type"] == "application/problem+json"
    assert down.json()["type"].endswith(":problem:dependency-unavailable")
    assert "127.0.0.1" not in down.text and "Error" not in down.text
    assert "ratelimit" not in down.headers
    assert health.status_code == 200
    assert recovered.status_code == 401
    assert remaining(recovered, "ip") == 10000 - 1  # a fresh server: counting starts over


async def test_redis_outage_serves_when_failing_open_warns_once_and_recovers(
    settings_for: Callable[..., Settings], killable_redis: RedisServer, make_token: TokenFactory
) -> None:
    app = create_app(settings_for(redis_url=killable_redis.url, rate_limit_failure_mode="open"))
    events = Events()
    logging.getLogger("audit").addHandler(events)
    alice = bearer(make_token("alice"))
    try:
        async with running(app) as client:
            org = (
                f"/api/v1/orgs/{(await client.post('/api/v1/orgs', json={'name': 'Acme'}, headers=alice)).json()['id']}"
            )
            killable_redis.kill()
            try:
                served = [await asyncio.wait_for(client.get(org, headers=alice), 3) for _ in range(3)]
            finally:
                killable_redis.restart()
            recovered = await asyncio.wait_for(client.get(org, headers=alice), 3)
    finally:
        logging.getLogger("audit").removeHandler(events)
    assert [r.status_code for r in served] == [200] * 3
    assert all("ratelimit" not in r.headers for r in served)
    assert events.names.count("rate_limit_store_unavailable") == 1
    assert recovered.status_code == 200
    assert remaining(recovered, "subject") == 10000 - 1


async def test_ipv6_clients_share_the_address_limit_of_their_64(settings_for: Callable[..., Settings]) -> None:
    app = create_app(settings_for(rate_limit_ip="2/minute"))
    statuses: list[int] = []
    for client in ("2001:db8:1:2::1", "2001:db8:1:2:ffff::7", "2001:db8:1:2:abcd::9", "2001:db8:1:3::1"):
        async with running(app, client=(client, 4711), reset=not statuses) as http:
            statuses.append((await http.get(PROBE)).status_code)
    # Three addresses of one /64 spend one bucket of two; another /64 has its own.
    assert statuses == [401, 401, 429, 401]


async def test_a_known_token_gets_all_three_answers_in_one_round_trip(
    settings_for: Callable[..., Settings], make_token: TokenFactory, redis_url: str
) -> None:
    """Layers 3-5 share one round trip for a token verified before: the address window, the
    address's lockout, the revocation lookup and the subject window (admission.py)."""
    app = create_app(settings_for(redis_url=redis_url))
    token = bearer(make_token("alice"))
    async with running(app) as http, Redis.from_url(redis_url) as redis:

        async def counted(request: bool) -> tuple[int, int]:
            """Reads Redis served (one per round trip) and scripts it ran, around one request."""
            reads = (await redis.info("stats"))["total_reads_processed"]
            scripts = (await redis.info("commandstats")).get("cmdstat_evalsha", {}).get("calls", 0)
            if request:
                assert (await http.get(PROBE, headers=token)).status_code == 403
            scripts = (await redis.info("commandstats")).get("cmdstat_evalsha", {}).get("calls", 0) - scripts
            return (await redis.info("stats"))["total_reads_processed"] - reads, scripts

        assert (await http.get(PROBE, headers=token)).status_code == 403  # verified, now cached
        idle_reads, _ = await counted(request=False)  # this test's own INFO commands
        reads, scripts = await counted(request=True)
    assert scripts == 2  # the address window with its lockout; the revocation lookup with the subject window
    assert reads - idle_reads == 1  # in one round trip
