"""Lists never leak: GET /orgs holds the orgs the caller may read and nothing else, filtered in the
statement that reads them (the permissions table's relation; with authz_engine=cerbos, the PDP's
query plan written as SQL)."""

from __future__ import annotations

import httpx

from .conftest import ALL_SCOPES, TokenFactory, bearer

ORGS = "/api/v1/orgs"


async def test_the_org_list_holds_only_the_orgs_the_caller_may_read(
    client: httpx.AsyncClient, make_token: TokenFactory
) -> None:
    alice, bob = bearer(make_token("alice", ALL_SCOPES)), bearer(make_token("bob", ALL_SCOPES))
    first = (await client.post(ORGS, json={"name": "First"}, headers=alice)).json()["id"]
    second = (await client.post(ORGS, json={"name": "Second"}, headers=alice)).json()["id"]
    own = (await client.post(ORGS, json={"name": "Bob's"}, headers=bob)).json()["id"]
    granted = await client.put(f"{ORGS}/{second}/grants/bob", json={"relation": "viewer"}, headers=alice)
    assert granted.status_code in (200, 201), granted.text

    listed = await client.get(ORGS, headers=bob)
    assert listed.status_code == 200, listed.text
    assert {org["id"] for org in listed.json()["items"]} == {second, own}
    assert {org["id"] for org in (await client.get(ORGS, headers=alice)).json()["items"]} == {first, second}

    page = (await client.get(ORGS, params={"limit": 1}, headers=alice)).json()
    assert len(page["items"]) == 1 and page["next_offset"] == 1


async def test_the_org_list_needs_its_scope(client: httpx.AsyncClient, make_token: TokenFactory) -> None:
    alice = bearer(make_token("alice", ALL_SCOPES))
    assert (await client.post(ORGS, json={"name": "First"}, headers=alice)).status_code == 201
    refused = await client.get(ORGS, headers=bearer(make_token("alice", "orgs:write")))
    assert refused.status_code == 403
    assert refused.headers["content-type"] == "application/problem+json"


async def test_a_caller_without_grants_lists_nothing(client: httpx.AsyncClient, make_token: TokenFactory) -> None:
    created = await client.post(ORGS, json={"name": "First"}, headers=bearer(make_token("alice", ALL_SCOPES)))
    assert created.status_code == 201
    listed = await client.get(ORGS, headers=bearer(make_token("mallory", ALL_SCOPES)))
    assert listed.status_code == 200 and listed.json() == {"items": [], "next_offset": None}
