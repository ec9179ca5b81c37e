"""Step-up (RFC 9470): a route declares how recently, and how, its caller's user must have
authenticated (`StepUp`), beside its scopes and relation; a token that does not satisfy it is a
401 problem whose `WWW-Authenticate` says what to do (`insufficient_user_authentication`,
`max_age`, `acr_values`). The example domain declares the configured step-up
(STEP_UP_MAX_AGE_SECONDS, STEP_UP_ACR_VALUES) on its grant routes. Real tokens, the real app, the
real database and redis-server."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Annotated, Any

import httpx
import jwt
import pytest
from fastapi import APIRouter, FastAPI

from {{ cookiecutter.package_name }}.app import create_app
from {{ cookiecutter.package_name }}.cli import main
from {{ cookiecutter.package_name }}.config import ConfigError, Settings, read_settings
from {{ cookiecutter.package_name }}.security.authz import (
    CONFIGURED_STEP_UP,
    StepUp,
    no_object_policy,
    require_scopes,
    require_step_up,
)
from {{ cookiecutter.package_name }}.security.principal import Principal
from {{ cookiecutter.package_name }}.security.route_policy import route_policies
from {{ cookiecutter.package_name }}.settings import ServiceSettings

from .conftest import AUDIENCE, ISSUER, PSEUDONYM_KEY, TokenFactory, bearer, principal, pseudonym, running
from .test_audit import LogLines, captured_logs
from .test_errors import assert_problem

ORGS = "/api/v1/orgs"
MAX_AGE = 300
DESCRIPTION = 'error_description="A more recent or stronger authentication is required"'
STEP_UP_TYPE = "insufficient-user-authentication"


def authenticated(seconds_ago: int) -> int:
    return int(time.time()) - seconds_ago


@pytest.fixture
def step_up_app(settings_for: Callable[..., Settings]) -> FastAPI:
    return create_app(settings_for(step_up_max_age_seconds=MAX_AGE))


@pytest.fixture
async def http(step_up_app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with running(step_up_app) as client:
        yield client


@pytest.fixture
def logs(step_up_app: FastAPI) -> Iterator[LogLines]:
    with captured_logs() as lines:
        yield lines


async def new_org(http: httpx.AsyncClient, headers: dict[str, str]) -> str:
    created = await http.post(ORGS, json={"name": "Acme"}, headers=headers)
    assert created.status_code == 201, created.text
    return str(created.json()["id"])


def assert_step_up_required(response: httpx.Response, challenge: str) -> None:
    body = assert_problem(response, 401)
    assert str(body["type"]).endswith(f":problem:{STEP_UP_TYPE}")
    assert response.headers["www-authenticate"] == challenge


# --- The grant routes, with STEP_UP_MAX_AGE_SECONDS ----------------------------------------------


@pytest.mark.parametrize(
    "claims",
    [{"auth_time": authenticated(3600)}, {}],
    ids=["authenticated-an-hour-ago", "no-auth_time"],
)
async def test_a_grant_change_without_a_recent_authentication_is_a_401_with_max_age(
    http: httpx.AsyncClient, make_token: TokenFactory, claims: dict[str, Any]
) -> None:
    org = await new_org(http, bearer(make_token("alice")))  # creating an org needs no step-up
    stale = bearer(make_token("alice", **claims))
    challenge = f'Bearer error="insufficient_user_authentication", {DESCRIPTION}, max_age="{MAX_AGE}"'
    put = await http.put(f"{ORGS}/{org}/grants/bob", json={"relation": "owner"}, headers=stale)
    assert_step_up_required(put, challenge)
    assert_step_up_required(await http.delete(f"{ORGS}/{org}/grants/alice", headers=stale), challenge)
    # Nothing changed: bob holds nothing, alice is still the owner.
    assert (await http.get(f"{ORGS}/{org}", headers=bearer(make_token("bob")))).status_code == 403
    assert (await http.get(f"{ORGS}/{org}", headers=bearer(make_token("alice")))).status_code == 200


async def test_a_recent_authentication_changes_grants(http: httpx.AsyncClient, make_token: TokenFactory) -> None:
    fresh = bearer(make_token("alice", auth_time=authenticated(10)))
    org = await new_org(http, fresh)
    assert (await http.put(f"{ORGS}/{org}/grants/bob", json={"relation": "viewer"}, headers=fresh)).status_code == 201
    assert (await http.get(f"{ORGS}/{org}", headers=bearer(make_token("bob")))).status_code == 200
    assert (await http.delete(f"{ORGS}/{org}/grants/bob", headers=fresh)).status_code == 204


async def test_without_the_settings_a_grant_change_needs_no_step_up(
    client: httpx.AsyncClient, make_token: TokenFactory
) -> None:
    alice = bearer(make_token("alice"))  # no auth_time
    org = await new_org(client, alice)
    assert (await client.put(f"{ORGS}/{org}/grants/bob", json={"relation": "viewer"}, headers=alice)).status_code == 201


async def test_the_refusal_is_logged_with_the_reason_and_never_the_token(
    http: httpx.AsyncClient, make_token: TokenFactory, logs: LogLines
) -> None:
    org = await new_org(http, bearer(make_token("alice")))
    token = make_token("alice", auth_time=authenticated(3600))
    response = await http.put(f"{ORGS}/{org}/grants/bob", json={"relation": "owner"}, headers=bearer(token))
    assert response.status_code == 401
    event = logs.event(response, "step_up_required")
    assert event["reason"] == "authentication_too_old"
    assert event["subject"] == pseudonym(principal("alice"), PSEUDONYM_KEY)
    assert event["max_age"] == MAX_AGE
    assert event["route"] == "/api/v1/orgs/{org_id}/grants/{subject}"
    assert token not in logs.text and token.split(".")[1] not in logs.text


async def test_the_step_up_is_checked_after_the_scopes_and_before_the_object(
    http: httpx.AsyncClient, make_token: TokenFactory
) -> None:
    """Without the scope: 403 as before. With it, a stale authentication is 401 whether the caller
    holds the org or not, and whether it exists or not: the check reads the token only."""
    org = await new_org(http, bearer(make_token("alice")))
    unscoped = bearer(make_token("alice", scope="orgs:read", auth_time=authenticated(3600)))
    assert (await http.delete(f"{ORGS}/{org}/grants/bob", headers=unscoped)).status_code == 403
    stale_mallory = bearer(make_token("mallory", auth_time=authenticated(3600)))
    answers = [
        await http.delete(f"{ORGS}/{target}/grants/bob", headers=stale_mallory) for target in (org, uuid.uuid4())
    ]
    assert [answer.status_code for answer in answers] == [401, 401]
    bodies = [{**answer.json(), "trace_id": ""} for answer in answers]
    assert bodies[0] == bodies[1]
    assert answers[0].headers["www-authenticate"] == answers[1].headers["www-authenticate"]
    fresh_mallory = bearer(make_token("mallory", auth_time=authenticated(10)))
    assert (await http.delete(f"{ORGS}/{org}/grants/bob", headers=fresh_mallory)).status_code == 403


async def test_acceptable_acr_values_are_required_and_named_in_the_challenge(
    settings_for: Callable[..., Settings], make_token: TokenFactory
) -> None:
    app = create_app(settings_for(step_up_acr_values=["urn:example:mfa", "phr"]))
    challenge = f'Bearer error="insufficient_user_authentication", {DESCRIPTION}, acr_values="urn:example:mfa phr"'
    async with running(app) as http:
        org = await new_org(http, bearer(make_token("alice")))
        for claims in ({"acr": "urn:example:password"}, {}):
            weak = bearer(make_token("alice", **claims))
            put = await http.put(f"{ORGS}/{org}/grants/bob", json={"relation": "viewer"}, headers=weak)
            assert_step_up_required(put, challenge)
        strong = bearer(make_token("alice", acr="phr"))  # no auth_time needed: no max age is set
        put = await http.put(f"{ORGS}/{org}/grants/bob", json={"relation": "viewer"}, headers=strong)
        assert put.status_code == 201, put.text


async def test_max_age_and_acr_values_together_need_both(
    settings_for: Callable[..., Settings], make_token: TokenFactory
) -> None:
    app = create_app(settings_for(step_up_max_age_seconds=MAX_AGE, step_up_acr_values=["phr"]))
    challenge = f'Bearer error="insufficient_user_authentication", {DESCRIPTION}, max_age="{MAX_AGE}", acr_values="phr"'
    async with running(app) as http:
        org = await new_org(http, bearer(make_token("alice")))
        for claims in ({"acr": "phr", "auth_time": authenticated(3600)}, {"acr": "pwd", "auth_time": authenticated(5)}):
            put = await http.put(
                f"{ORGS}/{org}/grants/bob", json={"relation": "viewer"}, headers=bearer(make_token("alice", **claims))
            )
            assert_step_up_required(put, challenge)
        both = bearer(make_token("alice", acr="phr", auth_time=authenticated(5)))
        assert (
            await http.put(f"{ORGS}/{org}/grants/bob", json={"relation": "viewer"}, headers=both)
        ).status_code == 201


@pytest.mark.parametrize(
    ("claim", "value"),
    [("auth_time", "1700000000"), ("auth_time", True), ("acr", 2), ("acr", ""), ("amr", "pwd"), ("amr", [1])],
)
async def test_a_user_authentication_claim_of_the_wrong_shape_is_an_invalid_token(
    client: httpx.AsyncClient, make_token: TokenFactory, claim: str, value: object
) -> None:
    """Refused on every route, never read as absent (a string auth_time is not "no auth_time")."""
    response = await client.post(ORGS, json={"name": "Acme"}, headers=bearer(make_token("alice", **{claim: value})))
    assert_problem(response, 401)
    assert response.headers["www-authenticate"] == 'Bearer error="invalid_token"'


# --- Declared by a route of your own -------------------------------------------------------------


# A route of an owner's, with a fixed step-up of its own (module level: FastAPI reads the annotation).
REPORT_STEP_UP = StepUp(max_age=60, acr_values=("phr", "phrh"))
CanExport = Annotated[Principal, no_object_policy(scopes=["orgs:read"], step_up=REPORT_STEP_UP)]
# A route that declares two different step-ups: a mistake the walk reports.
CanDoTwice = Annotated[Principal, no_object_policy(scopes=["orgs:read"], step_up=StepUp(max_age=60))]
AndAgain = Annotated[Principal, require_step_up(StepUp(max_age=30), require_scopes("orgs:read"))]


def reports_router() -> APIRouter:
    router = APIRouter(prefix="/api/v1/reports")

    @router.post("")
    async def export(principal: CanExport) -> dict[str, str]:
        return {"exported_by": principal.subject}

    return router


async def test_a_route_declares_its_own_step_up_whatever_the_settings(
    settings: Settings, make_token: TokenFactory
) -> None:
    app = create_app(settings)  # STEP_UP_* unset
    app.include_router(reports_router())
    async with running(app) as http:
        old = bearer(make_token("alice", acr="phr", auth_time=authenticated(120)))
        assert_step_up_required(
            await http.post("/api/v1/reports", headers=old),
            f'Bearer error="insufficient_user_authentication", {DESCRIPTION}, max_age="60", acr_values="phr phrh"',
        )
        fresh = bearer(make_token("alice", acr="phrh", auth_time=authenticated(5)))
        exported = await http.post("/api/v1/reports", headers=fresh)
        assert exported.status_code == 200, exported.text
        assert exported.json() == {"exported_by": principal("alice")}


def test_the_route_policy_walk_reports_each_routes_step_up(settings: Settings) -> None:
    app = create_app(settings)
    app.include_router(reports_router())
    declared = {policy.route: policy.step_up for policy in route_policies(app.routes)}
    assert declared["PUT /api/v1/orgs/{org_id}/grants/{subject}"] == CONFIGURED_STEP_UP
    assert declared["DELETE /api/v1/orgs/{org_id}/grants/{subject}"] == CONFIGURED_STEP_UP
    assert declared["POST /api/v1/reports"] == StepUp(max_age=60, acr_values=("phr", "phrh"))
    assert declared["GET /api/v1/orgs/{org_id}"] is None
    assert declared["POST /api/v1/orgs"] is None


def test_a_route_declaring_two_different_step_ups_fails_the_walk(settings: Settings) -> None:
    app = create_app(settings)

    @app.post("/api/v1/twice")
    async def both(principal: CanDoTwice, again: AndAgain) -> None: ...

    problems = {policy.route: policy.problems for policy in route_policies(app.routes)}
    assert problems["POST /api/v1/twice"] == ("declares more than one step-up (StepUp)",)


def test_a_step_up_must_require_something() -> None:
    with pytest.raises(ValueError, match="max_age, acr_values or configured"):
        StepUp()
    with pytest.raises(ValueError, match="at least one second"):
        StepUp(max_age=0)
    with pytest.raises(ValueError, match="without spaces, quotes or backslashes"):
        StepUp(acr_values=("phr", 'a"b'))


# --- Settings ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("STEP_UP_ACR_VALUES", 'phr,"mfa"', "STEP_UP_ACR_VALUES: '\"mfa\"': an acr value is printable ASCII"),
        ("STEP_UP_ACR_VALUES", "a\\b", "STEP_UP_ACR_VALUES: 'a\\\\b': an acr value is printable ASCII"),
        ("STEP_UP_MAX_AGE_SECONDS", "0", "STEP_UP_MAX_AGE_SECONDS: Input should be greater than or equal to 1"),
    ],
)
def test_an_unusable_step_up_setting_is_refused_by_its_name(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, message: str
) -> None:
    for name, setting in {"JWT_ISSUER": "https://issuer.test", "JWT_AUDIENCE": "api", variable: value}.items():
        monkeypatch.setenv(name, setting)
    with pytest.raises(ConfigError) as refused:
        read_settings(ServiceSettings)
    assert message in str(refused.value)


def test_empty_step_up_settings_are_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, setting in {
        "JWT_ISSUER": "https://issuer.test",
        "JWT_AUDIENCE": "api",
        "STEP_UP_MAX_AGE_SECONDS": "",
        "STEP_UP_ACR_VALUES": "",
    }.items():
        monkeypatch.setenv(name, setting)
    settings = read_settings(ServiceSettings)
    assert (settings.step_up_max_age_seconds, settings.step_up_acr_values) == (None, [])
    assert CONFIGURED_STEP_UP.required(settings) == (None, ())


# --- Development tokens --------------------------------------------------------------------------


async def test_token_mint_signs_an_access_token_with_auth_time_and_acr(
    tmp_path: Path, settings_for: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    assert main(["keys", "generate", "--out", str(tmp_path)]) == 0
    monkeypatch.setenv("ENVIRONMENT", "development")
    base = ["token", "mint", "--private-key", str(tmp_path / "private.pem"), "--scope", "orgs:read orgs:write"]
    base += ["--issuer", ISSUER, "--audience", AUDIENCE]

    def mint(*extra: str) -> str:
        assert main([*base, *extra]) == 0
        minted: str = capsys.readouterr().out.strip().splitlines()[-1]
        return minted

    fresh = mint("--sub", "alice", "--auth-time", "now", "--acr", "phr")
    assert jwt.get_unverified_header(fresh)["typ"] == "at+jwt"
    stale = mint("--sub", "alice", "--auth-time", str(authenticated(3600)), "--acr", "phr")
    settings = settings_for(
        jwt_public_key=(tmp_path / "public.pem").read_text(),
        jwt_require_typ=True,
        step_up_max_age_seconds=MAX_AGE,
        step_up_acr_values=["phr"],
    )
    async with running(create_app(settings)) as http:
        org = await new_org(http, bearer(fresh))
        assert (await http.delete(f"{ORGS}/{org}/grants/bob", headers=bearer(stale))).status_code == 401
        granted = await http.put(f"{ORGS}/{org}/grants/bob", json={"relation": "viewer"}, headers=bearer(fresh))
        assert granted.status_code == 201, granted.text
