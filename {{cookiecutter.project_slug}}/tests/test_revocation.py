"""Revocation: a denylisted `jti` or a subject-wide "revoked before" mark refuses a token on its
next request, cached or not; the entries expire with the tokens; Redis outages follow
RATE_LIMIT_FAILURE_MODE."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import anyio
import httpx
import jwt
import pytest
from fastapi import FastAPI
from redis.asyncio import Redis
from starlette.types import Receive, Scope, Send

from {{ cookiecutter.package_name }}.app import create_app
from {{ cookiecutter.package_name }}.cli import main
from {{ cookiecutter.package_name }}.config import SERVICE_NAME, Settings
from {{ cookiecutter.package_name }}.security.admission import Admission
from {{ cookiecutter.package_name }}.security.authn import Authenticate, BearerToken, TokenVerifier
from {{ cookiecutter.package_name }}.security.keys import key_source
from {{ cookiecutter.package_name }}.security.limiter import RateLimiter
from {{ cookiecutter.package_name }}.security.lockout import Lockout
from {{ cookiecutter.package_name }}.security.ratelimit import client_address
from {{ cookiecutter.package_name }}.security.revocation import Revocations, tag
from {{ cookiecutter.package_name }}.store.core import NotReplicated, RedisStore

from .conftest import TokenFactory, bearer, principal, running
from .servers import ReplicatedRedis, redis_client, start_redis, start_replicated_redis

PROTECTED = "/api/v1/orgs"
UNREACHABLE_REDIS = "redis://127.0.0.1:1/0"


async def status_of(http: httpx.AsyncClient, token: str) -> int:
    response = await http.post(PROTECTED, json={"name": "Acme"}, headers=bearer(token))
    assert response.status_code in (201, 401), response.text
    return response.status_code


def claims_of(token: str) -> dict[str, Any]:
    decoded: dict[str, Any] = jwt.decode(token, options={"verify_signature": False})
    return decoded


def revocations(app: FastAPI) -> Revocations:
    runtime = app.state.runtime
    assert isinstance(runtime.revocations, Revocations)
    return runtime.revocations


async def test_revoked_jti_is_rejected(app: FastAPI, client: httpx.AsyncClient, make_token: TokenFactory) -> None:
    token = make_token()
    claims = claims_of(token)
    assert await revocations(app).revoke_token(principal(claims["sub"]), claims["jti"], claims["exp"]) is True
    response = await client.post(PROTECTED, json={"name": "Acme"}, headers=bearer(token))
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == 'Bearer error="invalid_token"'


async def test_revocation_reaches_a_token_already_in_the_verified_cache(
    app: FastAPI, client: httpx.AsyncClient, make_token: TokenFactory, audit_events: list[logging.LogRecord]
) -> None:
    token = make_token()
    assert await status_of(client, token) == 201
    claims = claims_of(token)
    await revocations(app).revoke_token(principal(claims["sub"]), claims["jti"], claims["exp"])
    assert await status_of(client, token) == 401
    assert [getattr(r, "reason", None) for r in audit_events if getattr(r, "event", "") == "authentication_failed"] == [
        "revoked"
    ]


async def test_jti_revocation_leaves_the_subjects_other_tokens_alone(
    app: FastAPI, client: httpx.AsyncClient, make_token: TokenFactory
) -> None:
    revoked, other = make_token("alice"), make_token("alice")
    claims = claims_of(revoked)
    await revocations(app).revoke_token(principal(claims["sub"]), claims["jti"], claims["exp"])
    assert await status_of(client, other) == 201


async def test_subject_revocation_rejects_every_token_issued_before_it(
    app: FastAPI, client: httpx.AsyncClient, make_token: TokenFactory
) -> None:
    now = int(time.time())
    earlier, current = make_token("alice", iat=now - 120), make_token("alice", iat=now)
    assert await status_of(client, current) == 201
    mark = await revocations(app).revoke_subject(principal("alice"))
    assert await status_of(client, earlier) == 401
    assert await status_of(client, current) == 401  # same second as the mark: refused too
    assert await status_of(client, make_token("bob", iat=now - 120)) == 201
    # A token stamped after the mark but within the clock leeway the verifier accepts (an issuer
    # clock running fast) may have been issued before the revocation: refused too.
    assert await status_of(client, make_token("alice", iat=int(mark) + 25)) == 401


async def test_token_issued_after_revocation_and_leeway_is_accepted(
    settings_for: Callable[..., Settings], make_token: TokenFactory
) -> None:
    app = create_app(settings_for(jwt_leeway_seconds=1))
    async with running(app) as http:
        mark = await revocations(app).revoke_subject(principal("alice"))
        assert await status_of(http, make_token("alice", iat=int(mark) + 1)) == 401  # within the leeway
        await anyio.sleep(max(0.0, int(mark) + 1 - time.time()) + 0.05)
        assert await status_of(http, make_token("alice", iat=int(mark) + 2)) == 201


async def test_jti_entry_expires_when_the_token_could_no_longer_be_accepted(
    app: FastAPI, client: httpx.AsyncClient, redis: Redis
) -> None:
    settings: Settings = app.state.runtime.settings
    expires_at = int(time.time()) + 300
    await revocations(app).revoke_token(principal("alice"), "jti-1", expires_at)
    ttl = await redis.ttl(f"{SERVICE_NAME}:revoked:jti:{tag(principal('alice'))}:jti-1")
    # The token stays acceptable until exp + leeway, so the entry must live at least that long.
    assert 300 + settings.jwt_leeway_seconds - 5 <= ttl <= 300 + settings.jwt_leeway_seconds + 1


async def test_subject_mark_lives_as_long_as_any_token_it_refuses(
    app: FastAPI, client: httpx.AsyncClient, redis: Redis
) -> None:
    settings: Settings = app.state.runtime.settings
    await revocations(app).revoke_subject(principal("alice"))
    ttl = await redis.ttl(f"{SERVICE_NAME}:revoked:sub:{tag(principal('alice'))}")
    longest = settings.jwt_max_token_lifetime_seconds + settings.jwt_leeway_seconds
    assert longest - 5 <= ttl <= longest + 1


async def test_revoking_an_already_expired_token_stores_nothing(
    app: FastAPI, client: httpx.AsyncClient, redis: Redis
) -> None:
    assert await revocations(app).revoke_token(principal("alice"), "old", int(time.time()) - 3600) is False
    assert await redis.exists(f"{SERVICE_NAME}:revoked:jti:{tag(principal('alice'))}:old") == 0


async def test_revocation_without_redis_url_is_kept_in_process(
    settings_for: Callable[..., Settings], make_token: TokenFactory
) -> None:
    app = create_app(settings_for(redis_url=None))
    async with running(app) as http:
        token = make_token()
        assert await status_of(http, token) == 201
        claims = claims_of(token)
        await revocations(app).revoke_token(principal(claims["sub"]), claims["jti"], claims["exp"])
        assert await status_of(http, token) == 401
        await revocations(app).revoke_subject(principal("bob"))
        assert await status_of(http, make_token("bob", iat=int(time.time()) - 10)) == 401


# --- operators' commands ------------------------------------------------------------------------


async def test_token_revoke_command_refuses_the_token_on_the_running_service(
    cli_env: None, client: httpx.AsyncClient, make_token: TokenFactory, capsys: Any
) -> None:
    token = make_token()
    assert await status_of(client, token) == 201
    claims = claims_of(token)
    argv = ["token", "revoke", "--sub", claims["sub"], "--jti", claims["jti"], "--exp", str(claims["exp"])]
    assert await anyio.to_thread.run_sync(main, argv) == 0
    assert "revoked" in capsys.readouterr().out
    assert await status_of(client, token) == 401


async def test_token_revoke_subject_command_refuses_the_subjects_tokens(
    cli_env: None, client: httpx.AsyncClient, make_token: TokenFactory
) -> None:
    token = make_token("carol", iat=int(time.time()) - 5)
    assert await status_of(client, token) == 201
    assert await anyio.to_thread.run_sync(main, ["token", "revoke-subject", "--sub", "carol"]) == 0
    assert await status_of(client, token) == 401


def test_token_revoke_command_requires_redis(cli_env: None, monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
    monkeypatch.delenv("REDIS_URL")
    assert main(["token", "revoke", "--sub", "s", "--jti", "j", "--exp", str(int(time.time()) + 60)]) == 2
    assert "REDIS_URL" in capsys.readouterr().err


def test_token_revoke_command_reports_an_unreachable_redis(
    cli_env: None, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    monkeypatch.setenv("REDIS_URL", UNREACHABLE_REDIS)
    assert main(["token", "revoke-subject", "--sub", "carol"]) == 1
    assert "nothing was revoked" in capsys.readouterr().err


# --- Redis outages --------------------------------------------------------------------------------


async def ok(scope: Scope, receive: Receive, send: Send) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"served"})


def layer_with_unreachable_redis(settings: Settings) -> Authenticate:
    """The authentication layer alone (no rate limit in front to fail first), its revocation
    lookups going to a Redis port nothing listens on."""
    store = RedisStore(UNREACHABLE_REDIS, timeout=0.5, pool_size=4, pool_timeout=1.0)
    limiter = RateLimiter(settings, store)
    admission = Admission(settings, limiter, Revocations(settings, store), Lockout(settings, store, client_address))
    verifier = TokenVerifier(settings, key_source(settings))
    return Authenticate(ok, authenticators=[BearerToken(verifier, admission)])


async def test_revocation_store_down_fails_closed_with_503(
    settings_for: Callable[..., Settings], make_token: TokenFactory, audit_events: list[logging.LogRecord]
) -> None:
    layer = layer_with_unreachable_redis(settings_for(rate_limit_failure_mode="closed"))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=layer), base_url="http://localhost") as http:
        response = await http.get(PROTECTED, headers=bearer(make_token()))
    assert response.status_code == 503
    assert response.headers["content-type"] == "application/problem+json"
    assert response.headers["retry-after"] == "1"
    assert "127.0.0.1" not in response.text and "Error" not in response.text
    assert any(getattr(r, "layer", "") == "authn" for r in audit_events)


async def test_revocation_store_down_fails_open_serves_and_logs(
    settings_for: Callable[..., Settings], make_token: TokenFactory, audit_events: list[logging.LogRecord]
) -> None:
    layer = layer_with_unreachable_redis(settings_for(rate_limit_failure_mode="open"))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=layer), base_url="http://localhost") as http:
        response = await http.get(PROTECTED, headers=bearer(make_token()))
        assert response.status_code == 200
        assert response.text == "served"
        # Still no way in without a valid token.
        assert (await http.get(PROTECTED, headers=bearer("garbage"))).status_code == 401
    assert "revocation_store_unavailable" in [getattr(r, "event", "") for r in audit_events]


# --- a revocation reported done is on a replica (WAIT) ----------------------------------------------


@pytest.fixture(scope="module")
def replicated(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ReplicatedRedis]:
    pair = start_replicated_redis(tmp_path_factory.mktemp("replicated"))
    yield pair
    pair.stop()


def on_replica(pair: ReplicatedRedis, subject: str) -> int:
    with redis_client(pair.replica.port) as replica:
        return int(replica.exists(f"{SERVICE_NAME}:revoked:sub:{tag(principal(subject))}"))


def test_token_revoke_commands_report_done_once_a_replica_has_the_revocation(
    cli_env: None, monkeypatch: pytest.MonkeyPatch, replicated: ReplicatedRedis, capsys: Any
) -> None:
    monkeypatch.setenv("REDIS_URL", replicated.primary.url)
    assert main(["token", "revoke-subject", "--sub", "dave"]) == 0
    assert on_replica(replicated, "dave") == 1
    exp = str(int(time.time()) + 300)
    assert main(["token", "revoke", "--sub", "dave", "--jti", "j-1", "--exp", exp]) == 0
    assert "revoked" in capsys.readouterr().out


def test_a_revocation_no_replica_acknowledges_is_not_reported_done(
    cli_env: None, monkeypatch: pytest.MonkeyPatch, replicated: ReplicatedRedis, capsys: Any
) -> None:
    monkeypatch.setenv("REDIS_URL", replicated.primary.url)
    exp = str(int(time.time()) + 300)
    with replicated.replica.paused():  # connected to the primary, acknowledging nothing
        assert main(["token", "revoke-subject", "--sub", "erin"]) == 1
        assert "no Redis replica acknowledged" in capsys.readouterr().err
        assert main(["token", "revoke", "--sub", "erin", "--jti", "j-2", "--exp", exp]) == 1
        assert "it is not done" in capsys.readouterr().err
    # The replica back: the same revocation is done.
    assert main(["token", "revoke-subject", "--sub", "erin"]) == 0
    assert on_replica(replicated, "erin") == 1


async def test_a_revocation_through_the_store_raises_not_replicated_without_a_replica_ack(
    settings: Settings, replicated: ReplicatedRedis
) -> None:
    store = RedisStore(replicated.primary.url, timeout=0.5, pool_size=2, pool_timeout=1.0)
    try:
        with replicated.replica.paused(), pytest.raises(NotReplicated):
            await Revocations(settings, store).revoke_subject(principal("frank"))
        await Revocations(settings, store).revoke_subject(principal("frank"))
        assert on_replica(replicated, "frank") == 1
    finally:
        await store.aclose()


# --- open mode: what this process has seen revoked or locked stays refused -------------------------


async def test_open_mode_still_refuses_tokens_revoked_before_the_outage(
    settings_for: Callable[..., Settings],
    make_token: TokenFactory,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    server = start_redis(tmp_path_factory.mktemp("outage"))
    app = create_app(settings_for(redis_url=server.url, rate_limit_failure_mode="open"))
    try:
        async with running(app) as http:
            now = int(time.time())
            by_jti, by_subject, good = make_token("gina"), make_token("hank", iat=now - 5), make_token("ivy")
            seen_elsewhere = make_token("jack", iat=now - 5)
            for token in (by_jti, by_subject, good, seen_elsewhere):
                assert await status_of(http, token) == 201  # each in the verified-token cache
            claims = claims_of(by_jti)
            await revocations(app).revoke_token(principal(claims["sub"]), claims["jti"], claims["exp"])  # this process
            await revocations(app).revoke_subject(principal("hank"))
            # Revoked by another replica (straight in Redis): this process learns it from the answer.
            with redis_client(server.port) as other:
                other.set(f"{SERVICE_NAME}:revoked:sub:{tag(principal('jack'))}", repr(time.time()), ex=600)
            assert await status_of(http, seen_elsewhere) == 401
            server.kill()  # the outage
            assert await status_of(http, good) == 201  # open mode serves
            for token in (by_jti, by_subject, seen_elsewhere):
                assert await status_of(http, token) == 401
            assert await status_of(http, make_token("kim")) == 201  # a token not seen before: served
    finally:
        server.stop()
