"""The example domain end to end: create an org, read it, grant, add users."""

from __future__ import annotations

import httpx

from .conftest import TokenFactory, bearer


async def test_caller_creates_an_org_and_becomes_its_owner(client: httpx.AsyncClient, make_token: TokenFactory) -> None:
    alice = bearer(make_token("alice"))
    created = await client.post("/api/v1/orgs", json={"name": "Acme"}, headers=alice)
    assert created.status_code == 201, created.text
    org_id = created.json()["id"]
    fetched = await client.get(f"/api/v1/orgs/{org_id}", headers=alice)
    assert fetched.status_code == 200
    assert fetched.json()["name"] == "Acme"


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
