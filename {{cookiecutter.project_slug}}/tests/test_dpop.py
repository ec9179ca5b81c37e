"""DPoP (RFC 9449) at the resource server, and sender-constrained tokens (security/dpop.py, binding.py).

Every proof here is made by joserfc, an independent JOSE implementation (its keys, its RFC 7638
thumbprints, its signatures), never by the service's own code. The app runs in process against the
suite's real redis-server; replay across replicas and `htu` behind the shipped nginx are in
tests/test_dpop_fleet.py.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

import anyio
import httpx
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from fastapi import Depends, FastAPI
from joserfc import jws
from joserfc.jwk import ECKey, OctKey, OKPKey, RSAKey
from joserfc.registry import HeaderParameter

from {{ cookiecutter.package_name }}.app import create_app
from {{ cookiecutter.package_name }}.config import Settings
from {{ cookiecutter.package_name }}.scan import sender_constraint
from {{ cookiecutter.package_name }}.scan.probe import Probe, Scan
from {{ cookiecutter.package_name }}.scan.report import CheckResult, Status
from {{ cookiecutter.package_name }}.security.authz import no_object_policy
from {{ cookiecutter.package_name }}.security.binding import require_sender_constrained

from .conftest import ThreadBridge, TokenFactory, bearer, running

PROTECTED = "/api/v1/orgs"
URL = "http://localhost" + PROTECTED
ORG = {"name": "Acme"}
Key = ECKey | RSAKey | OKPKey
pytestmark = pytest.mark.filterwarnings("ignore::joserfc.errors.SecurityWarning")


def ath(token: str) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(token.encode()).digest()).rstrip(b"=").decode()


def proof(
    key: Key,
    token: str | None,
    *,
    htm: str = "POST",
    htu: str = URL,
    alg: str = "ES256",
    header: dict[str, Any] | None = None,
    signer: Any = None,
    **claims: Any,
) -> str:
    """A DPoP proof signed by joserfc; keyword arguments override claims (None removes one)."""
    protected = {"typ": "dpop+jwt", "alg": alg, "jwk": key.as_dict(private=False), **(header or {})}
    payload: dict[str, Any] = {"jti": uuid.uuid4().hex, "htm": htm, "htu": htu, "iat": int(time.time())}
    if token is not None:
        payload["ath"] = ath(token)
    payload.update(claims)
    payload = {name: value for name, value in payload.items() if value is not None}
    # One extension header (`exp`) joserfc lets a test mark critical.
    extension = {"exp": HeaderParameter("Expiration", "int")}
    registry = jws.JWSRegistry(header_registry=extension, algorithms=[alg])
    return jws.serialize_compact(protected, json.dumps(payload).encode(), signer or key, registry=registry)


def dpop(token: str, proof_value: str | None) -> dict[str, str]:
    headers = {"Authorization": f"DPoP {token}"}
    if proof_value is not None:
        headers["DPoP"] = proof_value
    return headers


@pytest.fixture(scope="module")
def key() -> ECKey:
    return ECKey.generate_key("P-256")


@pytest.fixture
def bound_token(make_token: TokenFactory, key: ECKey) -> str:
    return make_token(cnf={"jkt": key.thumbprint()})


def assert_proof_refused(response: httpx.Response, error: str = "invalid_dpop_proof") -> None:
    assert response.status_code == 401, response.text
    challenge = response.headers["www-authenticate"]
    assert challenge.startswith('DPoP algs="') and challenge.endswith(f'error="{error}"'), challenge
    assert response.headers["content-type"] == "application/problem+json"


# --- Accepted ---------------------------------------------------------------------------------


async def test_a_bound_token_with_its_proof_is_served(client: httpx.AsyncClient, bound_token: str, key: ECKey) -> None:
    response = await client.post(PROTECTED, json=ORG, headers=dpop(bound_token, proof(key, bound_token)))
    assert response.status_code == 201, response.text


@pytest.mark.parametrize(
    ("make_key", "alg"),
    [(lambda: RSAKey.generate_key(2048), "PS256"), (lambda: RSAKey.generate_key(2048), "RS256"),
     (lambda: OKPKey.generate_key("Ed25519"), "EdDSA"), (lambda: ECKey.generate_key("P-384"), "ES384")],
)  # fmt: skip
async def test_each_allowed_key_type_is_served(
    client: httpx.AsyncClient, make_token: TokenFactory, make_key: Callable[[], Key], alg: str
) -> None:
    other = make_key()
    token = make_token(cnf={"jkt": other.thumbprint()})
    response = await client.post(PROTECTED, json=ORG, headers=dpop(token, proof(other, token, alg=alg)))
    assert response.status_code == 201, response.text


async def test_the_dpop_scheme_is_case_insensitive(client: httpx.AsyncClient, bound_token: str, key: ECKey) -> None:
    headers = {"Authorization": f"dpop {bound_token}", "DPoP": proof(key, bound_token)}
    assert (await client.post(PROTECTED, json=ORG, headers=headers)).status_code == 201


async def test_htu_ignores_query_and_default_port(client: httpx.AsyncClient, bound_token: str, key: ECKey) -> None:
    org = uuid.uuid4()
    value = proof(key, bound_token, htm="GET", htu=f"HTTP://LocalHost:80/api/v1/orgs/{org}?x=1#f")
    response = await client.get(f"/api/v1/orgs/{org}", headers=dpop(bound_token, value))
    assert response.status_code == 403  # authenticated, then not a member of that org


# --- Refused: the proof -----------------------------------------------------------------------


async def test_a_replayed_proof_is_refused(client: httpx.AsyncClient, bound_token: str, key: ECKey) -> None:
    headers = dpop(bound_token, proof(key, bound_token))
    assert (await client.post(PROTECTED, json=ORG, headers=headers)).status_code == 201
    assert_proof_refused(await client.post(PROTECTED, json=ORG, headers=headers))


async def test_a_replayed_proof_is_refused_once_the_token_is_known(
    client: httpx.AsyncClient, bound_token: str, key: ECKey
) -> None:
    # The token is verified and cached by the first request: the next ones are spent by layer 3.
    first = dpop(bound_token, proof(key, bound_token))
    assert (await client.post(PROTECTED, json=ORG, headers=first)).status_code == 201
    headers = dpop(bound_token, proof(key, bound_token))
    assert (await client.post(PROTECTED, json=ORG, headers=headers)).status_code == 201
    assert_proof_refused(await client.post(PROTECTED, json=ORG, headers=headers))


async def test_a_refusal_logs_its_reason_never_the_proof_or_the_token(
    client: httpx.AsyncClient, bound_token: str, key: ECKey, audit_events: list[logging.LogRecord]
) -> None:
    value = proof(key, bound_token)
    assert (await client.post(PROTECTED, json=ORG, headers=dpop(bound_token, value))).status_code == 201
    replayed = await client.post(PROTECTED, json=ORG, headers=dpop(bound_token, value))
    assert_proof_refused(replayed)
    failures = [record for record in audit_events if record.getMessage() == "authentication_failed"]
    assert [(record.reason, record.credential) for record in failures] == [("proof_replayed", "DPoP")]  # type: ignore[attr-defined]
    assert set(replayed.json()) == {"type", "title", "status", "detail", "trace_id"}
    for secret in (value, bound_token, value.split(".")[1]):
        assert all(secret not in str(record.__dict__) for record in audit_events)


async def test_a_bound_token_without_a_proof_is_refused(client: httpx.AsyncClient, bound_token: str) -> None:
    assert_proof_refused(await client.post(PROTECTED, json=ORG, headers=dpop(bound_token, None)))


async def test_two_proofs_are_refused(client: httpx.AsyncClient, bound_token: str, key: ECKey) -> None:
    headers = [
        ("Authorization", f"DPoP {bound_token}"),
        ("DPoP", proof(key, bound_token)),
        ("DPoP", proof(key, bound_token)),
    ]
    assert_proof_refused(await client.post(PROTECTED, json=ORG, headers=headers))


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"header": {"typ": "jwt"}}, "wrong type"),
        ({"htm": "GET"}, "another method"),
        ({"htu": "http://localhost/api/v1/users"}, "another URL"),
        ({"htu": "https://localhost/api/v1/orgs"}, "another scheme"),
        ({"htu": "http://evil.example/api/v1/orgs"}, "another host"),
        ({"iat": int(time.time()) - 3600}, "an hour old"),
        ({"iat": int(time.time()) + 3600}, "an hour ahead"),
        ({"iat": None}, "no iat"),
        ({"iat": "now"}, "a text iat"),
        ({"jti": None}, "no jti"),
        ({"ath": "x" * 43}, "the hash of another token"),
        ({"ath": None}, "no ath"),
        ({"header": {"crit": ["exp"], "exp": 1}}, "a critical header"),
    ],
)
async def test_a_proof_that_does_not_match_the_request_is_refused(
    client: httpx.AsyncClient, bound_token: str, key: ECKey, change: dict[str, Any], reason: str
) -> None:
    response = await client.post(PROTECTED, json=ORG, headers=dpop(bound_token, proof(key, bound_token, **change)))
    assert_proof_refused(response)


async def test_a_proof_signed_by_another_key_is_refused(
    client: httpx.AsyncClient, bound_token: str, key: ECKey
) -> None:
    # The header names the bound key; the signature is another key's.
    forged = proof(key, bound_token, signer=ECKey.generate_key("P-256"))
    assert_proof_refused(await client.post(PROTECTED, json=ORG, headers=dpop(bound_token, forged)))


async def test_a_proof_by_a_key_the_token_is_not_bound_to_is_refused(
    client: httpx.AsyncClient, bound_token: str
) -> None:
    # A thief's own key: a valid proof, of the wrong key (the RFC 7638 thumbprint differs).
    thief = ECKey.generate_key("P-256")
    assert_proof_refused(await client.post(PROTECTED, json=ORG, headers=dpop(bound_token, proof(thief, bound_token))))


async def test_a_symmetric_algorithm_is_refused(client: httpx.AsyncClient, bound_token: str, key: ECKey) -> None:
    secret = OctKey.generate_key(256)
    value = proof(key, bound_token, alg="HS256", signer=secret)
    assert_proof_refused(await client.post(PROTECTED, json=ORG, headers=dpop(bound_token, value)))


async def test_an_algorithm_outside_the_allow_list_is_refused(
    settings_for: Callable[..., Settings], make_token: TokenFactory
) -> None:
    rsa = RSAKey.generate_key(2048)
    token = make_token(cnf={"jkt": rsa.thumbprint()})
    async with running(create_app(settings_for(dpop_algorithms=["ES256"]))) as client:
        response = await client.post(PROTECTED, json=ORG, headers=dpop(token, proof(rsa, token, alg="RS256")))
    assert_proof_refused(response)
    assert response.headers["www-authenticate"].startswith('DPoP algs="ES256", ')


async def test_a_private_key_in_the_proof_is_refused(client: httpx.AsyncClient, bound_token: str, key: ECKey) -> None:
    value = proof(key, bound_token, header={"jwk": key.as_dict(private=True)})
    assert_proof_refused(await client.post(PROTECTED, json=ORG, headers=dpop(bound_token, value)))


async def test_an_ecdsa_proof_on_another_curve_than_its_alg_names_is_refused(
    client: httpx.AsyncClient, make_token: TokenFactory
) -> None:
    # ES256 is ECDSA on P-256 (RFC 7518 §3.4): a P-384 key's signature with SHA-256, made here with
    # cryptography itself (joserfc refuses to make it), is not an ES256 signature.
    private = ec.generate_private_key(ec.SECP384R1())
    p384 = ECKey.import_key(private.public_key())
    token = make_token(cnf={"jkt": p384.thumbprint()})
    protected = {"typ": "dpop+jwt", "alg": "ES256", "jwk": p384.as_dict(private=False)}
    claims = {"jti": uuid.uuid4().hex, "htm": "POST", "htu": URL, "iat": int(time.time()), "ath": ath(token)}
    signing_input = b".".join(_segment(json.dumps(part).encode()) for part in (protected, claims))
    r, s = decode_dss_signature(private.sign(signing_input, ec.ECDSA(hashes.SHA256())))
    signature = _segment(r.to_bytes(48, "big") + s.to_bytes(48, "big"))
    value = (signing_input + b"." + signature).decode()
    assert_proof_refused(await client.post(PROTECTED, json=ORG, headers=dpop(token, value)))


def _segment(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


async def test_a_malformed_proof_is_refused(client: httpx.AsyncClient, bound_token: str) -> None:
    for value in ("not-a-jws", "a.b.c", "x" * 5000):
        assert_proof_refused(await client.post(PROTECTED, json=ORG, headers=dpop(bound_token, value)))


# --- Refused: the token -----------------------------------------------------------------------


async def test_a_dpop_bound_token_sent_as_bearer_is_refused(client: httpx.AsyncClient, bound_token: str) -> None:
    response = await client.post(PROTECTED, json=ORG, headers=bearer(bound_token))
    assert_proof_refused(response, "invalid_token")


async def test_a_stolen_bound_token_is_refused_with_the_thiefs_proof_or_none(
    client: httpx.AsyncClient, bound_token: str
) -> None:
    thief = ECKey.generate_key("P-256")
    for headers in (bearer(bound_token), dpop(bound_token, None), dpop(bound_token, proof(thief, bound_token))):
        assert (await client.post(PROTECTED, json=ORG, headers=headers)).status_code == 401


async def test_an_unbound_token_in_the_dpop_scheme_is_refused(
    client: httpx.AsyncClient, make_token: TokenFactory, key: ECKey
) -> None:
    token = make_token()
    response = await client.post(PROTECTED, json=ORG, headers=dpop(token, proof(key, token)))
    assert response.status_code == 401
    assert response.headers["www-authenticate"].endswith('error="invalid_token"')


@pytest.mark.parametrize("cnf", ["jkt", {"jwk": {"kty": "EC"}}, {"jkt": 5}, {"jkt": "a", "x5t#S256": "b"}])
async def test_a_cnf_the_service_cannot_confirm_is_refused(
    client: httpx.AsyncClient, make_token: TokenFactory, cnf: Any
) -> None:
    response = await client.post(PROTECTED, json=ORG, headers=bearer(make_token(cnf=cnf)))
    assert response.status_code == 401


async def test_a_certificate_bound_token_without_the_mtls_option_is_refused(
    client: httpx.AsyncClient, make_token: TokenFactory
) -> None:
    # No client certificate is ever verified here (no mtls option, or none presented): never served.
    response = await client.post(PROTECTED, json=ORG, headers=bearer(make_token(cnf={"x5t#S256": "A" * 43})))
    assert response.status_code == 401


# --- Server nonces ----------------------------------------------------------------------------


async def test_a_server_nonce_is_required_when_configured(
    settings_for: Callable[..., Settings], bound_token: str, key: ECKey
) -> None:
    app = create_app(settings_for(dpop_nonce_secret="n" * 32))
    async with running(app) as client:
        first = await client.post(PROTECTED, json=ORG, headers=dpop(bound_token, proof(key, bound_token)))
        assert_proof_refused(first, "use_dpop_nonce")
        nonce = first.headers["dpop-nonce"]
        stale = dpop(bound_token, proof(key, bound_token, nonce="x"))
        assert_proof_refused(await client.post(PROTECTED, json=ORG, headers=stale), "use_dpop_nonce")
        fresh = dpop(bound_token, proof(key, bound_token, nonce=nonce))
        retried = await client.post(PROTECTED, json=ORG, headers=fresh)
        assert retried.status_code == 201, retried.text


# --- htu behind a trusted proxy ---------------------------------------------------------------

FORWARDED = {"X-Forwarded-For": "198.51.100.9", "X-Forwarded-Proto": "https", "X-Forwarded-Host": "api.example.com"}
PUBLIC_URL = "https://api.example.com" + PROTECTED


async def test_htu_is_the_url_a_trusted_proxy_forwards(
    settings_for: Callable[..., Settings], bound_token: str, key: ECKey
) -> None:
    async with running(create_app(settings_for(trusted_proxies=["203.0.113.7"]))) as client:
        value = proof(key, bound_token, htu=PUBLIC_URL)
        response = await client.post(PROTECTED, json=ORG, headers={**dpop(bound_token, value), **FORWARDED})
    assert response.status_code == 201, response.text


async def test_forwarded_headers_from_an_untrusted_peer_do_not_change_htu(
    client: httpx.AsyncClient, bound_token: str, key: ECKey
) -> None:
    value = proof(key, bound_token, htu=PUBLIC_URL)
    response = await client.post(PROTECTED, json=ORG, headers={**dpop(bound_token, value), **FORWARDED})
    assert_proof_refused(response)


async def test_htu_from_the_rfc_7239_forwarded_header(
    settings_for: Callable[..., Settings], bound_token: str, key: ECKey
) -> None:
    app = create_app(settings_for(trusted_proxies=["203.0.113.7"], forwarded_header="Forwarded"))
    forwarded = {"Forwarded": 'for=198.51.100.9;proto=https;host="api.example.com"'}
    async with running(app) as client:
        value = proof(key, bound_token, htu=PUBLIC_URL)
        response = await client.post(PROTECTED, json=ORG, headers={**dpop(bound_token, value), **forwarded})
    assert response.status_code == 201, response.text


# --- Requiring sender-constrained tokens ------------------------------------------------------


async def test_plain_bearer_tokens_are_refused_when_sender_constrained_tokens_are_required(
    settings_for: Callable[..., Settings], make_token: TokenFactory, bound_token: str, key: ECKey
) -> None:
    async with running(create_app(settings_for(require_sender_constrained_tokens=True))) as client:
        plain = await client.post(PROTECTED, json=ORG, headers=bearer(make_token()))
        bound = await client.post(PROTECTED, json=ORG, headers=dpop(bound_token, proof(key, bound_token)))
    assert_proof_refused(plain, "invalid_token")
    assert bound.status_code == 201, bound.text


async def test_plain_bearer_tokens_are_served_by_default(client: httpx.AsyncClient, make_token: TokenFactory) -> None:
    assert (await client.post(PROTECTED, json=ORG, headers=bearer(make_token()))).status_code == 201


async def test_a_route_can_require_sender_constrained_tokens(
    settings: Settings, make_token: TokenFactory, bound_token: str, key: ECKey
) -> None:
    app = create_app(settings)
    guards = [no_object_policy(scopes=["orgs:read"]), Depends(require_sender_constrained())]
    app.get("/api/v1/payouts", dependencies=guards)(lambda: {"ok": True})
    async with running(app) as client:
        plain = await client.get("/api/v1/payouts", headers=bearer(make_token()))
        value = proof(key, bound_token, htm="GET", htu="http://localhost/api/v1/payouts")
        bound = await client.get("/api/v1/payouts", headers=dpop(bound_token, value))
        other = await client.get(f"/api/v1/orgs/{uuid.uuid4()}", headers=bearer(make_token()))
    assert_proof_refused(plain, "invalid_token")
    assert bound.status_code == 200, bound.text
    assert other.status_code == 403  # authenticated (the other routes serve plain bearer tokens), not a member


# --- Without Redis ----------------------------------------------------------------------------


async def test_a_replayed_proof_is_refused_without_redis(
    settings_for: Callable[..., Settings], bound_token: str, key: ECKey
) -> None:
    async with running(create_app(settings_for(redis_url=None))) as client:
        headers = dpop(bound_token, proof(key, bound_token))
        assert (await client.post(PROTECTED, json=ORG, headers=headers)).status_code == 201
        assert_proof_refused(await client.post(PROTECTED, json=ORG, headers=headers))


# --- The self-scan check ----------------------------------------------------------------------


async def sender_constraint_scan(app: FastAPI, token: str, plain_token: str | None) -> CheckResult:
    async with running(app):
        probe = Probe("http://localhost", max_requests=10, max_seconds=30, transport=ThreadBridge(app))
        scan = Scan(probe=probe, token=token, arguments=argparse.Namespace(plain_token=plain_token))
        try:
            return await anyio.to_thread.run_sync(sender_constraint.check, scan)
        finally:
            probe.close()


async def test_the_scan_passes_where_plain_bearer_tokens_are_refused(
    settings_for: Callable[..., Settings], make_token: TokenFactory
) -> None:
    app = create_app(settings_for(require_sender_constrained_tokens=True))
    result = await sender_constraint_scan(app, make_token(), make_token())
    assert result.status is Status.PASS, result


async def test_the_scan_fails_where_plain_bearer_tokens_are_served(
    settings: Settings, make_token: TokenFactory
) -> None:
    result = await sender_constraint_scan(create_app(settings), make_token(), make_token())
    assert result.status is Status.FAIL
    assert "a plain bearer token was answered 403, not 401" in result.reason  # served: not a member


async def test_the_scan_skips_without_a_plain_token(settings: Settings, make_token: TokenFactory) -> None:
    result = await sender_constraint_scan(create_app(settings), make_token(), None)
    assert result.status is Status.SKIP
