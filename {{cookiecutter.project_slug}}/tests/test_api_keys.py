"""Scoped API keys (the `api_keys` option): issued, used on real routes, scoped, limited, rotated and
revoked, against the real database and a real redis-server. Keys are issued through the owner-only
API, the store (as the API and CLI do) or the `api-key` commands."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AsyncExitStack
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any

import anyio
import anyio.from_thread
import httpx
import pytest
from alembic import command
from fastapi import FastAPI
from redis.asyncio import Redis
from sqlalchemy import text, update

from {{ cookiecutter.package_name }}.app import create_app
from {{ cookiecutter.package_name }}.cli import main
from {{ cookiecutter.package_name }}.config import SERVICE_NAME, ConfigError, Settings
from {{ cookiecutter.package_name }}.options.api_keys import scan as scan_check
from {{ cookiecutter.package_name }}.options.api_keys import store
from {{ cookiecutter.package_name }}.options.api_keys.authenticator import ApiKeys, KnownKey, KnownKeys, LastUsed, scanner_pattern
from {{ cookiecutter.package_name }}.options.api_keys.models import ApiKey
from {{ cookiecutter.package_name }}.options.api_keys.settings import DEFAULT_PREFIX
from {{ cookiecutter.package_name }}.scan import authn as scan_authn
from {{ cookiecutter.package_name }}.scan.probe import Probe, Scan
from {{ cookiecutter.package_name }}.scan.report import Status
from {{ cookiecutter.package_name }}.security.authz import StepUp, no_object_policy
from {{ cookiecutter.package_name }}.security.principal import Principal
from {{ cookiecutter.package_name }}.security.revocation import tag

from .conftest import ISSUER, PSEUDONYM_KEY, ThreadBridge, TokenFactory, bearer, principal, pseudonym, run_sql, running
from .servers import ReplicatedRedis, free_port, redis_client, start_redis, start_replicated_redis
from .test_audit import captured_logs

ORGS = "/api/v1/orgs"
KEYS = "/api/v1/api-keys"
MANAGER_SCOPES = "orgs:read orgs:write api-keys:read api-keys:write"
PARTNER = ("198.51.100.7", 4711)  # a client address inside the allowlists below


def api_key(key: str) -> dict[str, str]:
    return {"X-API-Key": key}


def authenticator(app: FastAPI) -> ApiKeys:
    found = [a for e in app.state.runtime.extensions for a in e.authenticators if isinstance(a, ApiKeys)]
    assert len(found) == 1
    return found[0]


async def clear_keys(app: FastAPI) -> None:
    async with app.state.runtime.engine.begin() as connection:
        await connection.execute(text("DELETE FROM api_keys"))


@pytest.fixture
def key_app(settings: Settings) -> FastAPI:
    return create_app(settings)


@pytest.fixture
async def http(key_app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with running(key_app) as client:
        await clear_keys(key_app)
        yield client


async def issue(
    app: FastAPI,
    *,
    owner: str = "alice",
    scopes: tuple[str, ...] = ("orgs:read",),
    networks: tuple[str, ...] = (),
    lifetime_seconds: int | None = None,
) -> store.IssuedKey:
    """A key issued as the API and the CLI issue one, owned by a token subject of the tests' issuer."""
    async with app.state.runtime.sessionmaker() as session:
        issued = await store.issue(
            session,
            authenticator(app).settings,
            owner=principal(owner),
            name="partner",
            scopes=scopes,
            networks=networks,
            lifetime_seconds=lifetime_seconds,
            created_by="tests",
        )
        await session.commit()
        return issued


async def org_readable_by(http: httpx.AsyncClient, make_token: TokenFactory, subject: str) -> str:
    """An org of alice's with `subject` granted viewer: its id."""
    owner = bearer(make_token("alice", MANAGER_SCOPES))
    created = await http.post(ORGS, json={"name": "Acme"}, headers=owner)
    assert created.status_code == 201, created.text
    org_id: str = created.json()["id"]
    grant = await http.put(f"{ORGS}/{org_id}/grants/{subject}", json={"relation": "viewer"}, headers=owner)
    assert grant.status_code == 201, grant.text
    return org_id


def assert_refused(response: httpx.Response) -> None:
    assert response.status_code == 401, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    assert response.headers["www-authenticate"] == 'ApiKey error="invalid_token"'
    assert response.json()["status"] == 401


# --- Issue and use ------------------------------------------------------------------------------


async def test_a_key_issued_through_the_api_reads_an_org_granted_to_it(
    http: httpx.AsyncClient, make_token: TokenFactory
) -> None:
    response = await http.post(
        KEYS,
        json={"name": "Partner A", "scopes": ["orgs:read"], "expires_in_seconds": 3600},
        headers=bearer(make_token("alice", MANAGER_SCOPES)),
    )
    assert response.status_code == 201, response.text
    assert response.headers["cache-control"] == "no-store"  # the one response that holds the secret
    body = response.json()
    key, key_id = body["key"], body["id"]
    assert body["subject"] == f"apikey:{key_id}"
    assert key.startswith(f"{DEFAULT_PREFIX}_{key_id}_")
    org_id = await org_readable_by(http, make_token, f"apikey:{key_id}")

    assert (await http.get(f"{ORGS}/{org_id}", headers=api_key(key))).status_code == 200
    assert (await http.get(f"{ORGS}/{org_id}", headers={"Authorization": f"ApiKey {key}"})).status_code == 200
    # The key acts as its own subject: alice's other orgs stay out of reach.
    other = await http.post(ORGS, json={"name": "Other"}, headers=bearer(make_token("alice", MANAGER_SCOPES)))
    assert (await http.get(f"{ORGS}/{other.json()['id']}", headers=api_key(key))).status_code == 403


