"""Layer 4, authentication: every known JWT attack is refused with 401, valid tokens pass."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from fastapi import FastAPI
from starlette.types import Message

from {{ cookiecutter.package_name }}.app import create_app
from {{ cookiecutter.package_name }}.cli import main
from {{ cookiecutter.package_name }}.config import Settings
from {{ cookiecutter.package_name }}.security.authn import MAX_TOKEN_BYTES, VerifiedTokens
from {{ cookiecutter.package_name }}.security.principal import Principal

from .conftest import AUDIENCE, ISSUER, TokenFactory, bearer, running
from .jwks_server import JwksServer, public_jwk

PROTECTED = "/api/v1/orgs"


# --- helpers --------------------------------------------------------------------------------


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def segment(value: Any) -> str:
    return b64url(json.dumps(value).encode())


def claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    values: dict[str, Any] = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": "mallory",
        "scope": "orgs:write",
        "iat": now,
        "exp": now + 600,
        "jti": uuid.uuid4().hex,
    }
    values.update(overrides)
    return values


def rs256_token(header: dict[str, Any], payload: dict[str, Any], key: rsa.RSAPrivateKey) -> str:
    """A token with exactly this header, signed RS256 by `key` whatever the header says."""
    signing_input = f"{segment(header)}.{segment(payload)}"
    signature = key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
    return f"{signing_input}.{b64url(signature)}"


def hs256_token(header: dict[str, Any], payload: dict[str, Any], secret: bytes) -> str:
    signing_input = f"{segment(header)}.{segment(payload)}"
    return f"{signing_input}.{b64url(hmac.new(secret, signing_input.encode(), hashlib.sha256).digest())}"


async def status_of(http: httpx.AsyncClient, token: str | None, **kwargs: Any) -> int:
    headers = bearer(token) if token is not None else {}
    response = await http.post(PROTECTED, json={"name": "Acme"}, headers=headers, **kwargs)
    assert response.status_code in (201, 401), response.text
    return response.status_code


async def assert_rejected(http: httpx.AsyncClient, token: str) -> httpx.Response:
    response = await http.post(PROTECTED, json={"name": "Acme"}, headers=bearer(token))
    assert response.status_code == 401, response.text
    assert response.headers["www-authenticate"] == 'Bearer error="invalid_token"'
    assert response.headers["content-type"] == "application/problem+json"
    return response


def reasons(records: list[logging.LogRecord]) -> list[str]:
    return [getattr(r, "reason", "") for r in records if getattr(r, "event", "") == "authentication_failed"]


@pytest.fixture(scope="module")
def foreign_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


# --- where the token comes from, and what the client is told -----------------------------------


async def test_valid_token_is_accepted(client: httpx.AsyncClient, make_token: TokenFactory) -> None:
    assert await status_of(client, make_token()) == 201


async def test_request_without_token_is_401_with_a_bare_bearer_challenge(client: httpx.AsyncClient) -> None:
    response = await client.post(PROTECTED, json={"name": "Acme"})
    assert response.status_code == 401
    # One bare challenge per credential type: the baked options' (e.g. ApiKey) first, Bearer last.
    challenges = response.headers["www-authenticate"].split(", ")
    assert challenges[-1] == "Bearer" and not any("error" in challenge for challenge in challenges)
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["type"].endswith(":problem:unauthenticated")


async def test_invalid_token_reason_goes_to_the_audit_log_not_the_client(
    client: httpx.AsyncClient, make_token: TokenFactory, audit_events: list[logging.LogRecord]
) -> None:
    token = make_token(exp=int(time.time()) - 3600)
    response = await assert_rejected(client, token)
    assert reasons(audit_events) == ["ExpiredSignatureError"]
    body = response.json()
    assert set(body) == {"type", "title", "status", "detail", "trace_id"}
    assert "xpired" not in response.text
    assert all(token not in record.getMessage() and token not in str(record.__dict__) for record in audit_events)


async def test_token_in_query_string_is_ignored(client: httpx.AsyncClient, make_token: TokenFactory) -> None:
    token = make_token()
    response = await client.post(PROTECTED, json={"name": "Acme"}, params={"access_token": token})
    assert response.status_code == 401
    assert response.headers["www-authenticate"].split(", ")[-1] == "Bearer"  # after any option's challenge


async def test_token_in_cookie_is_ignored(client: httpx.AsyncClient, make_token: TokenFactory) -> None:
    response = await client.post(
        PROTECTED, json={"name": "Acme"}, headers={"Cookie": f"access_token={make_token()}; token={make_token()}"}
    )
    assert response.status_code == 401
    assert response.headers["www-authenticate"].split(", ")[-1] == "Bearer"  # after any option's challenge


async def test_other_authorization_scheme_gets_a_bare_bearer_challenge(client: httpx.AsyncClient) -> None:
    response = await client.post(PROTECTED, json={"name": "Acme"}, headers={"Authorization": "Basic YWxpY2U6cHc="})
    assert response.status_code == 401
    assert response.headers["www-authenticate"].split(", ")[-1] == "Bearer"  # after any option's challenge


async def test_bearer_scheme_is_case_insensitive(client: httpx.AsyncClient, make_token: TokenFactory) -> None:
    response = await client.post(PROTECTED, json={"name": "Acme"}, headers={"Authorization": f"bEaReR {make_token()}"})
    assert response.status_code == 201


async def test_empty_bearer_token_is_rejected(client: httpx.AsyncClient) -> None:
    response = await client.post(PROTECTED, json={"name": "Acme"}, headers={"Authorization": "Bearer "})
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == 'Bearer error="invalid_token"'


async def test_two_authorization_headers_are_rejected(client: httpx.AsyncClient, make_token: TokenFactory) -> None:
    headers = [("Authorization", f"Bearer {make_token()}"), ("Authorization", f"Bearer {make_token('bob')}")]
    response = await client.post(PROTECTED, json={"name": "Acme"}, headers=headers)
    assert response.status_code == 401


# Every Authorization header is a credential presented (security/composition.py, rule 1): each of
# these is refused with the challenges of the schemes the service accepts, never passed over for
# a token elsewhere in the request, and counted towards the address's lockout. `{token}` is a
# valid token, so none of them is refused for the token's sake.
UNUSABLE_AUTHORIZATION: dict[str, tuple[list[str], str]] = {
    "basic_then_bearer": (["Basic YWxpY2U6cHc=", "Bearer {token}"], "several_authorization_headers"),
    "bearer_then_basic": (["Bearer {token}", "Basic YWxpY2U6cHc="], "several_authorization_headers"),
    "two_bearers": (["Bearer {token}", "Bearer {token}"], "several_authorization_headers"),
    "basic": (["Basic YWxpY2U6cHc="], "unknown_authorization_scheme"),
    "digest": (['Digest username="alice", nonce="n", uri="/", response="r"'], "unknown_authorization_scheme"),
    "tab_separator": (["Bearer\t{token}"], "malformed_authorization"),
    "no_separator": (["Bearer{token}"], "unknown_authorization_scheme"),
    "empty": ([""], "empty_authorization"),
}


def authorization(values: list[str], token: str) -> list[tuple[str, str]]:
    return [("Authorization", value.format(token=token)) for value in values]


@pytest.mark.parametrize("case", UNUSABLE_AUTHORIZATION)
async def test_an_unusable_authorization_header_is_a_credential_refused_with_the_accepted_schemes(
    client: httpx.AsyncClient, make_token: TokenFactory, audit_events: list[logging.LogRecord], case: str
) -> None:
    values, reason = UNUSABLE_AUTHORIZATION[case]
    response = await client.post(PROTECTED, json={"name": "Acme"}, headers=authorization(values, make_token()))
    assert response.status_code == 401, response.text
    assert response.headers["content-type"] == "application/problem+json"
    challenges = response.headers["www-authenticate"].split(", ")
    assert challenges[-1] == "Bearer" and not any("error" in challenge for challenge in challenges)
    assert response.json()["type"].endswith(":problem:invalid-token")
    assert reasons(audit_events) == [reason]
    refused = [r for r in audit_events if getattr(r, "event", "") == "authentication_failed"]
    assert getattr(refused[0], "credential", None) == "Authorization"


async def test_every_unusable_authorization_header_counts_towards_the_lockout(
    settings_for: Callable[..., Settings], make_token: TokenFactory
) -> None:
    """Three refusals lock the address out: a valid token from it is then answered 429."""
    app = create_app(settings_for(lockout_failures=3))
    token = make_token()
    for number, case in enumerate(UNUSABLE_AUTHORIZATION):
        values, _ = UNUSABLE_AUTHORIZATION[case]
        async with running(app, (f"198.51.100.{number + 1}", 4711), reset=number == 0) as http:
            for _ in range(3):
                refused = await http.post(PROTECTED, json={"name": "Acme"}, headers=authorization(values, token))
                assert refused.status_code == 401, (case, refused.text)
            locked = await http.post(PROTECTED, json={"name": "Acme"}, headers=bearer(token))
            assert locked.status_code == 429, (case, locked.text)


async def test_the_bearer_token_may_follow_its_scheme_after_several_spaces(
    client: httpx.AsyncClient, make_token: TokenFactory
) -> None:
    """RFC 9110 §11.4 and RFC 6750 §2.1 separate scheme and token with 1*SP: two spaces are valid."""
    response = await client.post(PROTECTED, json={"name": "Acme"}, headers={"Authorization": f"Bearer  {make_token()}"})
    assert response.status_code == 201, response.text


async def test_paths_outside_api_need_no_token(client: httpx.AsyncClient) -> None:
    assert (await client.get("/health/live")).status_code == 200


async def test_websocket_under_api_without_token_is_refused(app: FastAPI) -> None:
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "websocket.connect"}

    async def send(message: Message) -> None:
        sent.append(message)

    scope = {
        "type": "websocket",
        "asgi": {"version": "3.0"},
        "scheme": "ws",
        "path": "/api/v1/stream",
        "raw_path": b"/api/v1/stream",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"localhost")],
        "client": ("203.0.113.7", 4711),
        "server": ("localhost", 80),
        "subprotocols": [],
    }
    await app(scope, receive, send)
    assert sent == [{"type": "websocket.close", "code": 1008}]


# --- algorithm attacks -----------------------------------------------------------------------


@pytest.mark.parametrize("alg", ["none", "None", "NONE", "nOnE"])
async def test_alg_none_is_rejected_in_any_casing(client: httpx.AsyncClient, alg: str) -> None:
    token = f"{segment({'alg': alg, 'typ': 'JWT'})}.{segment(claims())}."
    await assert_rejected(client, token)


async def test_token_without_alg_is_rejected(client: httpx.AsyncClient, private_key: rsa.RSAPrivateKey) -> None:
    await assert_rejected(client, rs256_token({"typ": "JWT"}, claims(), private_key))


async def test_hs256_signed_with_the_public_key_is_rejected(client: httpx.AsyncClient, public_pem: str) -> None:
    # Key confusion: a verifier that let the token pick HMAC would use the PEM as the secret.
    for secret in (public_pem.encode(), public_pem.strip().encode(), (public_pem.strip() + "\n").encode()):
        await assert_rejected(client, hs256_token({"alg": "HS256", "typ": "JWT"}, claims(), secret))


async def test_token_signed_by_a_foreign_rsa_key_is_rejected(
    client: httpx.AsyncClient, make_token: TokenFactory, foreign_key: rsa.RSAPrivateKey
) -> None:
    await assert_rejected(client, make_token(key=foreign_key))


@pytest.mark.parametrize("alg", ["RS512", "PS256"])
async def test_algorithm_outside_the_allowlist_is_rejected(
    client: httpx.AsyncClient, make_token: TokenFactory, alg: str
) -> None:
    # Signed by the trusted key, valid in every other way: only the algorithm is wrong.
    await assert_rejected(client, make_token(algorithm=alg))


async def test_ec_token_is_rejected_when_only_rs256_is_allowed(
    client: httpx.AsyncClient, make_token: TokenFactory
) -> None:
    await assert_rejected(client, make_token(key=ec.generate_private_key(ec.SECP256R1()), algorithm="ES256"))


async def test_allowlisted_algorithm_the_key_cannot_verify_is_rejected(
    settings_for: Callable[..., Settings], make_token: TokenFactory
) -> None:
    app = create_app(settings_for(jwt_algorithms=["RS256", "ES256"]))
    async with running(app) as http:
        await assert_rejected(http, make_token(key=ec.generate_private_key(ec.SECP256R1()), algorithm="ES256"))
        assert await status_of(http, make_token()) == 201


# --- signature and payload integrity ----------------------------------------------------------


@pytest.mark.parametrize(
    "mangle",
    [
        pytest.param(lambda h, p, s: f"{h}.{p}.", id="stripped"),
        pytest.param(lambda h, p, s: f"{h}.{p}", id="missing-segment"),
        pytest.param(lambda h, p, s: f"{h}.{p}.{s[: len(s) // 2]}", id="truncated"),
        pytest.param(lambda h, p, s: f"{h}.{p}.{b64url(bytes(256))}", id="null-bytes"),
        pytest.param(lambda h, p, s: f"{h}.{p}.null", id="null-literal"),
    ],
)
async def test_stripped_truncated_or_null_signature_is_rejected(
    client: httpx.AsyncClient, make_token: TokenFactory, mangle: Callable[[str, str, str], str]
) -> None:
    header, payload, signature = make_token().split(".")
    await assert_rejected(client, mangle(header, payload, signature))


async def test_tampered_payload_is_rejected(client: httpx.AsyncClient, make_token: TokenFactory) -> None:
    header, payload, signature = make_token("alice", "orgs:read").split(".")
    decoded = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    decoded["scope"] = "orgs:read orgs:write users:read users:write"
    await assert_rejected(client, f"{header}.{segment(decoded)}.{signature}")


# --- time claims -----------------------------------------------------------------------------


async def test_expired_token_is_rejected_with_401(client: httpx.AsyncClient, make_token: TokenFactory) -> None:
    now = int(time.time())
    await assert_rejected(client, make_token(iat=now - 600, exp=now - 60))


async def test_token_expired_within_the_leeway_is_accepted(client: httpx.AsyncClient, make_token: TokenFactory) -> None:
    now = int(time.time())
    assert await status_of(client, make_token(iat=now - 600, exp=now - 10)) == 201


async def test_token_with_future_nbf_is_rejected(client: httpx.AsyncClient, make_token: TokenFactory) -> None:
    await assert_rejected(client, make_token(nbf=int(time.time()) + 300))


async def test_token_with_past_nbf_is_accepted(client: httpx.AsyncClient, make_token: TokenFactory) -> None:
    assert await status_of(client, make_token(nbf=int(time.time()) - 5)) == 201


async def test_token_with_future_iat_is_rejected(client: httpx.AsyncClient, make_token: TokenFactory) -> None:
    now = int(time.time())
    await assert_rejected(client, make_token(iat=now + 300, exp=now + 900))


@pytest.mark.parametrize("claim", ["exp", "iat", "nbf"])
@pytest.mark.parametrize("value", ["4102444800", "soon", True, [4102444800], {"t": 1}], ids=str)
async def test_non_numeric_time_claim_is_rejected(
    client: httpx.AsyncClient, make_token: TokenFactory, claim: str, value: Any
) -> None:
    await assert_rejected(client, make_token(**{claim: value}))


async def test_numeric_string_exp_is_rejected_although_pyjwt_accepts_it(
    client: httpx.AsyncClient, make_token: TokenFactory, audit_events: list[logging.LogRecord]
) -> None:
    await assert_rejected(client, make_token(exp=str(int(time.time()) + 600)))
    assert reasons(audit_events) == ["non_numeric_date"]


async def test_lifetime_over_the_maximum_is_rejected(client: httpx.AsyncClient, make_token: TokenFactory) -> None:
    now = int(time.time())
    await assert_rejected(client, make_token(iat=now, exp=now + 901))


async def test_lifetime_at_the_maximum_is_accepted(client: httpx.AsyncClient, make_token: TokenFactory) -> None:
    now = int(time.time())
    assert await status_of(client, make_token(iat=now, exp=now + 900)) == 201


# --- issuer, audience, subject ----------------------------------------------------------------


@pytest.mark.parametrize(
    "issuer",
    ["https://evil.test", "https://issuer.test.evil.test", "https://issuer.test/", "https://issuer.tes", "", [ISSUER]],
    ids=str,
)
async def test_wrong_or_prefix_matched_issuer_is_rejected(
    client: httpx.AsyncClient, private_key: rsa.RSAPrivateKey, issuer: Any
) -> None:
    await assert_rejected(client, rs256_token({"alg": "RS256", "typ": "JWT"}, claims(iss=issuer), private_key))


@pytest.mark.parametrize("audience", ["other-service", AUDIENCE + "-admin", AUDIENCE[:-1], ""], ids=str)
async def test_wrong_audience_is_rejected(client: httpx.AsyncClient, make_token: TokenFactory, audience: str) -> None:
    await assert_rejected(client, make_token(aud=audience))


@pytest.mark.parametrize("audiences", [["other-service"], [], [AUDIENCE + "x", "y"], [[AUDIENCE]]], ids=str)
async def test_audience_list_without_ours_is_rejected(
    client: httpx.AsyncClient, make_token: TokenFactory, audiences: list[Any]
) -> None:
    await assert_rejected(client, make_token(aud=audiences))


async def test_audience_list_containing_ours_is_accepted(client: httpx.AsyncClient, make_token: TokenFactory) -> None:
    assert await status_of(client, make_token(aud=["other-service", AUDIENCE])) == 201


@pytest.mark.parametrize("claim", ["iss", "aud", "sub", "exp", "iat"])
async def test_token_missing_a_required_claim_is_rejected(
    client: httpx.AsyncClient, make_token: TokenFactory, claim: str, audit_events: list[logging.LogRecord]
) -> None:
    await assert_rejected(client, make_token(**{claim: None}))
    assert reasons(audit_events) == [f"missing_{claim}"]


@pytest.mark.parametrize("subject", ["", 42, ["alice"], "a" * 256], ids=str)
async def test_unusable_subject_is_rejected(client: httpx.AsyncClient, make_token: TokenFactory, subject: Any) -> None:
    await assert_rejected(client, make_token(sub=subject))


# --- header attacks ----------------------------------------------------------------------------


async def test_embedded_jwk_header_is_never_used_to_verify(
    client: httpx.AsyncClient, make_token: TokenFactory, foreign_key: rsa.RSAPrivateKey
) -> None:
    jwk = public_jwk(foreign_key.public_key(), "attacker")
    await assert_rejected(client, make_token(key=foreign_key, headers={"jwk": jwk}))


@pytest.mark.parametrize("header", ["jku", "x5u"])
async def test_jku_and_x5u_headers_are_never_fetched(
    client: httpx.AsyncClient, make_token: TokenFactory, foreign_key: rsa.RSAPrivateKey, header: str
) -> None:
    attacker = JwksServer()
    attacker.serve_keys(public_jwk(foreign_key.public_key(), "attacker"))
    attacker.start()
    try:
        token = make_token(key=foreign_key, headers={header: attacker.url_for("/keys"), "kid": "attacker"})
        await assert_rejected(client, token)
    finally:
        attacker.stop()
    assert attacker.fetches == 0


async def test_x5c_header_is_never_used_to_verify(
    client: httpx.AsyncClient, make_token: TokenFactory, foreign_key: rsa.RSAPrivateKey
) -> None:
    await assert_rejected(client, make_token(key=foreign_key, headers={"x5c": [b64url(b"not a certificate")]}))


@pytest.mark.parametrize(
    ("kid", "secret"),
    [
        ("../../../../../../dev/null", b""),
        ("/dev/null", b""),
        ("' UNION SELECT 'secret' -- ", b"secret"),
        ("| cat /etc/passwd", b"root:x:0:0:root:/root:/bin/bash"),
    ],
    ids=["path-traversal", "dev-null", "sql", "command"],
)
async def test_kid_injection_with_an_hmac_secret_is_rejected(
    client: httpx.AsyncClient, kid: str, secret: bytes
) -> None:
    # What a kid naming a file or a database row would make a naive verifier use as the secret.
    await assert_rejected(client, hs256_token({"alg": "HS256", "typ": "JWT", "kid": kid}, claims(), secret))


@pytest.mark.parametrize("kid", ["../../keys/attacker.pem", "https://evil.test/key", "x" * 300])
async def test_kid_injection_naming_an_attacker_key_is_rejected(
    client: httpx.AsyncClient, make_token: TokenFactory, foreign_key: rsa.RSAPrivateKey, kid: str
) -> None:
    await assert_rejected(client, make_token(key=foreign_key, headers={"kid": kid}))


@pytest.mark.parametrize("kid", [123, {"a": 1}, ["k"], True], ids=str)
async def test_non_string_kid_is_rejected(client: httpx.AsyncClient, private_key: rsa.RSAPrivateKey, kid: Any) -> None:
    await assert_rejected(client, rs256_token({"alg": "RS256", "typ": "JWT", "kid": kid}, claims(), private_key))


@pytest.mark.parametrize(
    "extra",
    [
        {"crit": ["exp-ext"], "exp-ext": 1},
        {"crit": ["b64"], "b64": True},  # PyJWT itself understands b64 and would accept this one
        {"crit": []},
        {"crit": "exp-ext", "exp-ext": 1},
    ],
    ids=["unknown", "b64", "empty", "not-a-list"],
)
async def test_unknown_crit_header_is_rejected(
    client: httpx.AsyncClient, private_key: rsa.RSAPrivateKey, extra: dict[str, Any]
) -> None:
    await assert_rejected(client, rs256_token({"alg": "RS256", "typ": "JWT", **extra}, claims(), private_key))


@pytest.mark.parametrize("typ", ["JOSE", "dpop+jwt", "secevent+jwt", "", 1])
async def test_typ_other_than_jwt_is_rejected(
    client: httpx.AsyncClient, private_key: rsa.RSAPrivateKey, typ: Any
) -> None:
    await assert_rejected(client, rs256_token({"alg": "RS256", "typ": typ}, claims(), private_key))


@pytest.mark.parametrize("typ", ["JWT", "jwt", "at+jwt", "application/at+jwt", None])
async def test_typ_jwt_or_at_jwt_or_absent_is_accepted(
    client: httpx.AsyncClient, private_key: rsa.RSAPrivateKey, typ: str | None
) -> None:
    header = {"alg": "RS256"} if typ is None else {"alg": "RS256", "typ": typ}
    assert await status_of(client, rs256_token(header, claims(), private_key)) == 201


# --- garbage and size ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "token",
    [
        "not-a-token",
        "a.b.c",
        "....",
        "eyJ.eyJ.eyJ",
        f"{segment([1, 2])}.{segment(claims())}.c2ln",
        f"{b64url(b'{not json')}.{segment(claims())}.c2ln",
        f"{segment({'alg': 'RS256'})}.{b64url(b'not json')}.c2ln",
        f"{segment({'alg': 'RS256'})}.{segment('a string')}.c2ln",
        "!!!!.@@@@.####",
    ],
)
async def test_garbage_token_is_rejected(client: httpx.AsyncClient, token: str) -> None:
    await assert_rejected(client, token)


async def test_oversized_token_is_refused_before_parsing(
    client: httpx.AsyncClient, make_token: TokenFactory, audit_events: list[logging.LogRecord]
) -> None:
    # Correctly signed and valid in every way but its size.
    token = make_token(padding="x" * MAX_TOKEN_BYTES)
    assert len(token) > MAX_TOKEN_BYTES
    await assert_rejected(client, token)
    # Not even well-formed: refused for its size, so it was never parsed.
    await assert_rejected(client, "a" * (MAX_TOKEN_BYTES + 1))
    assert reasons(audit_events) == ["token_too_large", "token_too_large"]


BASE64URL = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


def with_unused_bits_set(token: str) -> str:
    """The same token with the signature's last character replaced by one that decodes to the same
    bytes: an RS256 signature (256 bytes) ends in a character with 4 unused bits, all zero."""
    last = BASE64URL.index(token[-1])
    assert last & 0b1111 == 0
    return token[:-1] + BASE64URL[last + 1]


def with_padded_payload(token: str) -> str:
    header, payload, signature = token.split(".")
    return f"{header}.{payload}{'=' * (-len(payload) % 4)}.{signature}"


@pytest.mark.parametrize(
    "respell",
    [
        lambda token: token + "==",
        lambda token: token + "=",
        with_unused_bits_set,
        with_padded_payload,
        lambda token: token.replace(".", "..", 1),
    ],
    ids=["padding-appended", "one-pad", "unused-bits-set", "padded-payload", "empty-segment"],
)
async def test_a_non_canonical_spelling_of_a_valid_token_is_rejected(
    client: httpx.AsyncClient,
    make_token: TokenFactory,
    audit_events: list[logging.LogRecord],
    respell: Callable[[str], str],
) -> None:
    # A subject that makes the payload's length no multiple of 4, so that it has a padded spelling.
    token = next(t for t in (make_token("a" * n) for n in range(1, 9)) if len(t.split(".")[1]) % 4)
    assert await status_of(client, token) == 201
    respelled = respell(token)
    assert respelled != token
    await assert_rejected(client, respelled)
    assert reasons(audit_events) == ["malformed"]


# --- the verified-token cache ---------------------------------------------------------------------


async def test_repeated_token_is_verified_once_then_served_from_the_cache(
    app: FastAPI, client: httpx.AsyncClient, make_token: TokenFactory
) -> None:
    verifier = app.state.runtime.verifier
    token = make_token().encode()
    first = await verifier.verify(token)
    assert await verifier.verify(token) is first
    assert len(verifier.cache) == 1


def principal(expires_at: float) -> Principal:
    return Principal("alice", frozenset(), None, int(time.time()), int(expires_at))


def test_verified_token_cache_is_bounded_least_recently_used_first() -> None:
    cache = VerifiedTokens(size=2)
    now = time.time()
    cache.put(b"a", principal(now + 60), 0)
    cache.put(b"b", principal(now + 60), 0)
    assert cache.get(b"a", 0) is not None  # a is now the most recently used
    cache.put(b"c", principal(now + 60), 0)
    assert len(cache) == 2
    assert cache.get(b"b", 0) is None
    assert cache.get(b"a", 0) is not None and cache.get(b"c", 0) is not None


def test_verified_token_cache_entry_ends_at_exp() -> None:
    cache = VerifiedTokens()
    cache.put(b"expired", principal(time.time() - 1), 0)
    assert cache.get(b"expired", 0) is None
    assert len(cache) == 0


def test_verified_token_cache_entry_ends_when_the_keys_change() -> None:
    cache = VerifiedTokens()
    cache.put(b"t", principal(time.time() + 60), 0)
    assert cache.get(b"t", 1) is None


# --- development tooling --------------------------------------------------------------------------


async def test_minted_development_token_is_accepted_by_the_service(
    tmp_path: Path, settings_for: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    assert main(["keys", "generate", "--out", str(tmp_path)]) == 0
    monkeypatch.setenv("ENVIRONMENT", "development")
    exit_code = await anyio.to_thread.run_sync(
        main,
        [
            "token", "mint", "--private-key", str(tmp_path / "private.pem"), "--sub", "dev-user",
            "--scope", "orgs:write", "--issuer", ISSUER, "--audience", AUDIENCE,
        ],
    )  # fmt: skip
    assert exit_code == 0
    token = capsys.readouterr().out.strip().splitlines()[-1]
    app = create_app(settings_for(jwt_public_key=(tmp_path / "public.pem").read_text()))
    async with running(app) as http:
        assert await status_of(http, token) == 201


def test_token_mint_refuses_in_production(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
    assert main(["keys", "generate", "--out", str(tmp_path)]) == 0
    monkeypatch.setenv("ENVIRONMENT", "production")
    code = main(
        [
            "token",
            "mint",
            "--private-key",
            str(tmp_path / "private.pem"),
            "--sub",
            "x",
            "--issuer",
            "i",
            "--audience",
            "a",
        ]
    )
    assert code == 2
    captured = capsys.readouterr()
    assert "refused" in captured.err
    assert "eyJ" not in captured.out


def mint(tmp_path: Path, *extra: str) -> int:
    return main(
        ["token", "mint", "--private-key", str(tmp_path / "private.pem"), "--sub", "dev-user",
         "--issuer", ISSUER, "--audience", AUDIENCE, *extra]
    )  # fmt: skip


def test_minted_token_lives_900_seconds_and_never_beyond_the_maximum(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    assert main(["keys", "generate", "--out", str(tmp_path)]) == 0
    monkeypatch.setenv("ENVIRONMENT", "development")
    monkeypatch.delenv("JWT_MAX_TOKEN_LIFETIME_SECONDS", raising=False)
    assert mint(tmp_path) == 0
    claims = jwt.decode(capsys.readouterr().out.strip().splitlines()[-1], options={"verify_signature": False})
    assert claims["exp"] - claims["iat"] == 900
    monkeypatch.setenv("JWT_MAX_TOKEN_LIFETIME_SECONDS", "300")
    assert mint(tmp_path) == 0
    claims = jwt.decode(capsys.readouterr().out.strip().splitlines()[-1], options={"verify_signature": False})
    assert claims["exp"] - claims["iat"] == 300
    assert mint(tmp_path, "--ttl", "301") == 2
    captured = capsys.readouterr()
    assert "JWT_MAX_TOKEN_LIFETIME_SECONDS" in captured.err
    assert "eyJ" not in captured.out


def test_default_maximum_token_lifetime_is_900_seconds(settings: Settings) -> None:
    assert settings.jwt_max_token_lifetime_seconds == 900


def test_jwt_library_is_recent_enough() -> None:
    major, minor = (int(part) for part in jwt.__version__.split(".")[:2])
    assert (major, minor) >= (2, 13)


async def test_a_service_mounted_under_a_root_path_authenticates_and_limits_alike(
    settings_for: Callable[..., Settings], make_token: TokenFactory
) -> None:
    """`uvicorn --root-path /svc` puts the prefix in the request path too: the prefix checks must
    look past it, or /api/ would run unauthenticated and unlimited."""
    app = create_app(settings_for(rate_limit_ip="3/minute"))
    transport = httpx.ASGITransport(app=app, root_path="/svc", client=("203.0.113.9", 4711))
    probe = f"/svc/api/v1/orgs/{uuid.uuid4()}"
    async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as http:
        anonymous = await http.get(probe)
        authorized = await http.get(probe, headers=bearer(make_token()))
        await http.get(probe)
        limited = await http.get(probe)
    assert anonymous.status_code == 401
    assert anonymous.headers["www-authenticate"].split(", ")[-1] == "Bearer"
    assert authorized.status_code == 403  # authenticated, no grant on this org
    assert "ratelimit" in authorized.headers
    assert limited.status_code == 429
