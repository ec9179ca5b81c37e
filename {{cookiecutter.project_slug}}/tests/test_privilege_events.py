"""Every privilege change is an audit event (ASVS 5.0 V16.3.3, V16.2.1, V8.4.2): a grant put or
deleted, a user created or deleted, through the API and through the operators' commands (`grant`,
`revoke-grant`, `token revoke`, `token revoke-subject`, `lockout lift`, `grants move-issuer`), is one
`privilege_changed` line naming the action, the object, the grantee and the actor, with subjects
as keyed pseudonyms and emails masked like every event. Read from the real JSON log lines: the
service's (stdout) and the commands' (stderr)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import anyio.to_thread
import httpx
import pytest
from fastapi import FastAPI

from {{ cookiecutter.package_name }} import cli
from {{ cookiecutter.package_name }}.security.principal import issuer_namespace

from .conftest import ISSUER, PSEUDONYM_KEY, TokenFactory, bearer, principal, pseudonym
from .test_audit import LogLines, captured_logs

ORGS = "/api/v1/orgs"
OTHER_ISSUER = "https://login.example.com/"


@pytest.fixture
def logs(app: FastAPI) -> Iterator[LogLines]:
    with captured_logs() as lines:
        yield lines


def changes(lines: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [line for line in lines if line.get("event") == "privilege_changed"]


def of(logs: LogLines, response: httpx.Response) -> list[dict[str, Any]]:
    """The privilege changes logged while the request that got `response` ran."""
    return changes(logs.of_trace(response.headers["x-trace-id"]))


def named(subject: str) -> str:
    return pseudonym(principal(subject), PSEUDONYM_KEY)


# --- Through the API ---------------------------------------------------------------------------


async def test_grants_put_and_deleted_through_the_api_are_events_with_object_grantee_and_actor(
    client: httpx.AsyncClient, make_token: TokenFactory, logs: LogLines
) -> None:
    alice = bearer(make_token("alice"))
    created = await client.post(ORGS, json={"name": "Acme"}, headers=alice)
    org = created.json()["id"]
    granted = await client.put(f"{ORGS}/{org}/grants/bob", json={"relation": "viewer"}, headers=alice)
    raised = await client.put(f"{ORGS}/{org}/grants/bob", json={"relation": "admin"}, headers=alice)
    removed = await client.delete(f"{ORGS}/{org}/grants/bob", headers=alice)
    assert [r.status_code for r in (created, granted, raised, removed)] == [201, 201, 200, 204]
    expected = [
        (created, "grant_created", "alice", "owner"),  # the creator becomes the owner
        (granted, "grant_created", "bob", "viewer"),
        (raised, "grant_changed", "bob", "admin"),
        (removed, "grant_revoked", "bob", None),
    ]
    for response, action, grantee, relation in expected:
        [event] = of(logs, response)
        assert event["logger"] == "audit" and event["level"] == "INFO"
        assert (event["action"], event["resource_type"], event["resource_id"]) == (action, "org", org)
        assert event["grantee"] == named(grantee)
        assert event["subject"] == named("alice")  # the actor
        assert event.get("relation") == relation
        assert event["route"] in (ORGS, "/api/v1/orgs/{org_id}/grants/{subject}")
    assert principal("bob") not in logs.text and principal("alice") not in logs.text


async def test_a_refused_grant_change_is_no_privilege_change(
    client: httpx.AsyncClient, make_token: TokenFactory, logs: LogLines
) -> None:
    alice = bearer(make_token("alice"))
    org = (await client.post(ORGS, json={"name": "Acme"}, headers=alice)).json()["id"]
    last_owner = await client.delete(f"{ORGS}/{org}/grants/alice", headers=alice)
    not_owner = await client.put(
        f"{ORGS}/{org}/grants/mallory", json={"relation": "owner"}, headers=bearer(make_token("mallory"))
    )
    missing = await client.delete(f"{ORGS}/{org}/grants/nobody", headers=alice)
    assert [r.status_code for r in (last_owner, not_owner, missing)] == [409, 403, 404]
    assert [of(logs, r) for r in (last_owner, not_owner, missing)] == [[], [], []]


async def test_users_created_and_deleted_are_events_with_the_email_masked(
    client: httpx.AsyncClient, make_token: TokenFactory, logs: LogLines
) -> None:
    alice = bearer(make_token("alice"))
    org = (await client.post(ORGS, json={"name": "Acme"}, headers=alice)).json()["id"]
    created = await client.post(
        f"{ORGS}/{org}/users", json={"email": "jane@example.org", "role": "admin"}, headers=alice
    )
    assert created.status_code == 201, created.text
    user = created.json()["id"]
    deleted = await client.delete(f"{ORGS}/{org}/users/{user}", headers=alice)
    assert deleted.status_code == 204
    for response, action in ((created, "user_created"), (deleted, "user_deleted")):
        [event] = of(logs, response)
        assert (event["action"], event["resource_id"], event["user_id"], event["role"]) == (action, org, user, "admin")
        assert event["email"] == "j***@example.org"
        assert event["subject"] == named("alice")
    assert "jane@example.org" not in logs.text


# --- Through the operators' commands -----------------------------------------------------------


@pytest.fixture
def operator_env(app: FastAPI, cli_env: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """The commands' environment: the app's database and Redis, and the same pseudonym key."""
    monkeypatch.setenv("DATABASE_URL", app.state.runtime.settings.database_url)
    monkeypatch.setenv("AUDIT_PSEUDONYM_KEY", PSEUDONYM_KEY)
    for name in ("LOGNAME", "USER"):  # the OS user the commands name as the operator (getpass)
        monkeypatch.setenv(name, "ops-jane")


async def command_events(capsys: pytest.CaptureFixture[str], *argv: str) -> list[dict[str, Any]]:
    """Run one command (its own event loop, as from a shell); its privilege_changed lines (stderr)."""
    assert await anyio.to_thread.run_sync(cli.main, list(argv)) == 0
    err = capsys.readouterr().err
    return changes([json.loads(line) for line in err.splitlines() if line.startswith("{")])


@pytest.mark.usefixtures("operator_env")
async def test_the_grant_commands_are_events_naming_the_operator(
    client: httpx.AsyncClient, make_token: TokenFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    org = (await client.post(ORGS, json={"name": "Acme"}, headers=bearer(make_token("alice")))).json()["id"]
    capsys.readouterr()
    granted = await command_events(capsys, "grant", "--sub", "ops", "--org", org, "--relation", "owner")
    changed = await command_events(capsys, "grant", "--sub", "ops", "--org", org, "--relation", "viewer")
    revoked = await command_events(capsys, "revoke-grant", "--sub", "ops", "--org", org)
    expected = [
        (granted, "grant_created", "grant", "owner"),
        (changed, "grant_changed", "grant", "viewer"),
        (revoked, "grant_revoked", "revoke-grant", None),
    ]
    for events, action, command, relation in expected:
        [event] = events
        assert (event["action"], event["command"], event.get("relation")) == (action, command, relation)
        assert (event["resource_type"], event["resource_id"]) == ("org", org)
        assert event["grantee"] == named("ops")
        assert event["operator"] == "ops-jane" and event["operator_host"]
        assert event["logger"] == "audit" and "subject" not in event  # no request: the operator acted


@pytest.mark.usefixtures("operator_env")
async def test_token_revocations_and_a_lifted_lockout_are_events_naming_the_operator(
    capsys: pytest.CaptureFixture[str],
) -> None:
    [revoked] = await command_events(capsys, "token", "revoke", "--sub", "bob", "--jti", "j-1", "--exp", "4102444800")
    assert (revoked["action"], revoked["grantee"], revoked["jti"]) == ("token_revoked", named("bob"), "j-1")
    [everything] = await command_events(capsys, "token", "revoke-subject", "--sub", "bob")
    assert (everything["action"], everything["grantee"]) == ("subject_tokens_revoked", named("bob"))
    [subject] = await command_events(capsys, "lockout", "lift", "--sub", "bob")
    assert (subject["action"], subject["grantee"], subject["kind"]) == ("lockout_lifted", named("bob"), "subject")
    [address] = await command_events(capsys, "lockout", "lift", "--address", "203.0.113.7")
    assert (address["action"], address["kind"]) == ("lockout_lifted", "address")
    assert address["client"] == pseudonym("203.0.113.7", PSEUDONYM_KEY)  # as LOG_CLIENT_ADDRESS (pseudonym) writes it
    commands = [event["command"] for event in (revoked, everything, subject, address)]
    assert commands == ["token-revoke", "token-revoke-subject", "lockout-lift", "lockout-lift"]
    assert {event["operator"] for event in (revoked, everything, subject, address)} == {"ops-jane"}


@pytest.mark.usefixtures("operator_env")
async def test_moving_the_issuers_grants_is_an_event_naming_the_operator_and_the_counts(
    client: httpx.AsyncClient, make_token: TokenFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in ("alice", "bob"):
        assert (await client.post(ORGS, json={"name": name}, headers=bearer(make_token(name)))).status_code == 201
    capsys.readouterr()
    [moved] = await command_events(capsys, "grants", "move-issuer", "--from", ISSUER, "--to", OTHER_ISSUER)
    assert (moved["action"], moved["command"], moved["grants"]) == ("issuer_moved", "grants-move-issuer", 2)
    namespaces = (issuer_namespace(ISSUER), issuer_namespace(OTHER_ISSUER))
    assert (moved["from_namespace"], moved["to_namespace"]) == namespaces
    assert moved["operator"] == "ops-jane" and "subject" not in moved
