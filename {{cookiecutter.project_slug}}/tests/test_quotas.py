"""Business limits (ASVS 5.0 V2.1.3, V2.4.1): orgs per subject (QUOTA_ORGS_PER_SUBJECT) and users
per org (QUOTA_USERS_PER_ORG), checked in the transaction of the insert: 409 `quota-exceeded`
problems and a `quota_exceeded` event beyond them, and concurrent requests never overshoot, on
the bake's real database (SQLite, or PostgreSQL with `database=postgresql`)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import httpx
from fastapi import FastAPI
from sqlalchemy import text

from {{ cookiecutter.package_name }}.app import create_app
from {{ cookiecutter.package_name }}.config import Settings
from {{ cookiecutter.package_name }}.security.errors import problem_type

from .conftest import ALL_SCOPES, TokenFactory, bearer, principal, pseudonym, running
from .test_audit import captured_logs

ORGS = "/api/v1/orgs"


def assert_quota_exceeded(response: httpx.Response, variable: str) -> None:
    assert response.status_code == 409, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body = response.json()
    assert body["type"] == problem_type("quota-exceeded")
    assert variable in body["detail"]


async def count(app: FastAPI, statement: str, **values: object) -> int:
    async with app.state.runtime.engine.connect() as connection:
        return int((await connection.execute(text(statement), values)).scalar_one())


async def test_an_org_beyond_the_subjects_quota_is_a_409_problem_and_an_event(
    settings_for: Callable[..., Settings], make_token: TokenFactory
) -> None:
    async with running(create_app(settings_for(quota_orgs_per_subject=2))) as client:
        alice, bob = bearer(make_token("alice", ALL_SCOPES)), bearer(make_token("bob", ALL_SCOPES))
        for name in ("A", "B"):
            assert (await client.post(ORGS, json={"name": name}, headers=alice)).status_code == 201
        with captured_logs() as logs:
            refused = await client.post(ORGS, json={"name": "C"}, headers=alice)
        assert_quota_exceeded(refused, "QUOTA_ORGS_PER_SUBJECT")
        event = logs.event(refused, "quota_exceeded")
        assert (event["quota"], event["limit"], event["subject"]) == (
            "orgs_per_subject",
            2,
            pseudonym(principal("alice")),
        )
        # Nothing of the refused org was written: no org, no owner grant; the list shows two.
        assert len((await client.get(ORGS, headers=alice)).json()["items"]) == 2
        # Another subject's quota is its own.
        assert (await client.post(ORGS, json={"name": "D"}, headers=bob)).status_code == 201


async def test_concurrent_creates_never_exceed_the_orgs_quota(
    settings_for: Callable[..., Settings], make_token: TokenFactory
) -> None:
    app = create_app(settings_for(quota_orgs_per_subject=3))
    async with running(app) as client:
        alice = bearer(make_token("alice", ALL_SCOPES))
        answers = await asyncio.gather(
            *(client.post(ORGS, json={"name": f"Org {n}"}, headers=alice) for n in range(12))
        )
        statuses = sorted(answer.status_code for answer in answers)
        assert statuses == [201] * 3 + [409] * 9, [answer.text for answer in answers]
        for answer in answers:
            if answer.status_code == 409:
                assert_quota_exceeded(answer, "QUOTA_ORGS_PER_SUBJECT")
        created_by = principal("alice")
        assert await count(app, "SELECT count(*) FROM orgs WHERE created_by = :s", s=created_by) == 3
        assert await count(app, "SELECT count(*) FROM permissions WHERE subject = :s", s=created_by) == 3


async def test_concurrent_users_never_exceed_the_users_per_org_quota(
    settings_for: Callable[..., Settings], make_token: TokenFactory
) -> None:
    app = create_app(settings_for(quota_users_per_org=4))
    async with running(app) as client:
        alice = bearer(make_token("alice", ALL_SCOPES))
        org = (await client.post(ORGS, json={"name": "Acme"}, headers=alice)).json()["id"]
        users = f"{ORGS}/{org}/users"
        with captured_logs() as logs:
            answers = await asyncio.gather(
                *(client.post(users, json={"email": f"u{n}@example.org"}, headers=alice) for n in range(12))
            )
        assert sorted(answer.status_code for answer in answers) == [201] * 4 + [409] * 8
        refused = next(answer for answer in answers if answer.status_code == 409)
        assert_quota_exceeded(refused, "QUOTA_USERS_PER_ORG")
        event = logs.event(refused, "quota_exceeded")
        assert (event["quota"], event["resource_type"], event["resource_id"]) == ("users_per_org", "org", org)
        assert await count(app, "SELECT count(*) FROM org_users") == 4
        # A user the org already has is still the duplicate's 409, not the quota's.
        existing = next(answer for answer in answers if answer.status_code == 201).json()["email"]
        duplicate = await client.post(users, json={"email": existing}, headers=alice)
        assert duplicate.status_code == 409 and "already exists" in duplicate.json()["detail"]


async def test_the_users_quota_is_kept_with_the_org_a_delete_gives_a_place_back_a_duplicate_takes_none(
    settings_for: Callable[..., Settings], make_token: TokenFactory
) -> None:
    """`orgs.user_count` is what the quota reads (one row, whatever the org's size): a refused
    duplicate leaves it as it was, a deleted user frees a place, and a full org still answers a
    duplicate as the duplicate it is."""
    app = create_app(settings_for(quota_users_per_org=2))
    async with running(app) as client:
        alice = bearer(make_token("alice", ALL_SCOPES))
        org = (await client.post(ORGS, json={"name": "Acme"}, headers=alice)).json()["id"]
        users = f"{ORGS}/{org}/users"
        user_count = "SELECT user_count FROM orgs WHERE name = 'Acme'"
        first = await client.post(users, json={"email": "a@example.org"}, headers=alice)
        assert first.status_code == 201
        duplicate = await client.post(users, json={"email": "A@example.org"}, headers=alice)
        assert duplicate.status_code == 409 and "already exists" in duplicate.json()["detail"]
        assert await count(app, user_count) == 1
        assert (await client.post(users, json={"email": "b@example.org"}, headers=alice)).status_code == 201
        assert_quota_exceeded(
            await client.post(users, json={"email": "c@example.org"}, headers=alice), "QUOTA_USERS_PER_ORG"
        )
        duplicate = await client.post(users, json={"email": "b@example.org"}, headers=alice)
        assert duplicate.status_code == 409 and "already exists" in duplicate.json()["detail"]
        assert (await client.delete(f"{users}/{first.json()['id']}", headers=alice)).status_code == 204
        assert await count(app, user_count) == 1
        assert (await client.post(users, json={"email": "c@example.org"}, headers=alice)).status_code == 201
        assert await count(app, user_count) == 2 == await count(app, "SELECT count(*) FROM org_users")

        # The check reads the count, not the users: an org whose count says empty takes two more.
        # (Only a test writes the count by hand; the database's triggers keep it.)
        async with app.state.runtime.engine.begin() as connection:
            await connection.execute(text("UPDATE orgs SET user_count = 0 WHERE name = 'Acme'"))
        for email in ("d@example.org", "e@example.org"):
            assert (await client.post(users, json={"email": email}, headers=alice)).status_code == 201
        assert_quota_exceeded(
            await client.post(users, json={"email": "f@example.org"}, headers=alice), "QUOTA_USERS_PER_ORG"
        )
