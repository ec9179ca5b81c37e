"""OIDC discovery: JWT_ISSUER alone is enough. The service reads the issuer's real (local) discovery
document, takes its `jwks_uri` and verifies tokens with the keys found there; a document naming
another issuer, or a plain-http jwks_uri in production, is never used."""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from fastapi import FastAPI

from {{ cookiecutter.package_name }}.app import create_app
from {{ cookiecutter.package_name }}.config import ConfigError, Settings
from {{ cookiecutter.package_name }}.security.keys import DISCOVERY_PATH, DiscoveredKeys

from .certificates import Issued, make_ca, server_certificate
from .conftest import TokenFactory, bearer, running
from .jwks_server import JwksServer, public_jwk

PROTECTED = "/api/v1/orgs"
REALM = "/realms/main"  # an issuer with a path, as Keycloak's and Azure AD's are
KEYS_PATH = "/protocol/openid-connect/certs"


@pytest.fixture(scope="module")
def ca() -> Issued:
    return make_ca("Discovery test CA")


@pytest.fixture
def provider() -> Iterator[JwksServer]:
    """A plain-http identity provider on loopback (development)."""
    server = JwksServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def tls_provider(ca: Issued, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[JwksServer]:
    """The same over HTTPS, with a certificate of a throwaway CA the service's client trusts
    (SSL_CERT_FILE, which httpx reads), so production's https-only rules can be exercised."""
    cert, key = server_certificate(ca).write(tmp_path, "provider")
    (tmp_path / "ca.crt").write_bytes(ca.cert_pem)
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "ca.crt"))
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    server = JwksServer()
    server.start(tls=context)
    yield server
    server.stop()


def issuer_of(server: JwksServer) -> str:
    return server.url_for(REALM)


def publish(server: JwksServer, key: dict[str, Any], *, issuer: str | None = None, jwks_uri: str | None = None) -> None:
    """The provider's discovery document (naming `issuer`, by default its own) and its JWKS."""
    server.documents = {
        REALM + DISCOVERY_PATH: {
            "issuer": issuer or issuer_of(server),
            "jwks_uri": jwks_uri or server.url_for(REALM + KEYS_PATH),
            "authorization_endpoint": server.url_for(REALM + "/auth"),
            "response_types_supported": ["code"],
        },
        REALM + KEYS_PATH: {"keys": [key]},
    }
    server.document = {"error": "not found"}
    server.status = 200


@pytest.fixture
def key_a(private_key: rsa.RSAPrivateKey) -> dict[str, Any]:
    return public_jwk(private_key.public_key(), "a", use="sig", alg="RS256")


@pytest.fixture
def discovering_app(settings_for: Callable[..., Settings]) -> Callable[..., FastAPI]:
    """An app configured with JWT_ISSUER alone: no JWT_PUBLIC_KEY, no JWT_JWKS_URL."""

    def build(issuer: str, **overrides: Any) -> FastAPI:
        return create_app(settings_for(jwt_public_key=None, jwt_jwks_url=None, jwt_issuer=issuer, **overrides))

    return build


def production(**overrides: Any) -> dict[str, Any]:
    return {"environment": "production", "trusted_hosts": ["localhost"], **overrides}


async def test_issuer_alone_finds_the_keys_and_a_token_verifies_end_to_end(
    provider: JwksServer,
    discovering_app: Callable[..., FastAPI],
    make_token: TokenFactory,
    key_a: dict[str, Any],
) -> None:
    publish(provider, key_a)
    issuer = issuer_of(provider)
    async with running(discovering_app(issuer)) as http:
        assert (await http.get("/health/ready")).json()["checks"]["keys"] == "ok"
        token = make_token(iss=issuer, headers={"kid": "a"})
        created = await http.post(PROTECTED, json={"name": "Acme"}, headers=bearer(token))
        assert created.status_code == 201, created.text
        # The token must still name the configured issuer: discovery changes where keys come from, not what is checked.
        other = make_token(iss="https://issuer.test", headers={"kid": "a"})
        assert (await http.post(PROTECTED, json={"name": "Acme"}, headers=bearer(other))).status_code == 401
    assert provider.requests == {REALM + DISCOVERY_PATH: 1, REALM + KEYS_PATH: 1}


