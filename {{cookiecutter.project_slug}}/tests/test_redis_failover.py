"""Redis failover and resharding under traffic, against real redis-server processes on loopback:
nothing revoked is served again, and the declared failure mode lasts no longer than the topology
change itself. Sentinel: `SENTINEL FAILOVER` (planned) and a killed primary (unplanned), timed from
the sentinels' `+switch-master` announcement. Cluster: slots migrating under traffic (`TRYAGAIN`,
`ASK`, `NOSCRIPT` on the importing node) and `redis-cli --cluster reshard`."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from redis.asyncio import Redis

from {{ cookiecutter.package_name }}.app import create_app
from {{ cookiecutter.package_name }}.cli import main
from {{ cookiecutter.package_name }}.config import Settings
from {{ cookiecutter.package_name }}.store import redis_store
from {{ cookiecutter.package_name }}.store.sentinel import SentinelStore

from .conftest import AUDIENCE, ISSUER, TokenFactory, bearer, running
from .servers import LOOPBACK, SENTINEL_SERVICE, SentinelGroup, redis_client, start_sentinel_group, wait_for

PROBE = "/api/v1/orgs/00000000-0000-0000-0000-000000000000"  # with a token: 403 once admitted (not a member)
# Nothing refused but what the test is about: no limit reached, no lockout from the revoked tokens.
UNLIMITED = {"rate_limit_ip": "1000000/minute", "rate_limit_subject": "1000000/minute", "lockout_failures": 10_000}
BOUND_SECONDS = 1.0  # the issue's bound: after the announcement, after a revocation, after a lift
DEMOTION_SECONDS = 20  # Sentinel demotes the old primary about 8-10 s after a SENTINEL FAILOVER


@pytest.fixture
def operator_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, public_pem: str) -> Callable[[str], None]:
    """The environment the operators' CLI reads, with REDIS_URL set to `url`."""
    monkeypatch.chdir(tmp_path)  # no .env file

    def use(url: str) -> None:
        base = {"ENVIRONMENT": "test", "JWT_PUBLIC_KEY": public_pem, "JWT_ISSUER": ISSUER, "JWT_AUDIENCE": AUDIENCE}
        for name, value in {**base, "REDIS_URL": url}.items():
            monkeypatch.setenv(name, value)

    return use


async def cli(*args: str) -> float:
    """Run the operators' command (its own event loop, in a thread); when it returned."""
    assert await asyncio.to_thread(main, list(args)) == 0
    return time.monotonic()


@asynccontextmanager
async def switch_announcements(group: SentinelGroup) -> AsyncIterator[asyncio.Future[float]]:
    """When any sentinel of the group first announces `+switch-master` (time.monotonic())."""
    announced: asyncio.Future[float] = asyncio.get_running_loop().create_future()
    clients = [Redis(host=LOOPBACK, port=sentinel.port) for sentinel in group.sentinels]

    async def listen(client: Redis) -> None:
        async with client.pubsub() as pubsub:
            await pubsub.subscribe("+switch-master")
            subscribed.release()
            async for message in pubsub.listen():
                if message["type"] == "message" and not announced.done():
                    announced.set_result(time.monotonic())

    subscribed = asyncio.Semaphore(0)
    listeners = [asyncio.ensure_future(listen(client)) for client in clients]
    try:
        for _ in clients:
            await asyncio.wait_for(subscribed.acquire(), 10)
        yield announced
    finally:
        for listener in listeners:
            listener.cancel()
        await asyncio.gather(*listeners, return_exceptions=True)
        for client in clients:
            await client.aclose()


Answer = tuple[float, str, int]  # sent at (time.monotonic()), token name, status


async def steady_traffic(client: httpx.AsyncClient, tokens: dict[str, str], stop: asyncio.Event) -> list[Answer]:
    answers: list[Answer] = []
    while not stop.is_set():
        for name, token in tokens.items():
            sent = time.monotonic()
            answers.append((sent, name, (await client.get(PROBE, headers=bearer(token))).status_code))
        await asyncio.sleep(0.02)
    return answers


def script_calls(port: int) -> int:
    """How many script calls (EVALSHA, EVAL) a node has run; sentinels and replication send none."""
    with redis_client(port) as client:
        stats: dict[str, Any] = client.info("commandstats")
    return sum(int(stats.get(f"cmdstat_{name}", {}).get("calls", 0)) for name in ("evalsha", "eval"))


def is_replica(port: int) -> bool:
    with redis_client(port) as client:
        return bool(client.execute_command("ROLE")[0] == "slave")


async def sentinel_replicas(
    stack: AsyncExitStack, settings: Settings, count: int = 2
) -> tuple[list[FastAPI], list[httpx.AsyncClient]]:
    apps = [create_app(settings) for _ in range(count)]
    clients = [
        await stack.enter_async_context(running(app, client=(f"192.0.2.{index + 1}", 4711), reset=False))
        for index, app in enumerate(apps)
    ]
    return apps, clients


# --- Sentinel: a planned failover -------------------------------------------------------------


