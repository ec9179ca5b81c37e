"""Layer 7, authorization: every route of the example API against every relation, a missing
scope, a second org, forbidden versus nonexistent objects, revocation, and the grant CLI."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

import anyio
import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import text

from {{ cookiecutter.package_name }} import cli
from {{ cookiecutter.package_name }}.app import create_app
from {{ cookiecutter.package_name }}.domain import ORG
from {{ cookiecutter.package_name }}.models import Org, OrgUser
from {{ cookiecutter.package_name }}.runtime import Runtime
from {{ cookiecutter.package_name }}.security.authz import _holds_query
from {{ cookiecutter.package_name }}.security.grants import set_relation
from {{ cookiecutter.package_name }}.tables import Permission, Relation

from .conftest import ALL_SCOPES, AUDIENCE, DATABASE, ISSUER, TokenFactory, bearer, principal, running


@dataclass(frozen=True)
class Route:
    """One row of the SPEC §3 table: the scope a token needs and the relation the caller needs on
    the org (None: the route acts on no existing object)."""

    method: str
    path: str
    scope: str
    needs: Relation | None
    success: int
    body: dict[str, Any] | None = None

    def __str__(self) -> str:
        return f"{self.method} {self.path.removeprefix('/api/v1')}"

    def url(self, world: World, org: str | None = None) -> str:
        return self.path.format(org=org or world.org_a, user=world.user_a)


ROUTES = [
    Route("POST", "/api/v1/orgs", "orgs:write", None, 201, {"name": "New"}),
    Route("GET", "/api/v1/orgs/{org}", "orgs:read", Relation.viewer, 200),
    Route("PUT", "/api/v1/orgs/{org}/grants/erin", "orgs:write", Relation.owner, 201, {"relation": "viewer"}),
    Route("DELETE", "/api/v1/orgs/{org}/grants/dave", "orgs:write", Relation.owner, 204),
    Route("POST", "/api/v1/orgs/{org}/users", "users:write", Relation.admin, 201, {"email": "new@example.org"}),
    Route("GET", "/api/v1/orgs/{org}/users", "users:read", Relation.viewer, 200),
    Route("GET", "/api/v1/orgs/{org}/users/{user}", "users:read", Relation.viewer, 200),
    Route("DELETE", "/api/v1/orgs/{org}/users/{user}", "users:write", Relation.admin, 204),
]
OBJECT_ROUTES = [route for route in ROUTES if route.needs is not None]
RELATIONS: list[Relation | None] = [None, *Relation]


@dataclass
class World:
    """Two orgs with two owners: alice owns A, bob owns B. Each org has one user; dave is a
    viewer of A (the grant the DELETE route removes). Seeded in one transaction: the API that
    would create them is tested in test_orgs_api."""

    client: httpx.AsyncClient
    make_token: TokenFactory
    runtime: Runtime
    org_a: str
    org_b: str
    user_a: str
    user_b: str

    def as_(self, subject: str, scope: str = ALL_SCOPES) -> dict[str, str]:
        return bearer(self.make_token(subject, scope))

    async def call(
        self, route: Route, subject: str, *, org: str | None = None, scope: str = ALL_SCOPES
    ) -> httpx.Response:
        return await self.client.request(
            route.method, route.url(self, org), json=route.body, headers=self.as_(subject, scope)
        )

    async def grant(self, subject: str, relation: Relation | None) -> None:
        """Give `subject` a relation on org A directly in the database (test setup)."""
        if relation is not None:
            async with self.runtime.sessionmaker() as session:
                await set_relation(
                    session, ORG, self.org_a, principal(subject), relation, granted_by="test", acting_owner=None
                )
                await session.commit()


@pytest.fixture
async def world(client: httpx.AsyncClient, make_token: TokenFactory, app: FastAPI) -> World:
    org_a, org_b = Org(name="A", created_by="alice"), Org(name="B", created_by="bob")
    async with app.state.runtime.sessionmaker() as session:
        session.add_all([org_a, org_b])
        await session.flush()
        user_a = OrgUser(org_id=org_a.id, email="a@example.org", role="viewer", metadata_={})
        user_b = OrgUser(org_id=org_b.id, email="b@example.org", role="viewer", metadata_={})
        session.add_all([user_a, user_b])
        for subject, org, relation in (("alice", org_a, "owner"), ("bob", org_b, "owner"), ("dave", org_a, "viewer")):
            session.add(
                Permission(
                    subject=principal(subject),
                    resource_type=ORG,
                    resource_id=str(org.id),
                    relation=relation,
                    created_by="test",
                )
            )
        await session.commit()
    return World(client, make_token, app.state.runtime, str(org_a.id), str(org_b.id), str(user_a.id), str(user_b.id))


def allowed(route: Route, relation: Relation | None) -> bool:
    if route.needs is None:
        return True
    return relation is not None and relation.rank >= route.needs.rank


@pytest.mark.parametrize("relation", RELATIONS, ids=lambda r: r.value if r else "no-relation")
@pytest.mark.parametrize("route", ROUTES, ids=str)
async def test_each_relation_is_allowed_or_refused_exactly_per_the_spec_table(
    world: World, route: Route, relation: Relation | None
) -> None:
    await world.grant("carol", relation)
    response = await world.call(route, "carol")
    expected = route.success if allowed(route, relation) else 403
    assert response.status_code == expected, response.text
    if expected == 403:
        assert response.headers["content-type"] == "application/problem+json"
        assert response.json()["detail"] == "You are not allowed to do this."
    if route.needs is not None:
        # A relation on org A gives nothing on org B.
        assert (await world.call(route, "carol", org=world.org_b)).status_code == 403


@pytest.mark.parametrize("route", ROUTES, ids=str)
async def test_a_token_missing_the_route_scope_is_refused_with_403_even_for_an_owner(
    world: World, route: Route
) -> None:
    other_scopes = " ".join(scope for scope in ALL_SCOPES.split() if scope != route.scope)
    response = await world.call(route, "alice", scope=other_scopes)
    assert response.status_code == 403
    # The refusal changed nothing: the same call with the scope still succeeds (the user is still
    # there to delete, the email and the grant are still free).
    assert (await world.call(route, "alice")).status_code == route.success


def canonical(response: httpx.Response) -> tuple[int, list[tuple[str, str]], bytes]:
    """The response as a client sees it, minus the trace id and the rate-limit counters."""
    trace_id = response.json()["trace_id"]
    headers = sorted(
        (name, value)
        for name, value in response.headers.items()
        if trace_id not in value and not name.startswith("ratelimit")
    )
    return response.status_code, headers, response.content.replace(trace_id.encode(), b"")


@pytest.mark.parametrize("route", OBJECT_ROUTES, ids=str)
async def test_forbidden_and_nonexistent_orgs_answer_byte_identically(world: World, route: Route) -> None:
    forbidden = await world.call(route, "mallory")
    nonexistent = await world.call(route, "mallory", org=str(uuid.uuid4()))
    assert forbidden.status_code == 403
    assert canonical(forbidden) == canonical(nonexistent)


async def test_forbidden_and_nonexistent_org_users_answer_byte_identically(world: World) -> None:
    existing = await world.client.get(f"/api/v1/orgs/{world.org_a}/users/{world.user_a}", headers=world.as_("mallory"))
    missing = await world.client.get(f"/api/v1/orgs/{world.org_a}/users/{uuid.uuid4()}", headers=world.as_("mallory"))
    assert existing.status_code == 403
    assert canonical(existing) == canonical(missing)


async def test_a_user_of_another_org_is_404_through_this_org_and_alike_to_a_missing_user(world: World) -> None:
    await world.grant("carol", Relation.admin)
    carol = world.as_("carol")
    cross = await world.client.get(f"/api/v1/orgs/{world.org_a}/users/{world.user_b}", headers=carol)
    missing = await world.client.get(f"/api/v1/orgs/{world.org_a}/users/{uuid.uuid4()}", headers=carol)
    deleted = await world.client.delete(f"/api/v1/orgs/{world.org_a}/users/{world.user_b}", headers=carol)
    assert (cross.status_code, deleted.status_code) == (404, 404)
    assert canonical(cross) == canonical(missing)
    still_there = await world.client.get(f"/api/v1/orgs/{world.org_b}/users/{world.user_b}", headers=world.as_("bob"))
    assert still_there.status_code == 200


async def test_revoking_a_grant_takes_effect_on_the_next_request(world: World) -> None:
    await world.grant("carol", Relation.viewer)
    org = f"/api/v1/orgs/{world.org_a}"
    assert (await world.client.get(org, headers=world.as_("carol"))).status_code == 200
    revoked = await world.client.delete(f"{org}/grants/carol", headers=world.as_("alice"))
    assert revoked.status_code == 204
    assert (await world.client.get(org, headers=world.as_("carol"))).status_code == 403


async def test_demoting_a_grant_takes_effect_on_the_next_request(world: World) -> None:
    await world.grant("carol", Relation.admin)
    users = f"/api/v1/orgs/{world.org_a}/users"
    first = await world.client.post(users, json={"email": "c1@example.org"}, headers=world.as_("carol"))
    assert first.status_code == 201
    demoted = await world.client.put(
        f"/api/v1/orgs/{world.org_a}/grants/carol", json={"relation": "viewer"}, headers=world.as_("alice")
    )
    assert demoted.status_code == 200
    second = await world.client.post(users, json={"email": "c2@example.org"}, headers=world.as_("carol"))
    assert second.status_code == 403
    assert (await world.client.get(users, headers=world.as_("carol"))).status_code == 200


async def test_a_caller_without_permission_learns_nothing_about_validation(world: World) -> None:
    invalid = {"email": "not an email", "role": "root", "is_admin": True}
    users = f"/api/v1/orgs/{world.org_a}/users"
    refused = await world.client.post(users, json=invalid, headers=world.as_("mallory"))
    no_scope = await world.client.post(users, json=invalid, headers=world.as_("alice", "users:read"))
    bad_user_id = await world.client.get(f"{users}/not-a-uuid", headers=world.as_("mallory"))
    assert (refused.status_code, no_scope.status_code, bad_user_id.status_code) == (403, 403, 403)
    assert "errors" not in refused.json()
    # The org id is validated before the object check, which needs it: 400 for everyone, naming no object.
    bad_org = await world.client.get("/api/v1/orgs/not-a-uuid/users", headers=world.as_("mallory"))
    assert bad_org.status_code == 400
    rejected = await world.client.post(users, json=invalid, headers=world.as_("alice"))
    assert rejected.status_code == 400
    assert {tuple(error["loc"]) for error in rejected.json()["errors"]} >= {("body", "email"), ("body", "role")}


async def test_bytes_that_are_not_json_are_refused_before_authorization_and_name_no_object(world: World) -> None:
    org = str(uuid.uuid4())
    response = await world.client.post(
        f"/api/v1/orgs/{org}/users",
        content=b"{not json",
        headers={**world.as_("mallory"), "content-type": "application/json"},
    )
    assert response.status_code == 400
    assert response.json()["type"].endswith(":problem:validation")
    assert org not in response.text


async def test_the_permission_lookup_is_one_search_of_the_unique_index(app: FastAPI) -> None:
    query = _holds_query("org", Relation.viewer).params(subject="alice", resource_id=str(uuid.uuid4()))
    async with app.state.runtime.engine.connect() as connection:
        sql = str(query.compile(connection.engine, compile_kwargs={"literal_binds": True}))
        if DATABASE == "sqlite":
            # SQLite names the index of a UNIQUE constraint itself (sqlite_autoindex_*): find it by its columns.
            indexes = (await connection.execute(text("PRAGMA index_list(permissions)"))).all()
            unique = [
                row[1]
                for row in indexes
                if [c[2] for c in (await connection.execute(text(f"PRAGMA index_info('{row[1]}')"))).all()]
                == ["resource_type", "resource_id", "subject"]
            ]
            assert len(unique) == 1, indexes
            rows = (await connection.execute(text(f"EXPLAIN QUERY PLAN {sql}"))).all()
            plan = " | ".join(str(row[-1]) for row in rows)
            assert f"SEARCH permissions USING INDEX {unique[0]}" in plan, plan
            assert "resource_type=? AND resource_id=? AND subject=?" in plan, plan
        else:
            await connection.execute(text("SET LOCAL enable_seqscan = off"))
            plan = " | ".join(str(row[0]) for row in (await connection.execute(text(f"EXPLAIN {sql}"))).all())
            assert "uq_permissions_resource_subject" in plan, plan
        assert "SCAN" not in plan.upper().replace("INDEX SCAN", "").replace("INDEX ONLY SCAN", ""), plan


# The grant CLI: operators bootstrap an org's first owner (or repair one) without a token.


@pytest.fixture
def cli_env(app: FastAPI, public_pem: str, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = app.state.runtime.settings
    for name, value in {
        "ENVIRONMENT": "test",
        "DATABASE_URL": settings.database_url,
        "JWT_PUBLIC_KEY": public_pem,
        "JWT_ISSUER": ISSUER,
        "JWT_AUDIENCE": AUDIENCE,
    }.items():
        monkeypatch.setenv(name, value)


async def run_cli(*argv: str) -> int:
    """The CLI runs its own event loop, as it does from a shell."""
    return await anyio.to_thread.run_sync(cli.main, list(argv))


@pytest.mark.usefixtures("cli_env")
async def test_cli_grant_and_revoke_take_effect_on_the_next_request(
    world: World, capsys: pytest.CaptureFixture[str]
) -> None:
    org = f"/api/v1/orgs/{world.org_a}"
    assert (await world.client.get(org, headers=world.as_("ops"))).status_code == 403
    assert await run_cli("grant", "--sub", "ops", "--org", world.org_a, "--relation", "owner") == 0
    assert "ops is now owner" in capsys.readouterr().out
    promoted = await world.client.put(f"{org}/grants/erin", json={"relation": "viewer"}, headers=world.as_("ops"))
    assert promoted.status_code == 201
    assert await run_cli("revoke-grant", "--sub", "ops", "--org", world.org_a) == 0
    assert (await world.client.get(org, headers=world.as_("ops"))).status_code == 403


@pytest.mark.usefixtures("cli_env")
async def test_cli_refuses_to_revoke_the_last_owner(world: World, capsys: pytest.CaptureFixture[str]) -> None:
    assert await run_cli("revoke-grant", "--sub", "alice", "--org", world.org_a) == 1
    assert "at least one owner" in capsys.readouterr().err
    assert (await world.client.get(f"/api/v1/orgs/{world.org_a}", headers=world.as_("alice"))).status_code == 200


@pytest.mark.usefixtures("cli_env")
async def test_cli_refuses_unknown_orgs_and_malformed_subjects(
    world: World, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = str(uuid.uuid4())
    assert await run_cli("grant", "--sub", "ops", "--org", missing, "--relation", "owner") == 1
    assert f"no org {missing}" in capsys.readouterr().err
    assert await run_cli("grant", "--sub", "o ps", "--org", world.org_a, "--relation", "owner") == 2
    assert await run_cli("revoke-grant", "--sub", "nobody", "--org", world.org_a) == 1
    assert "holds no grant" in capsys.readouterr().err


# --- Principals are namespaced by credential type and issuer (ASVS V10.3.3) ---------------------

OTHER_ISSUER = "https://other-issuer.test"


@pytest.mark.parametrize(
    "name",
    ["apikey:0123456789abcdef", "webhook:acme", "spiffe://example.org/ns/prod/sa/billing", "CN=billing,O=Example"],
)
async def test_a_token_whose_sub_names_another_credential_types_principal_gets_none_of_its_grants(
    world: World, name: str
) -> None:
    """An API key, a webhook partner and a workload are principals of their own types: a token
    whose `sub` spells one of their ids is still a token of JWT_ISSUER, and holds none of theirs."""
    async with world.runtime.sessionmaker() as session:
        await set_relation(session, ORG, world.org_a, name, Relation.owner, granted_by="test", acting_owner=None)
        await session.commit()
    assert (await world.client.get(f"/api/v1/orgs/{world.org_a}", headers=world.as_(name))).status_code == 403


async def test_a_grant_to_one_issuers_sub_is_not_honoured_for_another_issuers_same_sub(
    world: World, settings_for: Any, make_token: TokenFactory
) -> None:
    """Changing JWT_ISSUER hands nothing over: alice of the new issuer is not alice of the old one."""
    org = f"/api/v1/orgs/{world.org_a}"
    assert (await world.client.get(org, headers=world.as_("alice"))).status_code == 200
    other = create_app(settings_for(jwt_issuer=OTHER_ISSUER))
    async with running(other, reset=False) as http:
        new_alice = bearer(make_token("alice", ALL_SCOPES, iss=OTHER_ISSUER))
        assert (await http.get(org, headers=new_alice)).status_code == 403


@pytest.mark.usefixtures("cli_env")
async def test_grants_move_issuer_gives_the_old_issuers_grants_to_the_new_issuers_subjects(
    world: World, settings_for: Any, make_token: TokenFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    org = f"/api/v1/orgs/{world.org_a}"
    async with world.runtime.sessionmaker() as session:  # another type's grant: not moved
        key = "apikey:0123456789abcdef"
        await set_relation(session, ORG, world.org_a, key, Relation.viewer, granted_by="t", acting_owner=None)
        await session.commit()
    assert await run_cli("grants", "move-issuer", "--from", ISSUER, "--to", OTHER_ISSUER) == 0
    assert "moved 3 grant(s)" in capsys.readouterr().out  # alice's, bob's and dave's
    assert (await world.client.get(org, headers=world.as_("alice"))).status_code == 403  # the old issuer's alice
    other = create_app(settings_for(jwt_issuer=OTHER_ISSUER))
    async with running(other, reset=False) as http:
        new_alice = bearer(make_token("alice", ALL_SCOPES, iss=OTHER_ISSUER))
        assert (await http.get(org, headers=new_alice)).status_code == 200
    async with world.runtime.sessionmaker() as session:
        subjects = set((await session.execute(text("SELECT subject FROM permissions"))).scalars())
    assert subjects == {principal(s, OTHER_ISSUER) for s in ("alice", "bob", "dave")} | {"apikey:0123456789abcdef"}


@pytest.mark.usefixtures("cli_env")
async def test_grants_move_issuer_refuses_when_a_subject_holds_grants_under_both(
    world: World, capsys: pytest.CaptureFixture[str]
) -> None:
    async with world.runtime.sessionmaker() as session:
        new_alice = principal("alice", OTHER_ISSUER)
        await set_relation(session, ORG, world.org_a, new_alice, Relation.viewer, granted_by="t", acting_owner=None)
        await session.commit()
    assert await run_cli("grants", "move-issuer", "--from", ISSUER, "--to", OTHER_ISSUER) == 1
    assert "1 grant(s)" in capsys.readouterr().err
    async with world.runtime.sessionmaker() as session:
        query = text("SELECT count(*) FROM permissions WHERE subject = :s")
        moved = await session.scalar(query, {"s": principal("bob")})
    assert moved == 1  # nothing was moved


@pytest.mark.usefixtures("cli_env")
async def test_cli_grant_names_the_configured_issuers_sub_or_a_principal_id(
    world: World, capsys: pytest.CaptureFixture[str]
) -> None:
    assert await run_cli("grant", "--sub", "ops", "--org", world.org_a, "--relation", "viewer") == 0
    assert await run_cli("grant", "--sub", "apikey:0123456789abcdef", "--org", world.org_a, "--relation", "viewer") == 0
    async with world.runtime.sessionmaker() as session:
        subjects = set((await session.execute(text("SELECT subject FROM permissions"))).scalars())
    assert {principal("ops"), "apikey:0123456789abcdef"} <= subjects
    assert "ops" not in subjects
