"""Lockout: repeated authentication failures from one address (or, for verified but refused tokens,
of one subject) lock it out, for a period that doubles on each repeat; shared by replicas through
Redis. Against the real process and redis-server."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import jwt
import pytest
from redis.asyncio import Redis

from {{ cookiecutter.package_name }}.cli import main
from {{ cookiecutter.package_name }}.config import SERVICE_NAME
from {{ cookiecutter.package_name }}.security.revocation import tag

from .conftest import AUDIENCE, ISSUER, ServiceFactory, TokenFactory, bearer, principal
from .servers import ServiceProcess, redis_client, start_redis

FAILURES = 3


@pytest.fixture
def service(start_service: ServiceFactory) -> ServiceFactory:
    def start(**settings: str) -> ServiceProcess:
        defaults = {
            "RATE_LIMIT_IP": "100000/minute",
            "RATE_LIMIT_SUBJECT": "100000/minute",
            "TRUSTED_PROXIES": "127.0.0.1",  # clients choose their address with X-Forwarded-For
            "LOCKOUT_FAILURES": str(FAILURES),
            "LOCKOUT_WINDOW_SECONDS": "60",
            "LOCKOUT_SECONDS": "1",
            "LOCKOUT_MAX_SECONDS": "60",
        }
        return start_service(**{**defaults, **settings})

    return start


@pytest.fixture(autouse=True)
async def empty_redis(redis: Redis) -> None:
    """Each test starts with no failures counted and no address locked."""
    await redis.flushdb()


async def call(process: ServiceProcess, token: str, address: str = "198.51.100.7") -> httpx.Response:
    async with httpx.AsyncClient(base_url=process.base_url, timeout=10) as http:
        return await http.post(
            "/api/v1/orgs", json={"name": "lockout"}, headers={**bearer(token), "X-Forwarded-For": address}
        )


def log_of(process: ServiceProcess) -> str:
    return Path(process.log_path).read_text()


async def test_the_failure_after_the_limit_is_locked_out_then_the_lock_expires_and_doubles(
    service: ServiceFactory, make_token: TokenFactory
) -> None:
    process = service()
    good, bad = make_token("alice"), make_token("alice") + "x"
    for _ in range(FAILURES):
        assert (await call(process, bad)).status_code == 401
    locked = await call(process, good)  # even a valid token: the address is locked
    assert locked.status_code == 429
    assert locked.headers["Retry-After"] == "1"
    assert locked.headers["content-type"] == "application/problem+json"
    assert locked.json()["type"].endswith(":problem:locked-out")
    assert (await call(process, bad)).status_code == 429
    await asyncio.sleep(1.2)
    assert (await call(process, good)).status_code == 201  # the first lock has expired

    for _ in range(FAILURES):
        assert (await call(process, bad)).status_code == 401
    again = await call(process, good)
    assert again.status_code == 429
    assert again.headers["Retry-After"] == "2"  # the second lock is twice as long
    await asyncio.sleep(1.2)
    assert (await call(process, good)).status_code == 429
    await asyncio.sleep(1.0)
    assert (await call(process, good)).status_code == 201
    started = [line for line in log_of(process).splitlines() if "lockout_started" in line]
    assert len(started) == 2, started  # one event per lockout, not per request


async def test_successes_in_between_do_not_reset_the_failures(
    service: ServiceFactory, make_token: TokenFactory
) -> None:
    process = service()
    good, bad = make_token("alice"), make_token("alice") + "x"
    for failure in range(1, FAILURES + 1):
        assert (await call(process, bad)).status_code == 401
        if failure < FAILURES:
            assert (await call(process, good)).status_code == 201
    assert (await call(process, good)).status_code == 429


async def test_another_address_is_not_locked_out(service: ServiceFactory, make_token: TokenFactory) -> None:
    process = service()
    good, bad = make_token("alice"), make_token("alice") + "x"
    for _ in range(FAILURES):
        assert (await call(process, bad, "198.51.100.7")).status_code == 401
    assert (await call(process, good, "198.51.100.7")).status_code == 429
    assert (await call(process, good, "198.51.100.8")).status_code == 201


async def test_requests_without_a_credential_do_not_count_towards_the_lockout(
    service: ServiceFactory, make_token: TokenFactory
) -> None:
    """The lockout counts refused credentials; an anonymous request (a probe, a health checker on
    the wrong path) is answered 401 but must not lock the address out of its valid tokens."""
    process = service()
    async with httpx.AsyncClient(base_url=process.base_url, timeout=10) as http:
        for _ in range(FAILURES * 3):
            anonymous = await http.post(
                "/api/v1/orgs", json={"name": "lockout"}, headers={"X-Forwarded-For": "198.51.100.7"}
            )
            assert anonymous.status_code == 401
    assert (await call(process, make_token("alice"))).status_code == 201
    assert "lockout_started" not in log_of(process)


async def test_an_authorization_header_the_service_cannot_use_counts_towards_the_lockout(
    service: ServiceFactory, make_token: TokenFactory
) -> None:
    """An unknown scheme, a header sent twice, a tab for a space: credentials presented and refused,
    so they count as a bad token does (security/composition.py, rule 1)."""
    process = service()
    token = make_token("alice")
    unusable = [
        [("Authorization", "Basic YWxpY2U6cHc=")],
        [("Authorization", "Basic YWxpY2U6cHc="), ("Authorization", f"Bearer {token}")],
        [("Authorization", f"Bearer\t{token}")],
    ]
    assert len(unusable) == FAILURES
    async with httpx.AsyncClient(base_url=process.base_url, timeout=10) as http:
        for headers in unusable:
            refused = await http.post(
                "/api/v1/orgs", json={"name": "lockout"}, headers=[*headers, ("X-Forwarded-For", "198.51.100.7")]
            )
            assert refused.status_code == 401
    assert (await call(process, token)).status_code == 429


async def test_two_replicas_share_the_count(service: ServiceFactory, make_token: TokenFactory) -> None:
    first, second = service(), service()
    good, bad = make_token("alice"), make_token("alice") + "x"
    for replica in [first, second, first][:FAILURES]:
        assert (await call(replica, bad)).status_code == 401
    assert (await call(second, good)).status_code == 429
    assert (await call(first, good)).status_code == 429


async def test_a_subject_whose_verified_tokens_keep_being_refused_is_locked_from_any_address(
    service: ServiceFactory, make_token: TokenFactory, redis_url: str, public_pem: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    process = service()
    revoked = make_token("mallory")
    claims = jwt.decode(revoked, options={"verify_signature": False})
    for name, value in {"ENVIRONMENT": "test", "REDIS_URL": redis_url, "JWT_PUBLIC_KEY": public_pem,
                        "JWT_ISSUER": ISSUER, "JWT_AUDIENCE": AUDIENCE}.items():  # fmt: skip
        monkeypatch.setenv(name, value)
    argv = ["token", "revoke", "--sub", claims["sub"], "--jti", claims["jti"], "--exp", str(claims["exp"])]
    assert await asyncio.to_thread(main, argv) == 0
    for number in range(FAILURES):  # each from its own address: no address reaches the limit
        assert (await call(process, revoked, f"198.51.100.{10 + number}")).status_code == 401
    locked = await call(process, make_token("mallory"), "198.51.100.99")  # a fresh token, a new address
    assert locked.status_code == 429
    assert locked.json()["type"].endswith(":problem:locked-out")
    assert int(locked.headers["Retry-After"]) >= 1
    assert (await call(process, make_token("alice"), "198.51.100.99")).status_code == 201  # others are not
    started = [line for line in log_of(process).splitlines() if "lockout_started" in line]
    assert len(started) == 1, started


@pytest.mark.parametrize(("mode", "refused", "served"), [("closed", 503, 503), ("open", 401, 201)])
async def test_redis_down_follows_the_rate_limit_failure_mode(
    service: ServiceFactory, make_token: TokenFactory, mode: str, refused: int, served: int
) -> None:
    process = service(REDIS_URL="redis://127.0.0.1:9/0", RATE_LIMIT_FAILURE_MODE=mode)
    good, bad = make_token("alice"), make_token("alice") + "x"
    for _ in range(FAILURES + 1):
        assert (await call(process, bad)).status_code == refused
    assert (await call(process, good)).status_code == served  # nothing could be counted: not locked
    unrecorded = [line for line in log_of(process).splitlines() if "lockout_store_unavailable" in line]
    assert len(unrecorded) == (1 if mode == "open" else 0), unrecorded  # once a minute, not per failure


async def test_open_mode_keeps_refusing_what_was_locked_before_redis_went_down(
    service: ServiceFactory, make_token: TokenFactory, tmp_path: Path
) -> None:
    server = start_redis(tmp_path / "redis")
    try:
        process = service(REDIS_URL=server.url, RATE_LIMIT_FAILURE_MODE="open", LOCKOUT_SECONDS="60")
        for _ in range(FAILURES):  # an address guessing
            assert (await call(process, make_token("alice") + "x", "198.51.100.1")).status_code == 401
        assert (await call(process, make_token("alice"), "198.51.100.1")).status_code == 429
        # A subject whose revoked token keeps being tried, from addresses that stay under their limit.
        with redis_client(server.port) as redis_now:
            redis_now.set(f"{SERVICE_NAME}:revoked:sub:{tag(principal('mallory'))}", repr(time.time() + 5), ex=600)
        for number in range(FAILURES):
            assert (await call(process, make_token("mallory"), f"198.51.100.{10 + number}")).status_code == 401
        assert (await call(process, make_token("mallory"), "198.51.100.50")).status_code == 429
        server.kill()  # the outage
        assert (await call(process, make_token("alice"), "198.51.100.1")).status_code == 429
        assert (await call(process, make_token("mallory"), "198.51.100.51")).status_code == 429
        assert (await call(process, make_token("alice"), "198.51.100.52")).status_code == 201  # the rest: served
    finally:
        server.stop()
