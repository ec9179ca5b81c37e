"""The example domain end to end: create an org, read it, grant, add users."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from typing import Any

import anyio
import httpx
import pytest
from fastapi import FastAPI

from {{ cookiecutter.package_name }}.api.users import MAX_PAGE_SIZE
from {{ cookiecutter.package_name }}.domain import ORG
from {{ cookiecutter.package_name }}.security import grants
from {{ cookiecutter.package_name }}.tables import Permission, Relation

from .conftest import TokenFactory, bearer, principal
from .test_errors import assert_problem


async def test_caller_creates_an_org_and_becomes_its_owner(client: httpx.AsyncClient, make_token: TokenFactory) -> None:
    alice = bearer(make_token("alice"))
    created = await client.post("/api/v1/orgs", json={"name": "Acme"}, headers=alice)
    assert created.status_code == 201, created.text
    org_id = created.json()["id"]
    fetched = await client.get(f"/api/v1/orgs/{org_id}", headers=alice)
    assert fetched.status_code == 200
    assert fetched.json() == created.json()
    assert created.json()["name"] == "Acme"


async def test_owner_grants_and_viewer_reads_users(client: httpx.AsyncClient, make_token: TokenFactory) -> None:
    alice, bob = bearer(make_token("alice")), bearer(make_token("bob"))
    org_id = (await client.post("/api/v1/orgs", json={"name": "Acme"}, headers=alice)).json()["id"]
    assert (await client.get(f"/api/v1/orgs/{org_id}", headers=bob)).status_code == 403
    grant = await client.put(f"/api/v1/orgs/{org_id}/grants/bob", json={"relation": "viewer"}, headers=alice)
    assert grant.status_code == 201
    user = await client.post(
        f"/api/v1/orgs/{org_id}/users", json={"email": "j@example.org", "role": "editor"}, headers=alice
    )
    assert user.status_code == 201, user.text
    listed = await client.get(f"/api/v1/orgs/{org_id}/users", headers=bob)
    assert listed.status_code == 200
    assert [u["email"] for u in listed.json()["items"]] == ["j@example.org"]
    assert (
        await client.post(f"/api/v1/orgs/{org_id}/users", json={"email": "k@example.org"}, headers=bob)
    ).status_code == 403


# Grants: owner only (see test_authz for every relation); the org always keeps an owner.


async def create_org(client: httpx.AsyncClient, headers: dict[str, str], name: str = "Acme") -> str:
    response = await client.post("/api/v1/orgs", json={"name": name}, headers=headers)
    assert response.status_code == 201, response.text
    org_id: str = response.json()["id"]
    return org_id


async def test_putting_a_grant_creates_it_with_201_and_changes_it_with_200(
    client: httpx.AsyncClient, make_token: TokenFactory
) -> None:
    alice = bearer(make_token("alice"))
    org = await create_org(client, alice)
    created = await client.put(f"/api/v1/orgs/{org}/grants/bob", json={"relation": "viewer"}, headers=alice)
    changed = await client.put(f"/api/v1/orgs/{org}/grants/bob", json={"relation": "admin"}, headers=alice)
    assert (created.status_code, changed.status_code) == (201, 200)
    assert changed.json() == {"org_id": org, "subject": principal("bob"), "relation": "admin"}  # the principal id


@pytest.mark.parametrize("body", [{"relation": "superuser"}, {"relation": "Owner"}, {}, {"relation": "viewer", "x": 1}])
async def test_an_unknown_relation_or_field_is_refused_with_400(
    client: httpx.AsyncClient, make_token: TokenFactory, body: dict[str, object]
) -> None:
    alice = bearer(make_token("alice"))
    org = await create_org(client, alice)
    response = await client.put(f"/api/v1/orgs/{org}/grants/bob", json=body, headers=alice)
    assert response.status_code == 400
    assert response.json()["type"].endswith(":problem:validation")


async def test_the_last_owner_can_be_neither_removed_nor_demoted(
    client: httpx.AsyncClient, make_token: TokenFactory
) -> None:
    alice = bearer(make_token("alice"))
    org = await create_org(client, alice)
    removed = await client.delete(f"/api/v1/orgs/{org}/grants/alice", headers=alice)
    demoted = await client.put(f"/api/v1/orgs/{org}/grants/alice", json={"relation": "admin"}, headers=alice)
    for response in (removed, demoted):
        assert response.status_code == 409
        assert response.headers["content-type"] == "application/problem+json"
        assert response.json()["detail"] == "An org must keep at least one owner."
    assert (await client.get(f"/api/v1/orgs/{org}", headers=alice)).status_code == 200


async def test_an_owner_may_step_down_once_another_owner_exists(
    client: httpx.AsyncClient, make_token: TokenFactory
) -> None:
    alice, bob = bearer(make_token("alice")), bearer(make_token("bob"))
    org = await create_org(client, alice)
    assert (
        await client.put(f"/api/v1/orgs/{org}/grants/bob", json={"relation": "owner"}, headers=alice)
    ).status_code == 201
    assert (await client.delete(f"/api/v1/orgs/{org}/grants/alice", headers=alice)).status_code == 204
    assert (await client.get(f"/api/v1/orgs/{org}", headers=alice)).status_code == 403
    assert (await client.delete(f"/api/v1/orgs/{org}/grants/bob", headers=bob)).status_code == 409


async def test_two_owners_demoting_each_other_at_once_leave_one_owner(
    client: httpx.AsyncClient, make_token: TokenFactory
) -> None:
    alice, bob = bearer(make_token("alice")), bearer(make_token("bob"))
    org = await create_org(client, alice)
    await client.put(f"/api/v1/orgs/{org}/grants/bob", json={"relation": "owner"}, headers=alice)
    results: list[int] = []

    async def demote(subject: str, headers: dict[str, str]) -> None:
        response = await client.put(
            f"/api/v1/orgs/{org}/grants/{subject}", json={"relation": "viewer"}, headers=headers
        )
        results.append(response.status_code)

    async with anyio.create_task_group() as group:
        group.start_soon(demote, "bob", alice)
        group.start_soon(demote, "alice", bob)
    # The loser is refused either by the owner check (403: its demotion already committed) or by
    # the last-owner check (409: both passed the owner check); never do both succeed.
    assert sorted(results) in ([200, 403], [200, 409])
    owners = [
        subject
        for subject, headers in (("alice", alice), ("bob", bob))
        if (
            await client.put(f"/api/v1/orgs/{org}/grants/carol", json={"relation": "viewer"}, headers=headers)
        ).status_code
        in (200, 201)
    ]
    assert len(owners) == 1


@pytest.fixture
def demoted_after_the_check(app: FastAPI, monkeypatch: pytest.MonkeyPatch) -> Callable[[str, str], None]:
    """Arrange that `subject`'s next owner check passes and that right after it, before the route
    writes, another owner demotes `subject` to viewer in a transaction of its own that commits."""

    def arrange(org: str, subject: str) -> None:
        reads = app.state.runtime.statements
        real_fetch = reads.fetch

        async def check_then_demotion_commits(query: Any, **values: Any) -> Any:
            rows = await real_fetch(query, **values)
            if rows and values.get("subject") == subject:
                monkeypatch.setattr(reads, "fetch", real_fetch)  # once
                async with app.state.runtime.sessionmaker() as session:
                    await grants.set_relation(
                        session, ORG, org, subject, Relation.viewer, granted_by="t", acting_owner=principal("alice")
                    )
                    await session.commit()
            return rows

        monkeypatch.setattr(reads, "fetch", check_then_demotion_commits)

    return arrange


@pytest.mark.parametrize("change", ["put", "delete"])
async def test_an_owner_demoted_while_its_grant_change_runs_cannot_land_it(
    client: httpx.AsyncClient,
    make_token: TokenFactory,
    demoted_after_the_check: Callable[[str, str], None],
    audit_events: list[logging.LogRecord],
    change: str,
) -> None:
    alice, bob, carol = bearer(make_token("alice")), bearer(make_token("bob")), bearer(make_token("carol"))
    org = await create_org(client, alice)
    for subject, relation in (("bob", "owner"), ("carol", "viewer")):
        granted = await client.put(f"/api/v1/orgs/{org}/grants/{subject}", json={"relation": relation}, headers=alice)
        assert granted.status_code == 201

    demoted_after_the_check(org, principal("bob"))
    if change == "put":  # bob tries to make carol an owner
        response = await client.put(f"/api/v1/orgs/{org}/grants/carol", json={"relation": "owner"}, headers=bob)
    else:  # bob tries to remove carol
        response = await client.delete(f"/api/v1/orgs/{org}/grants/carol", headers=bob)

    assert_problem(response, 403)
    denied = [r for r in audit_events if r.getMessage() == "object_denied"]
    assert [getattr(r, "reason", None) for r in denied] == ["demoted_during_request"]
    # Nothing of bob's change landed: carol is still exactly a viewer, bob is a viewer now.
    assert (await client.get(f"/api/v1/orgs/{org}", headers=carol)).status_code == 200
    assert (
        await client.put(f"/api/v1/orgs/{org}/grants/dave", json={"relation": "viewer"}, headers=carol)
    ).status_code == 403
    assert (
        await client.put(f"/api/v1/orgs/{org}/grants/dave", json={"relation": "viewer"}, headers=bob)
    ).status_code == 403


async def test_revoking_a_grant_that_does_not_exist_is_404_for_the_owner(
    client: httpx.AsyncClient, make_token: TokenFactory
) -> None:
    alice = bearer(make_token("alice"))
    org = await create_org(client, alice)
    assert (await client.delete(f"/api/v1/orgs/{org}/grants/nobody", headers=alice)).status_code == 404


async def test_a_grant_that_outlived_its_org_answers_404_to_its_holder(
    client: httpx.AsyncClient, make_token: TokenFactory, app: FastAPI
) -> None:
    ghost = str(uuid.uuid4())
    async with app.state.runtime.sessionmaker() as session:
        session.add(
            Permission(
                subject=principal("alice"), resource_type="org", resource_id=ghost, relation="owner", created_by="t"
            )
        )
        await session.commit()
    alice = bearer(make_token("alice"))
    assert (await client.get(f"/api/v1/orgs/{ghost}", headers=alice)).status_code == 404
    assert (
        await client.put(f"/api/v1/orgs/{ghost}/grants/bob", json={"relation": "viewer"}, headers=alice)
    ).status_code == 404


# Org users: the seed's CreateUser body, paginated lists, children bound to their org.


async def test_users_are_created_read_and_deleted_within_their_org(
    client: httpx.AsyncClient, make_token: TokenFactory
) -> None:
    alice = bearer(make_token("alice"))
    org = await create_org(client, alice)
    body = {"email": "J.Doe@Example.org", "role": "editor", "metadata": {"team": "infra"}}
    created = await client.post(f"/api/v1/orgs/{org}/users", json=body, headers=alice)
    assert created.status_code == 201, created.text
    user = created.json()
    assert (user["email"], user["role"], user["metadata"], user["org_id"]) == (
        "j.doe@example.org",
        "editor",
        {"team": "infra"},
        org,
    )
    duplicate = await client.post(f"/api/v1/orgs/{org}/users", json=body, headers=alice)
    assert duplicate.status_code == 409
    assert (await client.get(f"/api/v1/orgs/{org}/users/{user['id']}", headers=alice)).json() == user
    assert (await client.delete(f"/api/v1/orgs/{org}/users/{user['id']}", headers=alice)).status_code == 204
    assert (await client.get(f"/api/v1/orgs/{org}/users/{user['id']}", headers=alice)).status_code == 404


async def test_a_new_user_defaults_to_the_viewer_role(client: httpx.AsyncClient, make_token: TokenFactory) -> None:
    alice = bearer(make_token("alice"))
    org = await create_org(client, alice)
    created = await client.post(f"/api/v1/orgs/{org}/users", json={"email": "v@example.org"}, headers=alice)
    assert (created.json()["role"], created.json()["metadata"]) == ("viewer", {})


async def test_user_lists_are_paginated_with_a_capped_page_size(
    client: httpx.AsyncClient, make_token: TokenFactory
) -> None:
    alice = bearer(make_token("alice"))
    org = await create_org(client, alice)
    for i in range(5):
        await client.post(f"/api/v1/orgs/{org}/users", json={"email": f"u{i}@example.org"}, headers=alice)
    users = f"/api/v1/orgs/{org}/users"
    first = (await client.get(users, params={"limit": 2}, headers=alice)).json()
    second = (await client.get(users, params={"limit": 2, "offset": first["next_offset"]}, headers=alice)).json()
    last = (await client.get(users, params={"limit": 2, "offset": second["next_offset"]}, headers=alice)).json()
    emails = [u["email"] for page in (first, second, last) for u in page["items"]]
    assert emails == [f"u{i}@example.org" for i in range(5)]
    assert (first["next_offset"], second["next_offset"], last["next_offset"]) == (2, 4, None)
    assert (await client.get(users, params={"limit": MAX_PAGE_SIZE}, headers=alice)).status_code == 200
    for limit in (0, MAX_PAGE_SIZE + 1):
        too_big = await client.get(users, params={"limit": limit}, headers=alice)
        assert too_big.status_code == 400
        assert too_big.json()["errors"][0]["loc"] == ["query", "limit"]


async def test_users_of_one_org_never_appear_in_another(client: httpx.AsyncClient, make_token: TokenFactory) -> None:
    alice = bearer(make_token("alice"))
    acme, globex = await create_org(client, alice, "Acme"), await create_org(client, alice, "Globex")
    user = (await client.post(f"/api/v1/orgs/{acme}/users", json={"email": "a@example.org"}, headers=alice)).json()
    assert (await client.get(f"/api/v1/orgs/{globex}/users", headers=alice)).json()["items"] == []
    assert (await client.get(f"/api/v1/orgs/{globex}/users/{user['id']}", headers=alice)).status_code == 404
    assert (await client.delete(f"/api/v1/orgs/{globex}/users/{user['id']}", headers=alice)).status_code == 404
    assert (await client.get(f"/api/v1/orgs/{acme}/users/{user['id']}", headers=alice)).status_code == 200