async def test_the_key_list_shows_no_secret_and_only_the_callers_keys(
    http: httpx.AsyncClient, key_app: FastAPI, make_token: TokenFactory
) -> None:
    mine = await issue(key_app, owner="alice")
    await issue(key_app, owner="bob")
    response = await http.get(KEYS, headers=bearer(make_token("alice", MANAGER_SCOPES)))
    assert response.status_code == 200
    assert [key["id"] for key in response.json()] == [mine.info.id]
    assert mine.key.rsplit("_", 1)[1] not in response.text
    assert "secret_hash" not in response.text


@pytest.mark.parametrize(
    "mangle",
    [
        pytest.param(lambda key: key[:-1] + ("0" if key[-1] != "0" else "1"), id="wrong-secret"),
        pytest.param(lambda key: f"{DEFAULT_PREFIX}_{secrets.token_hex(8)}_{key.rsplit('_', 1)[1]}", id="unknown-id"),
        pytest.param(lambda key: key[:-4], id="truncated"),
        pytest.param(lambda key: "other" + key, id="wrong-prefix"),
        pytest.param(lambda key: key.upper(), id="uppercase"),
        pytest.param(lambda key: "", id="empty"),
    ],
)
async def test_a_wrong_unknown_or_malformed_key_is_a_401_problem_with_an_apikey_challenge(
    http: httpx.AsyncClient, key_app: FastAPI, mangle: Callable[[str], str]
) -> None:
    issued = await issue(key_app)
    assert_refused(await http.get(f"{ORGS}/{secrets.token_hex(4)}", headers=api_key(mangle(issued.key))))


async def test_a_key_sent_twice_is_refused(http: httpx.AsyncClient, key_app: FastAPI) -> None:
    issued = await issue(key_app)
    headers = [("X-API-Key", issued.key), ("Authorization", f"ApiKey {issued.key}")]
    assert_refused(await http.get(ORGS + "/x", headers=headers))


async def test_a_key_in_the_query_string_or_a_cookie_is_not_a_credential(
    http: httpx.AsyncClient, key_app: FastAPI, make_token: TokenFactory
) -> None:
    """Only the two headers carry a key: a query string lands in access logs, proxies' logs and
    browser history, and a cookie is sent by any page the partner's browser opens."""
    issued = await issue(key_app)
    org_id = await org_readable_by(http, make_token, f"apikey:{issued.info.id}")
    assert (await http.get(f"{ORGS}/{org_id}", headers=api_key(issued.key))).status_code == 200
    for params, cookie in (
        ({"api_key": issued.key}, None),
        ({"apikey": issued.key}, None),
        ({"x-api-key": issued.key}, None),
        ({}, f"api_key={issued.key}"),
        ({}, f"X-API-Key={issued.key}"),
    ):
        headers = {"Cookie": cookie} if cookie else {}
        response = await http.get(f"{ORGS}/{org_id}", params=params, headers=headers)
        assert response.status_code == 401, (params, cookie)
        assert response.headers["content-type"].startswith("application/problem+json")


async def test_a_refused_key_is_not_passed_over_for_a_valid_token(
    http: httpx.AsyncClient, make_token: TokenFactory
) -> None:
    forged = f"{DEFAULT_PREFIX}_{secrets.token_hex(8)}_{secrets.token_hex(32)}"
    headers = {**api_key(forged), **bearer(make_token("alice", MANAGER_SCOPES))}
    assert_refused(await http.post(ORGS, json={"name": "Acme"}, headers=headers))


async def test_an_expired_key_is_refused(http: httpx.AsyncClient, key_app: FastAPI) -> None:
    issued = await issue(key_app)
    async with key_app.state.runtime.engine.begin() as connection:
        await connection.execute(
            update(ApiKey).where(ApiKey.id == issued.info.id).values(expires_at=datetime.now(UTC) - timedelta(1))
        )
    assert_refused(await http.get(ORGS + "/x", headers=api_key(issued.key)))


# --- Scopes, networks, limits -------------------------------------------------------------------


async def test_a_keys_scopes_are_enforced_by_the_route_policies(
    http: httpx.AsyncClient, key_app: FastAPI, make_token: TokenFactory
) -> None:
    issued = await issue(key_app, scopes=("orgs:read",))
    response = await http.post(ORGS, json={"name": "Acme"}, headers=api_key(issued.key))
    assert response.status_code == 403  # orgs:write is not among the key's scopes
    writer = await issue(key_app, scopes=("orgs:write",))
    assert (await http.post(ORGS, json={"name": "Acme"}, headers=api_key(writer.key))).status_code == 201


async def test_a_key_with_a_network_allowlist_works_only_from_those_networks(key_app: FastAPI) -> None:
    async with running(key_app, client=PARTNER) as partner:
        await clear_keys(key_app)
        issued = await issue(key_app, scopes=("orgs:write",), networks=("198.51.100.0/24", "2001:db8::/32"))
        assert (await partner.post(ORGS, json={"name": "Acme"}, headers=api_key(issued.key))).status_code == 201
    async with running(key_app, client=("203.0.113.7", 4711), reset=False) as elsewhere:
        # Refused also once the key is known to this replica (the in-process reuse checks the networks).
        assert_refused(await elsewhere.post(ORGS, json={"name": "Acme"}, headers=api_key(issued.key)))


async def test_the_subject_limit_applies_per_key(
    settings_for: Callable[..., Settings], make_token: TokenFactory
) -> None:
    app = create_app(settings_for(rate_limit_subject="3/minute"))
    async with running(app) as http:
        await clear_keys(app)
        first, second = await issue(app), await issue(app)
        statuses = [(await http.get(ORGS + "/x", headers=api_key(first.key))).status_code for _ in range(4)]
        assert statuses == [400, 400, 400, 429]  # authenticated (the org id is malformed), then limited
        limited = await http.get(ORGS + "/x", headers=api_key(first.key))
        assert limited.status_code == 429
        assert '"subject";q=3;w=60' in limited.headers["ratelimit-policy"]
        # Another key of the same owner has its own count.
        assert (await http.get(ORGS + "/x", headers=api_key(second.key))).status_code != 429


