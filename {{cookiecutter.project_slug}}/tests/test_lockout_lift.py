"""`lockout lift`: an operator lifts the lock of an address or a subject, and every replica lets it
in within a second, although each replica refuses a locked address from its own memory. Against a
real Sentinel group and a real Redis Cluster."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from contextlib import AsyncExitStack
from pathlib import Path

import httpx
import jwt
import pytest

from {{ cookiecutter.package_name }}.app import create_app
from {{ cookiecutter.package_name }}.config import Settings

from .conftest import TokenFactory, bearer, principal, running
from .servers import start_cluster, start_sentinel_group
from .test_redis_failover import BOUND_SECONDS, PROBE, cli, operator_env

__all__ = ["operator_env"]  # a fixture, used by name

FAILURES = 3


@pytest.fixture(params=["sentinel", "cluster"])
def topology_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sentinel":
        group = start_sentinel_group(tmp_path)
        yield group.url
        group.stop()
    else:
        cluster = start_cluster(tmp_path)
        yield cluster.url
        cluster.stop()


async def statuses_after(
    clients: list[httpx.AsyncClient], token: str, since: float, seconds: float
) -> list[tuple[float, int]]:
    """Each replica's answers to `token` for `seconds`: (sent, from `since`), status."""
    answers: list[tuple[float, int]] = []
    while time.monotonic() < since + seconds:
        for client in clients:
            sent = time.monotonic()
            answers.append((round(sent - since, 3), (await client.get(PROBE, headers=bearer(token))).status_code))
        await asyncio.sleep(0.02)
    return answers


async def test_a_lifted_lockout_lets_the_address_and_the_subject_in_on_every_replica_within_a_second(
    topology_url: str,
    settings_for: Callable[..., Settings],
    make_token: TokenFactory,
    operator_env: Callable[[str], None],
) -> None:
    operator_env(topology_url)
    settings = settings_for(
        redis_url=topology_url, redis_timeout_seconds=2, lockout_failures=FAILURES, lockout_seconds=600
    )
    apps = [create_app(settings) for _ in range(2)]
    async with AsyncExitStack() as stack:

        async def at(address: str) -> list[httpx.AsyncClient]:
            return [await stack.enter_async_context(running(app, client=(address, 4711), reset=False)) for app in apps]

        # An address locked by refused credentials; each replica now refuses it from memory.
        locked_address = await at("198.51.100.9")
        alice = make_token("alice")
        for attempt in range(FAILURES):
            assert (await locked_address[attempt % 2].get(PROBE, headers=bearer(alice + "x"))).status_code == 401
        assert [(await c.get(PROBE, headers=bearer(alice))).status_code for c in locked_address] == [429, 429]

        # A subject locked by its verified tokens refused (a revoked one), from addresses of their own.
        revoked, fresh = make_token("sam"), make_token("sam")
        claims = jwt.decode(revoked, options={"verify_signature": False})
        assert await apps[0].state.runtime.revocations.revoke_token(principal("sam"), claims["jti"], claims["exp"])
        for attempt in range(FAILURES):
            client = (await at(f"192.0.2.{attempt + 1}"))[attempt % 2]
            assert (await client.get(PROBE, headers=bearer(revoked))).status_code == 401
        elsewhere = await at("203.0.113.50")
        assert [(await c.get(PROBE, headers=bearer(fresh))).status_code for c in elsewhere] == [429, 429]

        lifted = await cli("lockout", "lift", "--address", "198.51.100.9")
        address_answers = await statuses_after(locked_address, alice, lifted, BOUND_SECONDS + 0.5)
        lifted = await cli("lockout", "lift", "--sub", "sam")
        subject_answers = await statuses_after(elsewhere, fresh, lifted, BOUND_SECONDS + 0.5)

    for answers in (address_answers, subject_answers):
        assert {status for sent, status in answers if sent > BOUND_SECONDS} == {403}, answers
        assert {status for _, status in answers} <= {403, 429}, answers