async def test_document_naming_another_issuer_is_never_used_in_development(
    provider: JwksServer,
    discovering_app: Callable[..., FastAPI],
    make_token: TokenFactory,
    key_a: dict[str, Any],
    audit_events: list[logging.LogRecord],
) -> None:
    # Development starts (a local provider is often reached under another name than it calls
    # itself), but trusts no key of the document, says why, and is not ready.
    publish(provider, key_a, issuer="https://impostor.example")
    issuer = issuer_of(provider)
    async with running(discovering_app(issuer)) as http:
        token = make_token(iss=issuer, headers={"kid": "a"})
        assert (await http.post(PROTECTED, json={"name": "Acme"}, headers=bearer(token))).status_code == 401
        ready = await http.get("/health/ready")
        assert ready.status_code == 503
        assert ready.json()["checks"]["keys"] == "fail"
    assert provider.requests[REALM + KEYS_PATH] == 0
    reasons = [
        str(getattr(r, "reason", "")) for r in audit_events if getattr(r, "event", "") == "oidc_discovery_failed"
    ]
    assert reasons and all("JWT_ISSUER" in reason and "impostor.example" in reason for reason in reasons)


async def test_production_refuses_to_start_when_the_document_names_another_issuer(
    tls_provider: JwksServer, discovering_app: Callable[..., FastAPI], key_a: dict[str, Any]
) -> None:
    publish(tls_provider, key_a, issuer=tls_provider.url_for("/realms/other"))
    app = discovering_app(issuer_of(tls_provider), **production())
    with pytest.raises(ConfigError, match=r"JWT_ISSUER: .* names the issuer"):
        async with running(app, reset=False):
            pass
    assert tls_provider.requests[REALM + KEYS_PATH] == 0


async def test_production_refuses_to_start_with_a_plain_http_jwks_uri(
    tls_provider: JwksServer, discovering_app: Callable[..., FastAPI], key_a: dict[str, Any]
) -> None:
    plain = "http://127.0.0.1:9/keys"
    publish(tls_provider, key_a, jwks_uri=plain)
    app = discovering_app(issuer_of(tls_provider), **production())
    with pytest.raises(ConfigError, match=r"JWT_ISSUER: .*jwks_uri .* is not https://"):
        async with running(app, reset=False):
            pass


async def test_production_verifies_tokens_with_keys_found_over_https(
    tls_provider: JwksServer,
    discovering_app: Callable[..., FastAPI],
    make_token: TokenFactory,
    key_a: dict[str, Any],
) -> None:
    publish(tls_provider, key_a)
    issuer = issuer_of(tls_provider)
    async with running(discovering_app(issuer, **production())) as http:
        token = make_token(iss=issuer, headers={"kid": "a"})
        created = await http.post(PROTECTED, json={"name": "Acme"}, headers=bearer(token))
        assert created.status_code == 201, created.text


async def test_provider_down_at_start_is_retried_with_backoff_and_readiness_waits_for_keys(
    provider: JwksServer, discovering_app: Callable[..., FastAPI], key_a: dict[str, Any]
) -> None:
    publish(provider, key_a)
    issuer = issuer_of(provider)
    provider.stop()
    app = discovering_app(issuer)
    async with running(app) as http:
        assert (await http.get("/health/ready")).json()["checks"]["keys"] == "fail"
        provider.start()  # same port; no request triggers anything: the retries do
        deadline = time.monotonic() + 10
        while not app.state.runtime.keys.has_keys() and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.1)
        assert app.state.runtime.keys.has_keys()
        await asyncio.sleep(1.1)  # readiness caches its answer for a second
        assert (await http.get("/health/ready")).json()["checks"]["keys"] == "ok"


async def test_the_document_is_read_again_with_the_refresh_and_a_moved_jwks_is_followed(
    provider: JwksServer, key_a: dict[str, Any]
) -> None:
    publish(provider, key_a)
    keys = DiscoveredKeys(
        issuer_of(provider),
        production=False,
        algorithms=frozenset({"RS256"}),
        refresh_seconds=0.05,
        min_refetch_seconds=60,
    )
    await keys.start()
    try:
        assert await keys.find("a") is not None
        moved = public_jwk(rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key(), "b")
        provider.documents[REALM + DISCOVERY_PATH] = {
            "issuer": issuer_of(provider),
            "jwks_uri": provider.url_for("/moved"),
        }
        provider.documents["/moved"] = {"keys": [moved]}
        deadline = time.monotonic() + 10
        while provider.requests["/moved"] == 0 and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        assert keys.url == provider.url_for("/moved")
        assert await keys.find("b") is not None
    finally:
        await keys.stop()


def test_an_issuer_that_is_not_a_url_needs_a_key_or_a_jwks_url(settings_for: Callable[..., Settings]) -> None:
    with pytest.raises(ValueError, match=r"JWT_ISSUER: .*OIDC discovery"):
        settings_for(jwt_public_key=None, jwt_issuer="my-issuer")
    assert settings_for(jwt_issuer="my-issuer").jwt_public_key  # with a key, any issuer string
