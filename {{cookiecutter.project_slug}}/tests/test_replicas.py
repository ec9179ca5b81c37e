"""Three replicas of the service (real `serve` processes) behind the shipped nginx configuration
(deploy/nginx/nginx.conf, with only its listen and upstream includes written here), sharing one
redis-server, TRUSTED_PROXIES set to the proxy.

The shipped nginx overwrites X-Forwarded-For with the address it saw (`$remote_addr`), so clients
are told apart only by that header: they connect from different loopback addresses (127.0.0.2,
127.0.0.3, ...) while every replica sees the same peer, nginx at 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import anyio
import httpx
import jwt
import pytest
from redis import Redis

from {{ cookiecutter.package_name }}.cli import main

from .conftest import AUDIENCE, ISSUER, TokenFactory, bearer
from .servers import LOOPBACK, NginxProxy, ServiceProcess, replicas_behind_nginx

PROJECT = Path(__file__).resolve().parent.parent
NGINX_CONF = PROJECT / "deploy" / "nginx" / "nginx.conf"
REPLICAS = 3
IP_LIMIT = 12
CLIENTS = ("127.0.0.2", "127.0.0.3")
SPOOFER = "127.0.0.4"


@dataclass
class Fleet:
    replicas: list[ServiceProcess]
    proxy: NginxProxy

    def client(self, source: str | None = None, *, base_url: str | None = None) -> httpx.AsyncClient:
        transport = httpx.AsyncHTTPTransport(local_address=source) if source else httpx.AsyncHTTPTransport()
        return httpx.AsyncClient(
            transport=transport, base_url=base_url or self.proxy.url, headers={"Host": "localhost"}, timeout=15
        )

    def clients_seen(self, replica: ServiceProcess) -> Counter[str]:
        """The client addresses in a replica's request log lines."""
        seen: Counter[str] = Counter()
        for line in replica.log_path.read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if record.get("event") == "request":
                seen[str(record.get("client"))] += 1
        return seen


@pytest.fixture(scope="module")
def fleet(
    migrated_database: str, redis_url: str, public_pem: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Fleet]:
    directory = tmp_path_factory.mktemp("replicas")
    fleet_redis = redis_url.rsplit("/", 1)[0] + "/5"  # a database of its own: empty buckets
    with Redis.from_url(fleet_redis) as redis:
        redis.flushdb()
    env = {
        "ENVIRONMENT": "test",
        "DATABASE_URL": migrated_database,
        "REDIS_URL": fleet_redis,
        "JWT_PUBLIC_KEY": public_pem,
        "JWT_ISSUER": ISSUER,
        "JWT_AUDIENCE": AUDIENCE,
        "TRUSTED_PROXIES": LOOPBACK,
        "TRUSTED_HOSTS": "localhost",
        "RATE_LIMIT_IP": f"{IP_LIMIT}/minute",
        "RATE_LIMIT_SUBJECT": "100000/minute",
        "LOCKOUT_FAILURES": "10000",
        "LOG_CLIENT_ADDRESS": "full",  # the tests read the address the service resolved in its log
    }
    with replicas_behind_nginx(env, directory, REPLICAS, NGINX_CONF) as (replicas, proxy):
        yield Fleet(replicas, proxy)


async def burst(fleet: Fleet, source: str, count: int, headers: list[dict[str, str]]) -> Counter[int]:
    """`count` requests at once from `source` through nginx; their statuses."""
    async with fleet.client(source) as http:
        responses = await asyncio.gather(
            *(http.get("/api/v1/orgs/nonexistent", headers=headers[n % len(headers)]) for n in range(count))
        )
    return Counter(response.status_code for response in responses)