async def test_after_sentinel_failover_no_command_reaches_the_old_primary_and_revocations_hold(
    tmp_path: Path,
    settings_for: Callable[..., Settings],
    make_token: TokenFactory,
    operator_env: Callable[[str], None],
) -> None:
    group = start_sentinel_group(tmp_path)
    old = group.primary
    operator_env(group.url)
    names = ["kept", "at-announcement", "two-seconds-later", "after-demotion"]
    tokens = {name: make_token(name) for name in names}
    try:
        async with AsyncExitStack() as stack:
            _, clients = await sentinel_replicas(
                stack, settings_for(redis_url=group.url, redis_timeout_seconds=2, **UNLIMITED)
            )
            for client in clients:
                assert (await client.get(PROBE, headers=bearer(tokens["kept"]))).status_code == 403
            announced_at = await stack.enter_async_context(switch_announcements(group))
            stop = asyncio.Event()
            traffic = [asyncio.ensure_future(steady_traffic(client, tokens, stop)) for client in clients]
            await asyncio.sleep(0.3)
            with redis_client(group.sentinels[0].port) as sentinel:
                assert sentinel.execute_command("SENTINEL", "FAILOVER", SENTINEL_SERVICE)
            announced = await asyncio.wait_for(announced_at, 10)
            revoked = {"at-announcement": await cli("token", "revoke-subject", "--sub", "at-announcement")}
            await asyncio.sleep(max(0.0, announced + BOUND_SECONDS - time.monotonic()))
            calls_on_old = await asyncio.to_thread(script_calls, old.port)
            await asyncio.sleep(max(0.0, announced + 2 - time.monotonic()))
            revoked["two-seconds-later"] = await cli("token", "revoke-subject", "--sub", "two-seconds-later")
            await asyncio.to_thread(
                wait_for, lambda: is_replica(old.port), "the old primary's demotion", DEMOTION_SECONDS
            )
            demoted = time.monotonic()
            revoked["after-demotion"] = await cli("token", "revoke-subject", "--sub", "after-demotion")
            await asyncio.sleep(BOUND_SECONDS + 0.5)
            stop.set()
            answers = await asyncio.gather(*traffic)
        assert group.primary_port() == group.replica.port
        assert await asyncio.to_thread(script_calls, old.port) == calls_on_old  # nothing after the announcement
    finally:
        group.stop()

    for replica in answers:
        late = [
            (round(sent - announced, 2), status) for sent, name, status in replica if sent > announced + BOUND_SECONDS
        ]
        assert late, "no traffic after the announcement"
        kept = {status for sent, name, status in replica if name == "kept" and sent > announced + BOUND_SECONDS}
        assert kept == {403}, [answer for answer in late if answer[1] != 403]  # no 503 after the bound
        for name, at in revoked.items():
            served = [
                round(sent - at, 2)
                for sent, token, status in replica
                if token == name and sent > at + BOUND_SECONDS and status != 401
            ]
            assert not served, (name, served)  # refused by every replica within the bound, and from then on
    assert demoted - announced < DEMOTION_SECONDS


# --- Sentinel: the announcement missed, the old primary demoted ----------------------------------


async def test_a_readonly_reply_asks_the_sentinels_and_resends_to_the_primary_never_the_same_node(
    tmp_path: Path, settings_for: Callable[..., Settings]
) -> None:
    group = start_sentinel_group(tmp_path)
    store = redis_store(settings_for(redis_url=group.url, redis_timeout_seconds=2, **UNLIMITED))
    assert isinstance(store, SentinelStore)
    try:
        await store.ping()
        primary = store.primary
        assert primary is not None and primary[1] == group.primary.port
        key = b"test:readonly"
        # As if an announcement had been missed and the store still wrote to a node now demoted: its
        # connections go to the replica, which answers READONLY.
        await store._follow((LOOPBACK, group.replica.port), store._epoch)
        assert await store.execute(b"SET", key, b"1") == b"OK"  # resent to the primary the sentinels name
        assert store.primary == primary
        with redis_client(group.primary.port) as client:
            assert client.get(key) == "1"
    finally:
        await store.aclose()
        group.stop()


# --- Sentinel: an unplanned failover ------------------------------------------------------------


@pytest.mark.parametrize(("mode", "in_between"), [("closed", 503), ("open", 403)])
async def test_a_killed_primary_gives_the_failure_mode_until_the_announcement_only(
    tmp_path: Path, settings_for: Callable[..., Settings], make_token: TokenFactory, mode: str, in_between: int
) -> None:
    group = start_sentinel_group(tmp_path)
    tokens = {"kept": make_token("kept")}
    try:
        settings = settings_for(redis_url=group.url, rate_limit_failure_mode=mode, redis_timeout_seconds=2, **UNLIMITED)
        async with AsyncExitStack() as stack:
            _, clients = await sentinel_replicas(stack, settings)
            for client in clients:
                assert (await client.get(PROBE, headers=bearer(tokens["kept"]))).status_code == 403
            announced_at = await stack.enter_async_context(switch_announcements(group))
            stop = asyncio.Event()
            traffic = [asyncio.ensure_future(steady_traffic(client, tokens, stop)) for client in clients]
            await asyncio.sleep(0.3)
            group.primary.kill()  # SIGKILL
            killed = time.monotonic()
            announced = await asyncio.wait_for(announced_at, 15)
            await asyncio.sleep(BOUND_SECONDS + 0.5)
            stop.set()
            answers = await asyncio.gather(*traffic)
        assert group.primary_port() == group.replica.port
    finally:
        group.stop()
    for replica in answers:
        assert {status for sent, _, status in replica if sent < killed} == {403}
        # Between the kill and the announcement: the declared failure mode, never a 500.
        assert {status for sent, _, status in replica if killed < sent < announced} <= {403, in_between}
        late = [(round(sent - announced, 2), status) for sent, _, status in replica if sent > announced + BOUND_SECONDS]
        assert late and {status for _, status in late} == {403}, late
