"""Token hygiene (security/claims.py; ASVS 5.0 V9.2.2, V10.3.2): only an access token is accepted
as one. JWT_REQUIRE_TYP requires `typ` at+jwt (RFC 9068); an OpenID Connect ID token is refused
even when its `aud` is JWT_AUDIENCE; `authorization_details` (RFC 9396) is refused unless
JWT_AUTHORIZATION_DETAILS_TYPES lists its types, which a policy then reads from the principal.
Real tokens against the real app; each refusal a 401 problem, logged with its reason."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Annotated, Any

import httpx
import pytest
from fastapi import FastAPI

from {{ cookiecutter.package_name }}.app import create_app
from {{ cookiecutter.package_name }}.config import ConfigError, Settings, read_settings
from {{ cookiecutter.package_name }}.security.authz import no_object_policy
from {{ cookiecutter.package_name }}.security.principal import Principal
from {{ cookiecutter.package_name }}.settings import ServiceSettings

from .conftest import TokenFactory, bearer, running
from .test_audit import LogLines, captured_logs
from .test_errors import assert_problem

ORGS = "/api/v1/orgs"
INVALID = 'Bearer error="invalid_token"'
PAYMENT = {"type": "payment_initiation", "instructedAmount": {"currency": "EUR", "amount": "12.00"}}


async def status_of(http: httpx.AsyncClient, token: str) -> int:
    response = await http.post(ORGS, json={"name": "Acme"}, headers=bearer(token))
    if response.status_code == 401:
        assert_problem(response, 401)
        assert response.headers["www-authenticate"] == INVALID
    return response.status_code


@pytest.fixture
def logs(app: FastAPI) -> Iterator[LogLines]:
    with captured_logs() as lines:
        yield lines


def refusal_reason(logs: LogLines, response: httpx.Response) -> str:
    return str(logs.event(response, "authentication_failed")["reason"])


# --- typ ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("typ", "expected"),
    [(None, 201), ("JWT", 201), ("at+jwt", 201), ("application/at+jwt", 201), ("dpop+jwt", 401), ("JOSE", 401)],
)
async def test_by_default_typ_is_checked_only_when_present(
    client: httpx.AsyncClient, make_token: TokenFactory, typ: str | None, expected: int
) -> None:
    headers = {"typ": typ} if typ else {}
    # PyJWT writes typ "JWT" unless told otherwise; None removes it.
    token = make_token("alice", headers=headers or {"typ": None})
    assert await status_of(client, token) == expected


@pytest.mark.parametrize(
    ("typ", "expected"),
    [
        (None, 401),
        ("JWT", 401),
        ("application/jwt", 401),
        ("at+jwt", 201),
        ("AT+JWT", 201),
        ("application/at+jwt", 201),
    ],
)
async def test_jwt_require_typ_accepts_at_jwt_only(
    settings_for: Callable[..., Settings], make_token: TokenFactory, typ: str | None, expected: int
) -> None:
    async with running(create_app(settings_for(jwt_require_typ=True))) as http:
        assert await status_of(http, make_token("alice", headers={"typ": typ})) == expected


async def test_a_missing_or_wrong_typ_is_logged_with_its_reason(
    settings_for: Callable[..., Settings], make_token: TokenFactory
) -> None:
    app = create_app(settings_for(jwt_require_typ=True))
    with captured_logs() as logs:
        async with running(app) as http:
            missing = await http.get(ORGS + "/x", headers=bearer(make_token("alice", headers={"typ": None})))
            plain = await http.get(ORGS + "/x", headers=bearer(make_token("alice", headers={"typ": "JWT"})))
    assert (missing.status_code, plain.status_code) == (401, 401)
    assert [refusal_reason(logs, r) for r in (missing, plain)] == ["typ_required", "typ_not_at_jwt"]


# --- ID tokens ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "marker",
    [{"nonce": "n-0S6_WzA2Mj"}, {"at_hash": "77QmUPtjPfzWtF2AnpK9RQ"}, {"c_hash": "LDktKdoQak3Pk0cnXxCltA"}],
    ids=["nonce", "at_hash", "c_hash"],
)
async def test_an_id_token_is_refused_as_an_access_token_though_its_audience_matches(
    client: httpx.AsyncClient, make_token: TokenFactory, logs: LogLines, marker: dict[str, str]
) -> None:
    # An ID token for a client whose id is the service's audience: iss, aud, sub, exp, iat all fit.
    id_token = make_token("alice", scope=None, auth_time=1_700_000_000, **marker)
    response = await client.post(ORGS, json={"name": "Acme"}, headers=bearer(id_token))
    assert_problem(response, 401)
    assert response.headers["www-authenticate"] == INVALID
    assert refusal_reason(logs, response) == "id_token"
    assert id_token not in logs.text


async def test_an_id_token_is_refused_even_with_typ_required(
    settings_for: Callable[..., Settings], make_token: TokenFactory
) -> None:
    async with running(create_app(settings_for(jwt_require_typ=True))) as http:
        forged_type = make_token("alice", headers={"typ": "at+jwt"}, nonce="n-0S6_WzA2Mj")
        assert await status_of(http, forged_type) == 401


# --- authorization_details ---------------------------------------------------------------------


async def test_authorization_details_are_refused_when_no_policy_reads_them(
    client: httpx.AsyncClient, make_token: TokenFactory, logs: LogLines
) -> None:
    response = await client.post(
        ORGS, json={"name": "Acme"}, headers=bearer(make_token("alice", authorization_details=[PAYMENT]))
    )
    assert_problem(response, 401)
    assert refusal_reason(logs, response) == "authorization_details_not_read"


# A route of an owner's whose policy reads the details (module level: FastAPI reads the annotation).
Payer = Annotated[Principal, no_object_policy(scopes=["orgs:read"])]


@pytest.fixture
def payments_app(settings_for: Callable[..., Settings]) -> FastAPI:
    app = create_app(settings_for(jwt_authorization_details_types=["payment_initiation"]))

    @app.get("/api/v1/payment-details")
    async def details(principal: Payer) -> list[dict[str, Any]]:
        return [dict(detail) for detail in principal.authorization_details]

    return app


@pytest.mark.parametrize(
    ("details", "expected"),
    [
        ([PAYMENT], 200),
        ([PAYMENT, {"type": "account_information"}], 401),  # one type no policy reads
        ([{"type": "account_information"}], 401),
        ([], 401),
        ({"type": "payment_initiation"}, 401),  # an object, not an array
        ([{"actions": ["read"]}], 401),  # no type
        ([{"type": 7}], 401),
        (["payment_initiation"], 401),
    ],
)
async def test_listed_authorization_details_types_reach_the_policy_and_others_are_refused(
    payments_app: FastAPI, make_token: TokenFactory, details: object, expected: int
) -> None:
    async with running(payments_app) as http:
        response = await http.get(
            "/api/v1/payment-details", headers=bearer(make_token("alice", authorization_details=details))
        )
        assert response.status_code == expected, response.text
        if expected == 200:
            assert response.json() == details
        else:
            assert response.headers["www-authenticate"] == INVALID
        plain = await http.get("/api/v1/payment-details", headers=bearer(make_token("alice")))
        assert (plain.status_code, plain.json()) == (200, [])


# --- Settings ----------------------------------------------------------------------------------


def test_the_hygiene_settings_are_read_from_plain_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {
        "JWT_ISSUER": "https://issuer.test",
        "JWT_AUDIENCE": "api",
        "JWT_REQUIRE_TYP": "true",
        "JWT_AUTHORIZATION_DETAILS_TYPES": "payment_initiation, account_information",
    }.items():
        monkeypatch.setenv(name, value)
    settings = read_settings(ServiceSettings)
    assert settings.jwt_require_typ is True
    assert settings.jwt_authorization_details_types == ["payment_initiation", "account_information"]
    monkeypatch.setenv("JWT_REQUIRE_TYP", "maybe")
    with pytest.raises(ConfigError, match="JWT_REQUIRE_TYP"):
        read_settings(ServiceSettings)