async def test_each_client_gets_exactly_its_limit_across_the_replicas(fleet: Fleet) -> None:
    # Every client at once, three times its limit each, spread round robin over the replicas.
    results = await asyncio.gather(*(burst(fleet, client, 3 * IP_LIMIT, [{}]) for client in CLIENTS))
    for client, statuses in zip(CLIENTS, results, strict=True):
        assert statuses == Counter({401: IP_LIMIT, 429: 2 * IP_LIMIT}), client
    # Each replica counted some of each client's requests: the limit held across all three.
    for replica in fleet.replicas:
        seen = fleet.clients_seen(replica)
        assert all(seen[client] > 0 for client in CLIENTS), (replica.port, seen)
        assert set(seen) <= {*CLIENTS, LOOPBACK}, seen  # LOOPBACK: the fixture's probe through nginx


async def test_a_client_cannot_leave_its_bucket_with_its_own_forwarding_headers(fleet: Fleet) -> None:
    spoofs = [
        {"X-Forwarded-For": f"203.0.113.{n}"} for n in range(1, 6)
    ] + [
        {"X-Forwarded-For": f"198.51.100.{n}, {LOOPBACK}"} for n in range(1, 4)
    ] + [{"Forwarded": "for=192.0.2.1"}, {"X-Real-IP": "192.0.2.2"}]  # fmt: skip
    statuses = await burst(fleet, SPOOFER, 3 * IP_LIMIT, spoofs)
    assert statuses == Counter({401: IP_LIMIT, 429: 2 * IP_LIMIT})
    # The replicas saw only the spoofer's real address.
    seen = Counter[str]()
    for replica in fleet.replicas:
        seen += fleet.clients_seen(replica)
    assert seen[SPOOFER] == 3 * IP_LIMIT
    assert not [client for client in seen if client.startswith(("203.0.113.", "198.51.100.", "192.0.2."))]


async def test_a_revocation_reaches_every_replica_within_a_second(
    fleet: Fleet, make_token: TokenFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    token = make_token("replicated")
    replica_urls = [replica.base_url for replica in fleet.replicas]

    polls = iter(range(1, 10_000))

    async def status_on(url: str) -> int:
        # Straight to one replica, playing the proxy (127.0.0.1): each poll forwards a client
        # address of its own, so the polling never meets the address limit.
        n = next(polls)
        headers = {**bearer(token), "X-Forwarded-For": f"100.64.{n // 256}.{n % 256}"}
        async with fleet.client(base_url=url) as http:
            return (await http.get("/api/v1/orgs/nonexistent", headers=headers)).status_code

    before = [await status_on(url) for url in replica_urls]
    assert 401 not in before and 429 not in before, before

    claims = jwt.decode(token, options={"verify_signature": False})
    for name, value in {"ENVIRONMENT": "test", "REDIS_URL": fleet.replicas[0].env["REDIS_URL"]}.items():
        monkeypatch.setenv(name, value)
    for name in ("JWT_PUBLIC_KEY", "JWT_ISSUER", "JWT_AUDIENCE"):
        monkeypatch.setenv(name, fleet.replicas[0].env[name])
    argv = ["token", "revoke", "--sub", claims["sub"], "--jti", claims["jti"], "--exp", str(claims["exp"])]
    assert await anyio.to_thread.run_sync(main, argv) == 0
    revoked = time.monotonic()

    pending = set(replica_urls)
    while pending and time.monotonic() - revoked < 1:
        statuses = await asyncio.gather(*(status_on(url) for url in sorted(pending)))
        pending -= {url for url, status in zip(sorted(pending), statuses, strict=True) if status == 401}
    assert not pending, f"still accepting the revoked token after 1 s: {sorted(pending)}"
    async with fleet.client("127.0.0.5") as http:
        through_proxy = [(await http.get("/health/live")).status_code for _ in range(REPLICAS)]
        refused = [
            (await http.get("/api/v1/orgs/nonexistent", headers=bearer(token))).status_code for _ in range(REPLICAS)
        ]
    assert through_proxy == [200] * REPLICAS
    assert refused == [401] * REPLICAS
