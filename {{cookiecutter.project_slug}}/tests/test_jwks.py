"""JWT_JWKS_URL: keys fetched from a real local HTTP endpoint, rotated without restart, refetched
on an unknown `kid` at most once per cooldown per kid (and once a second for all of them), and kept
when the endpoint fails."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from fastapi import FastAPI

from {{ cookiecutter.package_name }}.app import create_app
from {{ cookiecutter.package_name }}.config import ConfigError, Settings
from {{ cookiecutter.package_name }}.security.keys import UNKNOWN_KID_FETCH_INTERVAL_SECONDS, JwksError, JwksKeys, parse_jwks
from {{ cookiecutter.package_name }}.startup import load_settings

from .conftest import TokenFactory, bearer, running
from .jwks_server import JwksServer, public_jwk

PROTECTED = "/api/v1/orgs"


@pytest.fixture
def jwks() -> Iterator[JwksServer]:
    server = JwksServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def new_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture
def key_a(private_key: rsa.RSAPrivateKey) -> dict[str, Any]:
    return public_jwk(private_key.public_key(), "a", use="sig", alg="RS256")


@pytest.fixture
def key_b(new_key: rsa.RSAPrivateKey) -> dict[str, Any]:
    return public_jwk(new_key.public_key(), "b", use="sig", alg="RS256")


@pytest.fixture
def jwks_app(settings_for: Callable[..., Settings], jwks: JwksServer) -> Callable[..., FastAPI]:
    def build(**overrides: Any) -> FastAPI:
        return create_app(settings_for(jwt_public_key=None, jwt_jwks_url=jwks.url, **overrides))

    return build


async def status_of(http: httpx.AsyncClient, token: str) -> int:
    response = await http.post(PROTECTED, json={"name": "Acme"}, headers=bearer(token))
    assert response.status_code in (201, 401), response.text
    return response.status_code


async def test_token_is_verified_with_the_jwks_key_its_kid_names(
    jwks: JwksServer,
    jwks_app: Callable[..., FastAPI],
    make_token: TokenFactory,
    key_a: dict[str, Any],
    key_b: dict[str, Any],
    new_key: rsa.RSAPrivateKey,
) -> None:
    jwks.serve_keys(key_a, key_b)
    async with running(jwks_app()) as http:
        assert await status_of(http, make_token(headers={"kid": "a"})) == 201
        assert await status_of(http, make_token(key=new_key, headers={"kid": "b"})) == 201
        # The right key under the wrong kid is not accepted: kid selects, it does not suggest.
        assert await status_of(http, make_token(headers={"kid": "b"})) == 401
    assert jwks.fetches == 1


async def test_rotation_to_a_new_kid_works_without_restart(
    jwks: JwksServer,
    jwks_app: Callable[..., FastAPI],
    make_token: TokenFactory,
    key_a: dict[str, Any],
    key_b: dict[str, Any],
    new_key: rsa.RSAPrivateKey,
) -> None:
    jwks.serve_keys(key_a)
    async with running(jwks_app()) as http:
        old_token = make_token(headers={"kid": "a"})
        assert await status_of(http, old_token) == 201
        jwks.serve_keys(key_a, key_b)  # the issuer publishes its next key, then signs with it
        assert await status_of(http, make_token(key=new_key, headers={"kid": "b"})) == 201
        assert await status_of(http, old_token) == 201  # both keys are trusted during the overlap
    assert jwks.fetches == 2


async def test_key_dropped_from_the_jwks_stops_verifying_even_cached_tokens(
    jwks: JwksServer,
    jwks_app: Callable[..., FastAPI],
    make_token: TokenFactory,
    key_a: dict[str, Any],
    key_b: dict[str, Any],
    new_key: rsa.RSAPrivateKey,
) -> None:
    jwks.serve_keys(key_a)
    async with running(jwks_app()) as http:
        old_token = make_token(headers={"kid": "a"})
        assert await status_of(http, old_token) == 201  # now in the verified-token cache
        jwks.serve_keys(key_b)  # key a withdrawn (e.g. compromised)
        assert await status_of(http, make_token(key=new_key, headers={"kid": "b"})) == 201
        assert await status_of(http, old_token) == 401


async def test_burst_of_unknown_kids_causes_at_most_one_fetch_a_second_and_none_when_repeated(
    jwks: JwksServer, jwks_app: Callable[..., FastAPI], make_token: TokenFactory, key_a: dict[str, Any]
) -> None:
    jwks.serve_keys(key_a)
    # 60 refused tokens from one address: no lockout here, this test is about fetches.
    async with running(jwks_app(jwt_jwks_min_refetch_seconds=60, lockout_failures=1000)) as http:
        assert jwks.fetches == 1  # at start
        tokens = [make_token(headers={"kid": uuid.uuid4().hex}) for _ in range(50)]
        started = time.monotonic()
        statuses = await asyncio.gather(*(status_of(http, token) for token in tokens))
        elapsed = time.monotonic() - started
        assert statuses == [401] * 50
        # The waiting requests share one fetch; at most one a second starts (UNKNOWN_KID_FETCH_INTERVAL_SECONDS).
        burst = jwks.fetches - 1
        assert 1 <= burst <= 1 + elapsed / UNKNOWN_KID_FETCH_INTERVAL_SECONDS
        for token in tokens[:10]:  # and again, one after the other: each kid was looked for already
            assert await status_of(http, token) == 401
        assert await status_of(http, make_token(headers={"kid": "a"})) == 201
    assert jwks.fetches == 1 + burst


async def test_the_same_unknown_kid_refetches_again_only_once_its_cooldown_has_passed(
    jwks: JwksServer, jwks_app: Callable[..., FastAPI], make_token: TokenFactory, key_a: dict[str, Any]
) -> None:
    jwks.serve_keys(key_a)
    async with running(jwks_app(jwt_jwks_min_refetch_seconds=1)) as http:
        assert await status_of(http, make_token(headers={"kid": "unknown-1"})) == 401
        assert await status_of(http, make_token(headers={"kid": "unknown-1"})) == 401
        assert jwks.fetches == 2  # at start, then once for unknown-1
        await asyncio.sleep(1.1)
        assert await status_of(http, make_token(headers={"kid": "unknown-1"})) == 401
        assert jwks.fetches == 3


async def test_invented_kids_cannot_starve_the_refetch_a_real_rotation_needs(
    jwks: JwksServer,
    jwks_app: Callable[..., FastAPI],
    make_token: TokenFactory,
    key_a: dict[str, Any],
    key_b: dict[str, Any],
    new_key: rsa.RSAPrivateKey,
) -> None:
    jwks.serve_keys(key_a)
    async with running(jwks_app(jwt_jwks_min_refetch_seconds=60, lockout_failures=1000)) as http:
        # Just before the issuer rotates, someone sends invented kids: each costs a fetch (at most
        # one a second, all of them together) ...
        assert await status_of(http, make_token(headers={"kid": "invented-1"})) == 401
        assert await status_of(http, make_token(headers={"kid": "invented-2"})) == 401
        jwks.serve_keys(key_a, key_b)  # ... and the issuer publishes its new key and signs with it
        started = time.monotonic()
        # Its first token is verified now, not JWT_JWKS_MIN_REFETCH_SECONDS later.
        assert await status_of(http, make_token(key=new_key, headers={"kid": "b"})) == 201
        assert time.monotonic() - started < 2
        assert await status_of(http, make_token(headers={"kid": "invented-1"})) == 401  # remembered: no fetch
    assert jwks.fetches == 4  # at start, invented-1, invented-2, b


async def test_jwks_endpoint_down_keeps_the_last_good_keys(
    jwks: JwksServer,
    jwks_app: Callable[..., FastAPI],
    make_token: TokenFactory,
    key_a: dict[str, Any],
    audit_events: list[logging.LogRecord],
) -> None:
    jwks.serve_keys(key_a)
    app = jwks_app()
    async with running(app) as http:
        jwks.stop()
        assert await app.state.runtime.keys.refresh() is False
        # A token never seen before, so verified with the kept key rather than served from the cache.
        assert await status_of(http, make_token(headers={"kid": "a"})) == 201
        assert await status_of(http, make_token(headers={"kid": "rotated"})) == 401  # 401, not 500
        assert (await http.get("/health/ready")).json()["checks"]["keys"] == "ok"
    assert "jwks_fetch_failed" in [getattr(record, "event", "") for record in audit_events]


@pytest.mark.parametrize(
    ("status", "document"),
    [
        (500, {"error": "boom"}),
        (200, "not a jwks"),
        (200, {"keys": []}),
        (200, {"keys": [{"kty": "oct", "k": "c2VjcmV0", "kid": "a"}]}),
    ],
    ids=["server-error", "not-jwks", "no-keys", "only-symmetric"],
)
async def test_jwks_endpoint_answering_nonsense_keeps_the_last_good_keys(
    jwks: JwksServer,
    jwks_app: Callable[..., FastAPI],
    make_token: TokenFactory,
    key_a: dict[str, Any],
    status: int,
    document: Any,
) -> None:
    jwks.serve_keys(key_a)
    app = jwks_app()
    async with running(app) as http:
        jwks.status, jwks.document = status, document
        assert await app.state.runtime.keys.refresh() is False
        assert await status_of(http, make_token(headers={"kid": "a"})) == 201


async def test_service_started_while_jwks_is_down_recovers_without_restart(
    jwks: JwksServer, jwks_app: Callable[..., FastAPI], make_token: TokenFactory, key_a: dict[str, Any]
) -> None:
    jwks.serve_keys(key_a)
    jwks.stop()
    async with running(jwks_app()) as http:
        assert (await http.get("/health/ready")).json()["checks"]["keys"] == "fail"
        jwks.start()  # same port
        # The issuer is back: the unknown kid triggers the refetch that loads the keys.
        assert await status_of(http, make_token(headers={"kid": "a"})) == 201
        await asyncio.sleep(1.1)  # readiness caches its answer for a second
        assert (await http.get("/health/ready")).json()["checks"]["keys"] == "ok"


async def test_background_refresh_picks_up_new_keys_without_any_request(
    jwks: JwksServer, key_a: dict[str, Any], key_b: dict[str, Any]
) -> None:
    jwks.serve_keys(key_a)
    keys = JwksKeys(jwks.url, algorithms=frozenset({"RS256"}), refresh_seconds=0.05, min_refetch_seconds=60)
    await keys.start()
    try:
        jwks.serve_keys(key_a, key_b)
        deadline = time.monotonic() + 10
        while keys.generation < 2 and time.monotonic() < deadline:  # noqa: ASYNC110  # polls the background task
            await asyncio.sleep(0.05)
        assert keys.generation == 2
        assert await keys.find("b") is not None
    finally:
        await keys.stop()
    fetches = jwks.fetches
    await asyncio.sleep(0.2)
    assert jwks.fetches == fetches  # stopped means stopped


async def test_token_without_kid_is_accepted_only_when_the_jwks_has_a_single_key(
    jwks: JwksServer,
    jwks_app: Callable[..., FastAPI],
    make_token: TokenFactory,
    key_a: dict[str, Any],
    key_b: dict[str, Any],
) -> None:
    jwks.serve_keys(key_a)
    async with running(jwks_app()) as http:
        assert await status_of(http, make_token()) == 201
    jwks.serve_keys(key_a, key_b)
    async with running(jwks_app()) as http:
        assert await status_of(http, make_token()) == 401


def test_only_public_signing_keys_from_the_allowlist_are_loaded(
    private_key: rsa.RSAPrivateKey, key_a: dict[str, Any]
) -> None:
    private_jwk = {**key_a, "kid": "private", "d": "AQAB", "p": "AQAB", "q": "AQAB"}
    ec_key = public_jwk(ec.generate_private_key(ec.SECP256R1()).public_key(), "ec")
    document = {
        "keys": [
            key_a,
            {**key_a, "kid": "encryption", "use": "enc"},
            {**key_a, "kid": "rs512", "alg": "RS512"},
            {**key_a, "kid": "hs256", "alg": "HS256"},
            {"kty": "oct", "k": "c2VjcmV0", "kid": "symmetric"},
            private_jwk,
            ec_key,
            {"kty": "RSA", "kid": "broken", "n": "!!", "e": "AQAB"},
            "not a key",
        ]
    }
    assert set(parse_jwks(document, frozenset({"RS256"}))) == {"a"}
    assert set(parse_jwks(document, frozenset({"RS256", "ES256"}))) == {"a", "ec"}


def test_jwks_without_usable_keys_is_an_error(key_a: dict[str, Any]) -> None:
    with pytest.raises(JwksError):
        parse_jwks({"keys": [{**key_a, "use": "enc"}]}, frozenset({"RS256"}))


def test_public_key_and_jwks_url_together_are_refused(monkeypatch: pytest.MonkeyPatch, public_pem: str) -> None:
    for name, value in {
        "JWT_PUBLIC_KEY": public_pem,
        "JWT_JWKS_URL": "https://issuer.test/jwks.json",
        "JWT_ISSUER": "https://issuer.test",
        "JWT_AUDIENCE": "svc",
    }.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match="not both"):
        load_settings()