async def test_guessed_keys_count_towards_the_address_lockout(
    settings_for: Callable[..., Settings], audit_events: list[logging.LogRecord]
) -> None:
    app = create_app(settings_for(lockout_failures=3, lockout_seconds=60))
    async with running(app) as http:
        await clear_keys(app)
        issued = await issue(app)
        for _ in range(3):
            guess = f"{DEFAULT_PREFIX}_{secrets.token_hex(8)}_{secrets.token_hex(32)}"
            assert_refused(await http.get(ORGS + "/x", headers=api_key(guess)))
        # The address is locked now: even the right key is refused before any lookup.
        locked = await http.get(ORGS + "/x", headers=api_key(issued.key))
        assert locked.status_code == 429
        assert locked.json()["type"].endswith("locked-out")
    reasons = [getattr(r, "reason", None) for r in audit_events if getattr(r, "event", "") == "authentication_failed"]
    assert reasons == ["unknown_api_key"] * 3


async def test_guessed_keys_are_counted_by_the_address_limit(settings_for: Callable[..., Settings]) -> None:
    app = create_app(settings_for(rate_limit_ip="3/minute"))
    async with running(app) as http:
        await clear_keys(app)
        for _ in range(3):
            assert_refused(await http.get(ORGS + "/x", headers=api_key(f"{DEFAULT_PREFIX}_{'0' * 16}_{'1' * 64}")))
        assert (
            await http.get(ORGS + "/x", headers=api_key(f"{DEFAULT_PREFIX}_{'0' * 16}_{'2' * 64}"))
        ).status_code == 429


async def test_a_key_this_replica_knows_costs_one_redis_round_trip_and_no_database(
    http: httpx.AsyncClient, key_app: FastAPI, redis_url: str
) -> None:
    """Layers 3-5 share one round trip for a key looked up before (the lookahead of layer 3), as for
    a known token: the address window, its lockout, the key's revocation mark and its subject window."""
    issued = await issue(key_app)
    probe = f"{ORGS}/00000000-0000-0000-0000-000000000000"
    assert (await http.get(probe, headers=api_key(issued.key))).status_code == 403  # looked up, now known
    lookups = 0
    real_fetch = key_app.state.runtime.statements.fetch

    async def fetch(query: Any, **values: Any) -> Any:
        nonlocal lookups
        lookups += query is authenticator(key_app).query
        return await real_fetch(query, **values)

    key_app.state.runtime.statements.fetch = fetch
    async with Redis.from_url(redis_url) as redis:

        async def reads() -> int:
            return int((await redis.info("stats"))["total_reads_processed"])

        idle = await reads()
        idle = await reads() - idle  # this test's own INFO command
        before = await reads()
        assert (await http.get(probe, headers=api_key(issued.key))).status_code == 403
        assert await reads() - before - idle == 1
    assert lookups == 0


# --- Revocation and rotation across replicas ----------------------------------------------------


@pytest.fixture
async def two_replicas(settings: Settings) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient, httpx.AsyncClient]]:
    """Two app instances sharing the database and Redis, each with its own in-process key reuse."""
    first, second = create_app(settings), create_app(settings)
    async with AsyncExitStack() as stack:
        a = await stack.enter_async_context(running(first))
        await clear_keys(first)
        b = await stack.enter_async_context(running(second, reset=False))
        yield first, a, b


async def test_a_revoked_key_is_refused_on_its_next_request_by_every_replica(
    two_replicas: tuple[FastAPI, httpx.AsyncClient, httpx.AsyncClient], make_token: TokenFactory
) -> None:
    app, a, b = two_replicas
    issued = await issue(app, scopes=("orgs:write",))
    for replica in (a, b, a, b):  # each replica has looked the key up and reuses it
        assert (await replica.post(ORGS, json={"name": "Acme"}, headers=api_key(issued.key))).status_code == 201
    revoked = await a.delete(f"{KEYS}/{issued.info.id}", headers=bearer(make_token("alice", MANAGER_SCOPES)))
    assert revoked.status_code == 204
    assert_refused(await b.post(ORGS, json={"name": "Acme"}, headers=api_key(issued.key)))
    assert_refused(await a.post(ORGS, json={"name": "Acme"}, headers=api_key(issued.key)))


async def test_rotation_with_an_overlap_accepts_both_secrets_then_only_the_new_one(
    monkeypatch: pytest.MonkeyPatch,
    settings: Settings,
    make_token: TokenFactory,
    audit_events: list[logging.LogRecord],
) -> None:
    monkeypatch.setenv("API_KEY_CACHE_SECONDS", "1")
    app = create_app(settings)
    async with running(app) as http:
        await clear_keys(app)
        old = await issue(app, scopes=("orgs:write",))
        assert (await http.post(ORGS, json={"name": "A"}, headers=api_key(old.key))).status_code == 201
        rotated = await http.post(
            f"{KEYS}/{old.info.id}/rotate",
            json={"overlap_seconds": 2},
            headers=bearer(make_token("alice", MANAGER_SCOPES)),
        )
        assert rotated.status_code == 200, rotated.text
        new = rotated.json()["key"]
        assert new != old.key and new.startswith(f"{DEFAULT_PREFIX}_{old.info.id}_")
        for key in (old.key, new, old.key, new):
            assert (await http.post(ORGS, json={"name": "A"}, headers=api_key(key))).status_code == 201
        await anyio.sleep(2.2)
        assert_refused(await http.post(ORGS, json={"name": "A"}, headers=api_key(old.key)))
        assert (await http.post(ORGS, json={"name": "A"}, headers=api_key(new))).status_code == 201
    reasons = [getattr(r, "reason", None) for r in audit_events if getattr(r, "event", "") == "authentication_failed"]
    assert reasons == ["rotated_api_key_secret"]


