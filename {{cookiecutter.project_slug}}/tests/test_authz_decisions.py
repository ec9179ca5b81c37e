"""Every authorization decision of layer 7 is an `authz_decision` audit event with its object
(ASVS 5.0 V16.3.2): denials always, allows when AUDIT_AUTHZ_ALLOWS, the same event and fields
whichever engine decides (the permissions table, or authz_engine=cerbos's PDP). Read from the
service's real JSON log lines."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from {{ cookiecutter.package_name }}.app import create_app
from {{ cookiecutter.package_name }}.config import Settings

from .conftest import ALL_SCOPES, TokenFactory, bearer, principal, pseudonym, running
from .test_audit import LogLines, captured_logs

ORGS = "/api/v1/orgs"
DECISION_FIELDS = {"engine", "action", "resource_type", "resource_id", "required", "relation", "outcome", "policy"}


def decisions(logs: LogLines) -> list[dict[str, Any]]:
    return [line for line in logs.records() if line.get("event") == "authz_decision"]


async def test_a_denial_is_an_authz_decision_event_with_its_object_and_allows_are_not_logged_by_default(
    settings_for: Callable[..., Settings], make_token: TokenFactory
) -> None:
    async with running(create_app(settings_for())) as client:
        alice, mallory = bearer(make_token("alice", ALL_SCOPES)), bearer(make_token("mallory", ALL_SCOPES))
        with captured_logs() as logs:
            org = (await client.post(ORGS, json={"name": "Acme"}, headers=alice)).json()["id"]
            assert (await client.get(f"{ORGS}/{org}", headers=alice)).status_code == 200
            denied = await client.get(f"{ORGS}/{org}", headers=mallory)
    assert denied.status_code == 403
    [decision] = decisions(logs)  # the denial only: allows cost nothing unless asked for
    assert decision["trace_id"] == denied.headers["x-trace-id"]
    assert decision.keys() >= DECISION_FIELDS
    assert (decision["action"], decision["resource_type"], decision["resource_id"]) == ("orgs:read", "org", org)
    assert (decision["outcome"], decision["level"]) == ("deny", "WARNING")
    assert decision["policy"] and decision["engine"]
    # Masked like every event: the caller by its keyed pseudonym only.
    assert decision["subject"] == pseudonym(principal("mallory"))
    assert "mallory" not in logs.text
    refusal = logs.event(denied, "object_denied")
    assert (refusal["resource_type"], refusal["resource_id"], refusal["action"]) == ("org", org, "orgs:read")


async def test_with_audit_authz_allows_every_allow_is_an_event_with_its_object(
    settings_for: Callable[..., Settings], make_token: TokenFactory
) -> None:
    async with running(create_app(settings_for(audit_authz_allows=True))) as client:
        alice = bearer(make_token("alice", ALL_SCOPES))
        with captured_logs() as logs:
            created = await client.post(ORGS, json={"name": "Acme"}, headers=alice)
            org = created.json()["id"]
            read = await client.get(f"{ORGS}/{org}", headers=alice)
            listed = await client.get(ORGS, headers=alice)
    assert read.status_code == 200 and listed.status_code == 200
    create_decision = logs.event(created, "authz_decision")
    assert (create_decision["action"], create_decision["resource_type"], create_decision["outcome"]) == (
        "orgs:write",
        "service",
        "allow",
    )
    read_decision = logs.event(read, "authz_decision")
    assert read_decision.keys() >= DECISION_FIELDS
    assert (read_decision["resource_type"], read_decision["resource_id"], read_decision["outcome"]) == (
        "org",
        org,
        "allow",
    )
    assert read_decision["level"] == "INFO"
    list_decision = logs.event(listed, "authz_decision")  # a list: the condition, no single object
    assert (list_decision["resource_type"], list_decision["plan"]) == ("org", True)
    assert list_decision["outcome"] in ("allow", "conditional")
    assert {line["subject"] for line in decisions(logs)} == {pseudonym(principal("alice"))}


async def test_a_scope_denial_names_the_object_and_is_an_authz_decision(
    settings_for: Callable[..., Settings], make_token: TokenFactory
) -> None:
    async with running(create_app(settings_for())) as client:
        org = (await client.post(ORGS, json={"name": "Acme"}, headers=bearer(make_token("alice", ALL_SCOPES)))).json()
        with captured_logs() as logs:
            denied = await client.get(f"{ORGS}/{org['id']}", headers=bearer(make_token("alice", "users:read")))
    assert denied.status_code == 403
    refusal = logs.event(denied, "scope_denied")
    assert (refusal["resource_type"], refusal["resource_id"], refusal["action"]) == ("org", org["id"], "orgs:read")
    assert refusal["missing"] == ["orgs:read"]
    decision = logs.event(denied, "authz_decision")
    assert (decision["outcome"], decision["policy"], decision["resource_id"]) == ("deny", "scopes", org["id"])