async def test_a_revoked_key_stays_refused_once_its_redis_mark_has_expired(
    http: httpx.AsyncClient, key_app: FastAPI
) -> None:
    issued = await issue(key_app)
    async with key_app.state.runtime.sessionmaker() as session:
        assert await store.revoke(session, key_app.state.runtime.revocations, issued.info.id) is True
    await key_app.state.runtime.store.execute(b"FLUSHDB")  # the mark outlives only the reuse time
    assert_refused(await http.get(ORGS + "/x", headers=api_key(issued.key)))


async def test_the_store_changes_only_the_named_owners_keys(http: httpx.AsyncClient, key_app: FastAPI) -> None:
    issued = await issue(key_app, owner="alice")
    runtime = key_app.state.runtime
    settings = authenticator(key_app).settings
    async with runtime.sessionmaker() as session:
        assert await store.get_key(session, issued.info.id, owner="bob") is None
        assert (
            await store.rotate(session, settings, runtime.revocations, issued.info.id, overlap_seconds=0, owner="bob")
            is None
        )
        assert await store.revoke(session, runtime.revocations, issued.info.id, owner="bob") is False
    assert (await http.get(ORGS + "/x", headers=api_key(issued.key))).status_code == 400  # still alive


async def test_rotation_without_overlap_refuses_the_old_secret_on_every_replica_at_once(
    two_replicas: tuple[FastAPI, httpx.AsyncClient, httpx.AsyncClient], make_token: TokenFactory
) -> None:
    app, a, b = two_replicas
    old = await issue(app, scopes=("orgs:write",))
    for replica in (a, b):
        assert (await replica.post(ORGS, json={"name": "A"}, headers=api_key(old.key))).status_code == 201
    rotated = await a.post(
        f"{KEYS}/{old.info.id}/rotate", json={"overlap_seconds": 0}, headers=bearer(make_token("alice", MANAGER_SCOPES))
    )
    assert rotated.status_code == 200
    assert_refused(await b.post(ORGS, json={"name": "A"}, headers=api_key(old.key)))
    assert (await b.post(ORGS, json={"name": "A"}, headers=api_key(rotated.json()["key"]))).status_code == 201


async def test_an_overlap_shorter_than_the_reuse_time_is_refused(
    http: httpx.AsyncClient, key_app: FastAPI, make_token: TokenFactory
) -> None:
    issued = await issue(key_app)
    response = await http.post(
        f"{KEYS}/{issued.info.id}/rotate",
        json={"overlap_seconds": 5},
        headers=bearer(make_token("alice", MANAGER_SCOPES)),
    )
    assert response.status_code == 400
    assert "API_KEY_CACHE_SECONDS" in response.json()["detail"]


# --- The owner-only API -------------------------------------------------------------------------


async def test_an_api_key_cannot_manage_keys_whatever_it_carries(http: httpx.AsyncClient, key_app: FastAPI) -> None:
    issued = await issue(key_app, scopes=("orgs:read",))
    async with key_app.state.runtime.engine.begin() as connection:  # even with the scopes forced in
        await connection.execute(
            update(ApiKey).where(ApiKey.id == issued.info.id).values(scopes="api-keys:read api-keys:write")
        )
    for method, path, body in [
        ("POST", KEYS, {"scopes": ["orgs:read"]}),
        ("GET", KEYS, None),
        ("POST", f"{KEYS}/{issued.info.id}/rotate", {"overlap_seconds": 0}),
        ("DELETE", f"{KEYS}/{issued.info.id}", None),
    ]:
        response = await http.request(method, path, json=body, headers=api_key(issued.key))
        assert response.status_code == 403, (method, path, response.text)


async def test_another_owners_key_is_403_like_a_missing_one(
    http: httpx.AsyncClient, key_app: FastAPI, make_token: TokenFactory
) -> None:
    bobs = await issue(key_app, owner="bob")
    alice = bearer(make_token("alice", MANAGER_SCOPES))
    for path in (f"{KEYS}/{bobs.info.id}", f"{KEYS}/{secrets.token_hex(8)}"):
        assert (await http.get(path, headers=alice)).status_code == 403
        assert (await http.delete(path, headers=alice)).status_code == 403
    assert (await http.get(ORGS + "/x", headers=api_key(bobs.key))).status_code != 401  # still alive


async def test_a_key_gets_no_scope_its_issuers_token_lacks(http: httpx.AsyncClient, make_token: TokenFactory) -> None:
    token = bearer(make_token("alice", "api-keys:write orgs:read"))
    assert (await http.post(KEYS, json={"scopes": ["orgs:write"]}, headers=token)).status_code == 403
    assert (await http.post(KEYS, json={"scopes": ["api-keys:write"]}, headers=token)).status_code == 400
    assert (await http.post(KEYS, json={"scopes": ["orgs:read"]}, headers=token)).status_code == 201


# --- Secrets never logged, last use, settings ----------------------------------------------------


@pytest.fixture
def every_log_record() -> Iterator[list[logging.LogRecord]]:
    records: list[logging.LogRecord] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Collect(level=logging.DEBUG)
    root = logging.getLogger()
    root.addHandler(handler)
    yield records
    root.removeHandler(handler)


async def test_the_secret_is_never_logged(
    http: httpx.AsyncClient, make_token: TokenFactory, every_log_record: list[logging.LogRecord]
) -> None:
    token = bearer(make_token("alice", MANAGER_SCOPES))
    issued = (await http.post(KEYS, json={"scopes": ["orgs:write"]}, headers=token)).json()
    key_id, secret = issued["id"], issued["key"].rsplit("_", 1)[1]
    await http.post(ORGS, json={"name": "A"}, headers=api_key(issued["key"]))
    await http.post(ORGS, json={"name": "A"}, headers=api_key(issued["key"][:-1] + "0"))
    rotated = (await http.post(f"{KEYS}/{key_id}/rotate", json={"overlap_seconds": 60}, headers=token)).json()
    await http.delete(f"{KEYS}/{key_id}", headers=token)
    secrets_shown = [secret, rotated["key"].rsplit("_", 1)[1]]
    assert any(getattr(r, "event", "") == "api_key_issued" for r in every_log_record)
    for record in every_log_record:
        logged = record.getMessage() + repr(record.__dict__)
        for shown in secrets_shown:
            assert shown not in logged
            assert shown[:16] not in logged


async def test_last_use_is_written_in_batches_off_the_request_path(http: httpx.AsyncClient, key_app: FastAPI) -> None:
    issued = await issue(key_app)
    for _ in range(5):
        await http.get(ORGS + "/x", headers=api_key(issued.key))
    last_used: LastUsed = authenticator(key_app).last_used
    assert list(last_used._pending) == [issued.info.id]  # noted once, not five times
    async with key_app.state.runtime.sessionmaker() as session:
        assert (await store.get_key(session, issued.info.id)).last_used_at is None  # type: ignore[union-attr]
    await last_used.flush()
    async with key_app.state.runtime.sessionmaker() as session:
        used = (await store.get_key(session, issued.info.id)).last_used_at  # type: ignore[union-attr]
    assert used is not None and abs((datetime.now(UTC) - used).total_seconds()) < 60
    await http.get(ORGS + "/x", headers=api_key(issued.key))
    assert not last_used._pending  # written less than a minute ago: not noted again


def test_production_refuses_to_start_without_a_pepper(
    settings_for: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("API_KEY_PEPPER", raising=False)
    with pytest.raises(ConfigError, match="API_KEY_PEPPER"):
        create_app(settings_for(environment="production", trusted_hosts=["api.example.com"]))
    monkeypatch.setenv("API_KEY_PEPPER", "short")
    with pytest.raises(ConfigError, match="API_KEY_PEPPER"):
        create_app(settings_for(environment="production", trusted_hosts=["api.example.com"]))
    monkeypatch.setenv("API_KEY_PEPPER", "p" * 40)
    create_app(settings_for(environment="production", trusted_hosts=["api.example.com"]))


def test_the_scanner_rule_matches_issued_keys_only() -> None:
    import re

    pattern = re.compile(scanner_pattern(DEFAULT_PREFIX))
    key = f"{DEFAULT_PREFIX}_{secrets.token_hex(8)}_{secrets.token_hex(32)}"
    assert pattern.search(f"export KEY={key}\n")
    assert not pattern.search(key[:-1])
    assert not pattern.search("x" + key)


# --- The operators' commands --------------------------------------------------------------------


async def test_the_cli_issues_lists_rotates_and_revokes(
    cli_env: None,
    monkeypatch: pytest.MonkeyPatch,
    migrated_database: str,
    http: httpx.AsyncClient,
    capsys: Any,
) -> None:
    monkeypatch.setenv("DATABASE_URL", migrated_database)
    argv = ["api-key", "issue", "--owner", "partner-admin", "--scope", "orgs:write", "--expires-in", "30d"]
    argv += ["--allow-network", "203.0.113.0/24"]
    assert await anyio.to_thread.run_sync(main, argv) == 0
    out = capsys.readouterr()
    key = out.out.strip()
    key_id = key.split("_")[1]
    assert key not in out.err and key_id in out.err
    assert (await http.post(ORGS, json={"name": "A"}, headers=api_key(key))).status_code == 201

    assert await anyio.to_thread.run_sync(main, ["api-key", "list", "--owner", "partner-admin"]) == 0
    listed = capsys.readouterr().out
    assert key_id in listed and key.rsplit("_", 1)[1] not in listed and "203.0.113.0/24" in listed
    assert f"owner={principal('partner-admin')}" in listed  # the token subject partner-admin of JWT_ISSUER

    assert await anyio.to_thread.run_sync(main, ["api-key", "rotate", key_id, "--overlap", "1h"]) == 0
    new = capsys.readouterr().out.strip()
    for current in (key, new):
        assert (await http.post(ORGS, json={"name": "A"}, headers=api_key(current))).status_code == 201

    assert await anyio.to_thread.run_sync(main, ["api-key", "revoke", key_id]) == 0
    assert "revoked" in capsys.readouterr().out
    for current in (key, new):
        assert_refused(await http.post(ORGS, json={"name": "A"}, headers=api_key(current)))
    assert await anyio.to_thread.run_sync(main, ["api-key", "revoke", key_id]) == 1


def test_the_cli_refuses_bad_input(
    cli_env: None, monkeypatch: pytest.MonkeyPatch, migrated_database: str, capsys: Any
) -> None:
    monkeypatch.setenv("DATABASE_URL", migrated_database)
    assert main(["api-key", "issue", "--owner", "apikey:abc", "--scope", "orgs:read"]) == 2
    assert main(["api-key", "issue", "--owner", "bob", "--scope", "api-keys:write"]) == 2
    assert main(["api-key", "issue", "--owner", "bob", "--scope", "orgs:read", "--allow-network", "nope"]) == 2
    with pytest.raises(SystemExit):
        main(["api-key", "rotate", "NOT-AN-ID"])
    assert "key" in capsys.readouterr().err


# --- The self-scan check ------------------------------------------------------------------------


async def scan_result(app: FastAPI, token: str, check: Callable[[Scan], Any] = scan_check.check) -> Any:
    probe = Probe("http://localhost", max_requests=50, max_seconds=30, transport=ThreadBridge(app))
    scan = Scan(probe=probe, token=token)
    try:
        return await anyio.to_thread.run_sync(check, scan)
    finally:
        probe.close()


async def test_the_scans_token_check_still_passes_with_the_apikey_challenge_first(
    http: httpx.AsyncClient, key_app: FastAPI, make_token: TokenFactory
) -> None:
    result = await scan_result(key_app, make_token("alice", MANAGER_SCOPES), scan_authn.check)
    assert result.status is Status.PASS, result


async def test_the_scan_check_passes_on_a_healthy_instance(
    http: httpx.AsyncClient, key_app: FastAPI, make_token: TokenFactory
) -> None:
    result = await scan_result(key_app, make_token("alice", MANAGER_SCOPES))
    assert result.status is Status.PASS, result


async def test_the_scan_check_fails_on_an_instance_that_accepts_forged_keys(
    http: httpx.AsyncClient, key_app: FastAPI, make_token: TokenFactory
) -> None:
    broken = authenticator(key_app)

    async def accept_anything(key_id: str, _secret: str) -> KnownKey:
        principal = Principal(f"apikey:{key_id}", frozenset({"orgs:read"}), None, 0, 2**31)
        return KnownKey(principal, (), 0.0)

    broken._look_up = accept_anything  # type: ignore[method-assign,assignment]
    result = await scan_result(key_app, make_token("alice", MANAGER_SCOPES))
    assert result.status is Status.FAIL
    assert "forged key in X-API-Key: answered 403" in result.reason


async def test_the_scan_check_fails_on_an_instance_that_ignores_unknown_keys(
    http: httpx.AsyncClient, key_app: FastAPI, make_token: TokenFactory
) -> None:
    broken = authenticator(key_app)
    real = broken.authenticate

    async def ignore_refused(scope: Any) -> Principal | None:
        try:
            return await real(scope)
        except Exception:
            return None

    broken.authenticate = ignore_refused  # type: ignore[method-assign]
    result = await scan_result(key_app, make_token("alice", MANAGER_SCOPES))
    assert result.status is Status.FAIL
    assert "forged key next to a valid token" in result.reason


# --- The noticed items of issue 23 ------------------------------------------------------------


def test_the_key_cache_keeps_the_keys_in_use_and_drops_the_least_recently_used() -> None:
    cache = KnownKeys(size=2)

    def entry(name: str) -> KnownKey:
        return KnownKey(Principal(f"apikey:{name}", frozenset(), None, 0, 2**31), (), 2**31)

    cache.put(b"a", entry("a"))
    cache.put(b"b", entry("b"))
    assert cache.get(b"a") is not None  # a is in use ...
    cache.put(b"c", entry("c"))
    assert cache.get(b"a") is not None  # ... so b, not a, made room for c
    assert cache.get(b"b") is None
    assert cache.get(b"c") is not None


async def test_a_revocation_redis_cannot_take_is_a_503_and_changes_nothing(
    settings_for: Callable[..., Settings], make_token: TokenFactory
) -> None:
    # Open mode, so the request itself is served while Redis is unreachable: only the revocation needs it.
    dead = create_app(settings_for(redis_url=f"redis://127.0.0.1:{free_port()}/0", rate_limit_failure_mode="open"))
    async with running(dead, reset=False) as http:
        await clear_keys(dead)
        issued = await issue(dead, owner="alice")
        owner = bearer(make_token("alice", MANAGER_SCOPES))
        refused = await http.delete(f"{KEYS}/{issued.info.id}", headers=owner)
        assert refused.status_code == 503, refused.text
        assert refused.headers["content-type"].startswith("application/problem+json")
        assert "not revoked" in refused.json()["detail"]
        rotated = await http.post(f"{KEYS}/{issued.info.id}/rotate", json={}, headers=owner)
        assert rotated.status_code == 503 and "not rotated" in rotated.json()["detail"]
        # Nothing changed: the key is neither revoked nor given a new secret, and it still works.
        shown = await http.get(f"{KEYS}/{issued.info.id}", headers=owner)
        assert shown.json()["revoked_at"] is None and shown.json()["previous_secret_expires_at"] is None
        assert (await http.get(KEYS, headers=api_key(issued.key))).status_code == 403  # authenticated, not allowed


@pytest.fixture(scope="module")
def replicated(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ReplicatedRedis]:
    pair = start_replicated_redis(tmp_path_factory.mktemp("replicated"))
    yield pair
    pair.stop()


async def test_a_revocation_no_replica_acknowledges_is_a_503_and_changes_nothing(
    settings_for: Callable[..., Settings],
    make_token: TokenFactory,
    replicated: ReplicatedRedis,
    cli_env: None,
    monkeypatch: pytest.MonkeyPatch,
    migrated_database: str,
    capsys: Any,
) -> None:
    app = create_app(settings_for(redis_url=replicated.primary.url))
    async with running(app) as http:
        await clear_keys(app)
        issued = await issue(app, owner="alice")
        owner = bearer(make_token("alice", MANAGER_SCOPES))
        monkeypatch.setenv("REDIS_URL", replicated.primary.url)
        monkeypatch.setenv("DATABASE_URL", migrated_database)
        with replicated.replica.paused():  # connected to the primary, acknowledging nothing
            refused = await http.delete(f"{KEYS}/{issued.info.id}", headers=owner)
            assert refused.status_code == 503, refused.text
            assert "not revoked" in refused.json()["detail"]
            rotated = await http.post(f"{KEYS}/{issued.info.id}/rotate", json={}, headers=owner)
            assert rotated.status_code == 503 and "not rotated" in rotated.json()["detail"]
            assert await anyio.to_thread.run_sync(main, ["api-key", "revoke", issued.info.id]) == 1
            assert "no Redis replica acknowledged" in capsys.readouterr().err
        shown = await http.get(f"{KEYS}/{issued.info.id}", headers=owner)
        assert shown.json()["revoked_at"] is None and shown.json()["previous_secret_expires_at"] is None
        # The replica back: the revocation is done, and on the replica.
        assert (await http.delete(f"{KEYS}/{issued.info.id}", headers=owner)).status_code == 204
        with redis_client(replicated.replica.port) as replica:
            assert replica.exists(f"{SERVICE_NAME}:revoked:sub:{tag('apikey:' + issued.info.id)}") == 1


async def test_open_mode_still_refuses_a_key_revoked_before_the_outage(
    settings_for: Callable[..., Settings], make_token: TokenFactory, tmp_path_factory: pytest.TempPathFactory
) -> None:
    server = start_redis(tmp_path_factory.mktemp("outage"))
    app = create_app(settings_for(redis_url=server.url, rate_limit_failure_mode="open"))
    try:
        async with running(app) as http:
            await clear_keys(app)
            revoked, good = await issue(app, owner="alice"), await issue(app, owner="alice")
            for issued in (revoked, good):  # each looked up once: reused from memory for a while
                assert (await http.get(KEYS, headers=api_key(issued.key))).status_code == 403  # authenticated
            owner = bearer(make_token("alice", MANAGER_SCOPES))
            assert (await http.delete(f"{KEYS}/{revoked.info.id}", headers=owner)).status_code == 204
            server.kill()  # the outage
            assert_refused(await http.get(KEYS, headers=api_key(revoked.key)))
            assert (await http.get(KEYS, headers=api_key(good.key))).status_code == 403  # served: authenticated
    finally:
        server.stop()


# --- Revision api_keys_0002: owners are principal ids ---------------------------------------------


def test_revision_0002_qualifies_bare_owners_only_with_the_issuer_named(tmp_path: Path, database_url: str) -> None:
    """Keys issued before owners were principal ids name a token `sub` of an issuer the revision
    cannot guess: without `-x jwt_issuer=...` it refuses and changes nothing."""
    from {{ cookiecutter.package_name }}.migrations import alembic_config

    from .conftest import DATABASE, ISSUER

    url = f"sqlite+aiosqlite:///{tmp_path / 'keys.db'}" if DATABASE == "sqlite" else database_url
    config = alembic_config(url)
    command.upgrade(config, "heads")
    command.downgrade(config, "api_keys_0001")
    insert = (
        "INSERT INTO api_keys (id, owner, name, scopes, networks, secret_hash, created_by, expires_at) "
        "VALUES (:id, :owner, '', 'orgs:read', '', :hash, 'test', :expires)"
    )
    expires = datetime.now(UTC) + timedelta(days=1)
    owners = "SELECT owner FROM api_keys WHERE id IN ('0000000000000001', '0000000000000002') ORDER BY id"
    rows = [
        {"id": "0000000000000001", "owner": "partner-admin", "hash": "0" * 64, "expires": expires},
        {"id": "0000000000000002", "owner": principal("already"), "hash": "1" * 64, "expires": expires},
    ]
    try:
        asyncio.run(run_sql(url, insert, rows))
        with pytest.raises(RuntimeError, match="jwt_issuer"):
            command.upgrade(config, "heads")
        assert asyncio.run(run_sql(url, owners)) == ["partner-admin", principal("already")]
        config.cmd_opts = argparse.Namespace(x=[f"jwt_issuer={ISSUER}"])
        command.upgrade(config, "heads")
        assert asyncio.run(run_sql(url, owners)) == [principal("partner-admin"), principal("already")]
    finally:
        asyncio.run(run_sql(url, "DELETE FROM api_keys WHERE id IN ('0000000000000001', '0000000000000002')"))
        config.cmd_opts = None
        command.upgrade(config, "heads")


# --- Step-up (README "Step-up") -----------------------------------------------------------------


async def test_an_api_key_is_refused_on_a_step_up_route_it_could_otherwise_use(
    settings_for: Callable[..., Settings], make_token: TokenFactory
) -> None:
    """A key names no user's authentication, so it can never satisfy a step-up: fail closed, with
    the challenge that says what would (a user's token, recently authenticated)."""
    for max_age, expected in ((None, 201), (300, 401)):
        app = create_app(settings_for(step_up_max_age_seconds=max_age))
        async with running(app, PARTNER) as http:
            owner = bearer(make_token("alice", MANAGER_SCOPES, auth_time=int(time.time())))
            org_id = (await http.post(ORGS, json={"name": "Acme"}, headers=owner)).json()["id"]
            issued = await issue(app, scopes=("orgs:read", "orgs:write"))
            subject = f"apikey:{issued.info.id}"
            made = await http.put(f"{ORGS}/{org_id}/grants/{subject}", json={"relation": "owner"}, headers=owner)
            assert made.status_code == 201, made.text
            changed = await http.put(
                f"{ORGS}/{org_id}/grants/bob", json={"relation": "viewer"}, headers=api_key(issued.key)
            )
            assert changed.status_code == expected, changed.text
            if expected == 401:
                assert changed.headers["content-type"] == "application/problem+json"
                assert changed.headers["www-authenticate"].startswith('Bearer error="insufficient_user_authentication"')
                assert 'max_age="300"' in changed.headers["www-authenticate"]


# --- Privilege changes by the operators' commands (README "Audit logging") ---------------------


async def test_keys_issued_and_revoked_by_the_cli_are_events_naming_key_owner_and_operator(
    cli_env: None, monkeypatch: pytest.MonkeyPatch, migrated_database: str, http: httpx.AsyncClient, capsys: Any
) -> None:
    monkeypatch.setenv("DATABASE_URL", migrated_database)
    monkeypatch.setenv("AUDIT_PSEUDONYM_KEY", PSEUDONYM_KEY)
    for name in ("LOGNAME", "USER"):
        monkeypatch.setenv(name, "ops-jane")

    def events(err: str) -> list[dict[str, Any]]:
        lines = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
        return [line for line in lines if line.get("event") == "privilege_changed"]

    argv = ["api-key", "issue", "--owner", "partner-admin", "--scope", "orgs:read", "--expires-in", "30d"]
    assert await anyio.to_thread.run_sync(main, argv) == 0
    out = capsys.readouterr()
    key = out.out.strip()
    key_id = key.split("_")[1]
    [issued] = events(out.err)
    assert (issued["action"], issued["key_id"], issued["scopes"]) == ("api_key_issued", key_id, ["orgs:read"])
    assert issued["grantee"] == pseudonym(f"apikey:{key_id}", PSEUDONYM_KEY)
    assert issued["owner"] == pseudonym(principal("partner-admin"), PSEUDONYM_KEY)
    assert (issued["operator"], issued["command"]) == ("ops-jane", "api-key-issue")
    assert key.rsplit("_", 1)[1] not in out.err  # never the secret
    assert await anyio.to_thread.run_sync(main, ["api-key", "revoke", key_id]) == 0
    [revoked] = events(capsys.readouterr().err)
    assert (revoked["action"], revoked["key_id"], revoked["command"]) == ("api_key_revoked", key_id, "api-key-revoke")
    assert revoked["grantee"] == issued["grantee"]


async def test_moving_the_issuer_gives_its_subjects_keys_to_the_new_issuers_same_sub(
    cli_env: None,
    monkeypatch: pytest.MonkeyPatch,
    migrated_database: str,
    key_app: FastAPI,
    http: httpx.AsyncClient,
    settings_for: Callable[..., Settings],
    make_token: TokenFactory,
    capsys: Any,
) -> None:
    """`grants move-issuer` moves the keys' owners with the grants (one transaction): the new
    issuer's alice manages alice's keys; a third issuer's subject keeps its keys."""
    monkeypatch.setenv("DATABASE_URL", migrated_database)
    other_issuer = "https://login.example.com/"
    alices = await issue(key_app)
    async with key_app.state.runtime.sessionmaker() as session:
        third = principal("alice", "https://third.example.com/")
        kept = await store.issue(
            session,
            authenticator(key_app).settings,
            owner=third,
            name="billing",
            scopes=("orgs:read",),
            networks=(),
            lifetime_seconds=None,
            created_by="tests",
        )
        await session.commit()
    assert await anyio.to_thread.run_sync(main, ["grants", "move-issuer", "--from", ISSUER, "--to", other_issuer]) == 0
    assert "moved 1 row(s) of the api_keys option" in capsys.readouterr().out
    async with key_app.state.runtime.sessionmaker() as session:
        owners = {key_id: owner for key_id, owner in await session.execute(text("SELECT id, owner FROM api_keys"))}
    assert owners == {alices.info.id: principal("alice", other_issuer), kept.info.id: third}
    old_alice = bearer(make_token("alice", MANAGER_SCOPES))
    assert (await http.get(KEYS, headers=old_alice)).json() == []
    async with running(create_app(settings_for(jwt_issuer=other_issuer)), reset=False) as moved:
        new_alice = bearer(make_token("alice", MANAGER_SCOPES, iss=other_issuer))
        assert [key["id"] for key in (await moved.get(KEYS, headers=new_alice)).json()] == [alices.info.id]


# A route of an owner's that serves keys too: its step-up binds users' tokens only.
ServesKeysToo = Annotated[
    Principal, no_object_policy(scopes=["orgs:read"], step_up=StepUp(max_age=60, other_credentials=True))
]


async def test_a_step_up_route_that_allows_other_credentials_serves_a_key_and_still_judges_tokens(
    settings: Settings, make_token: TokenFactory
) -> None:
    app = create_app(settings)

    @app.get("/api/v1/export")
    async def export(principal: ServesKeysToo) -> dict[str, str]:
        return {"subject": principal.subject}

    async with running(app, PARTNER) as http:
        issued = await issue(app, scopes=("orgs:read",))
        served = await http.get("/api/v1/export", headers=api_key(issued.key))
        assert (served.status_code, served.json()) == (200, {"subject": f"apikey:{issued.info.id}"})
        stale = bearer(make_token("alice", auth_time=int(time.time()) - 3600))
        refused = await http.get("/api/v1/export", headers=stale)
        assert refused.status_code == 401
        assert refused.headers["www-authenticate"].startswith('Bearer error="insufficient_user_authentication"')


# --- Quota ----------------------------------------------------------------------------------------


async def test_keys_beyond_api_key_max_per_owner_are_409_even_when_issued_concurrently(
    monkeypatch: pytest.MonkeyPatch, settings: Settings, make_token: TokenFactory
) -> None:
    """A business limit (ASVS 5.0 V2.1.3): live keys per owner, counted in the insert's transaction."""
    monkeypatch.setenv("API_KEY_MAX_PER_OWNER", "3")
    app = create_app(settings)
    async with running(app) as http:
        await clear_keys(app)
        alice = bearer(make_token("alice", MANAGER_SCOPES))
        body = {"name": "partner", "scopes": ["orgs:read"]}
        answers = await asyncio.gather(*(http.post(KEYS, json=body, headers=alice) for _ in range(8)))
        assert sorted(answer.status_code for answer in answers) == [201] * 3 + [409] * 5
        refused = next(answer for answer in answers if answer.status_code == 409)
        assert refused.json()["type"].endswith(":problem:quota-exceeded")
        assert "API_KEY_MAX_PER_OWNER" in refused.json()["detail"]
        assert len((await http.get(KEYS, headers=alice)).json()) == 3
        # A revoked key no longer counts: revoking one makes room for one.
        revoked = next(answer for answer in answers if answer.status_code == 201).json()["id"]
        assert (await http.delete(f"{KEYS}/{revoked}", headers=alice)).status_code == 204
        assert (await http.post(KEYS, json=body, headers=alice)).status_code == 201
        assert (await http.post(KEYS, json=body, headers=alice)).status_code == 409


async def test_a_refused_key_owner_check_is_an_authz_decision_with_the_key(
    http: httpx.AsyncClient, key_app: FastAPI, make_token: TokenFactory
) -> None:
    bobs = await issue(key_app, owner="bob")
    with captured_logs() as logs:
        denied = await http.get(f"{KEYS}/{bobs.info.id}", headers=bearer(make_token("alice", MANAGER_SCOPES)))
    assert denied.status_code == 403
    decision = logs.event(denied, "authz_decision")
    assert (decision["resource_type"], decision["resource_id"]) == ("api_key", bobs.info.id)
    assert (decision["action"], decision["required"], decision["outcome"]) == ("api-keys:read", "owner", "deny")
