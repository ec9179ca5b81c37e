"""Deny by default: every route declares its scopes and its object policy, or is on the public
list (health, docs). A route added without one fails this module, wherever it is: the walk
inspects each route's dependency tree for the marks `require_scopes`, `require_relation`,
`read_with_relation` and `no_object_policy` leave, and refuses any route outside /api/."""

from __future__ import annotations

import pytest
from fastapi import APIRouter, Depends, FastAPI
from starlette.routing import Mount

from {{ cookiecutter.package_name }}.app import create_app
from {{ cookiecutter.package_name }}.config import Settings
from {{ cookiecutter.package_name }}.security.authz import RULE_ATTRIBUTE, ObjectRule, no_object_policy, require_scopes
from {{ cookiecutter.package_name }}.security.route_policy import OUTSIDE_API, PUBLIC_ROUTES, _flat_routes, route_policies
from {{ cookiecutter.package_name }}.tables import Relation

NO_OBJECT = ObjectRule(None, None)

# SPEC §3: the example API's policy, row by row.
SPEC_TABLE = {
    "POST /api/v1/orgs": ({"orgs:write"}, NO_OBJECT),
    "GET /api/v1/orgs/{org_id}": ({"orgs:read"}, ObjectRule("org", Relation.viewer)),
    "PUT /api/v1/orgs/{org_id}/grants/{subject}": ({"orgs:write"}, ObjectRule("org", Relation.owner)),
    "DELETE /api/v1/orgs/{org_id}/grants/{subject}": ({"orgs:write"}, ObjectRule("org", Relation.owner)),
    "POST /api/v1/orgs/{org_id}/users": ({"users:write"}, ObjectRule("org", Relation.admin)),
    "GET /api/v1/orgs/{org_id}/users": ({"users:read"}, ObjectRule("org", Relation.viewer)),
    "GET /api/v1/orgs/{org_id}/users/{user_id}": ({"users:read"}, ObjectRule("org", Relation.viewer)),
    "DELETE /api/v1/orgs/{org_id}/users/{user_id}": ({"users:write"}, ObjectRule("org", Relation.admin)),
}


def unguarded(app: FastAPI) -> list[str]:
    """One line per route whose policy is missing or incomplete."""
    return [f"{policy.route}: {'; '.join(policy.problems)}" for policy in route_policies(app.routes) if policy.problems]


def test_every_api_route_declares_scopes_and_an_object_policy(app: FastAPI) -> None:
    assert len(route_policies(app.routes)) >= len(SPEC_TABLE)
    assert unguarded(app) == []


def test_the_example_routes_declare_exactly_the_policy_of_the_spec_table(app: FastAPI) -> None:
    declared = {policy.route: (set(policy.scopes), policy.object_rule) for policy in route_policies(app.routes)}
    assert {route: declared.get(route) for route in SPEC_TABLE} == SPEC_TABLE


def test_a_route_added_without_a_policy_fails_the_walk(settings: Settings) -> None:
    app = create_app(settings)

    @app.get("/api/v1/reports/{org_id}")
    async def report(org_id: str) -> dict[str, str]:
        return {"org": org_id}

    assert unguarded(app) == [
        "GET /api/v1/reports/{org_id}: declares no scopes (require_scopes); "
        "declares no object policy (require_relation, read_with_relation or no_object_policy)"
    ]


def test_a_route_without_a_policy_in_an_included_router_fails_the_walk(settings: Settings) -> None:
    app = create_app(settings)
    router = APIRouter(prefix="/api/v2")

    @router.delete("/orgs/{org_id}")
    async def delete_org(org_id: str) -> None:
        return None

    app.include_router(router)
    assert unguarded(app) == [
        "DELETE /api/v2/orgs/{org_id}: declares no scopes (require_scopes); "
        "declares no object policy (require_relation, read_with_relation or no_object_policy)"
    ]


def test_a_route_with_scopes_but_no_object_policy_fails_the_walk(settings: Settings) -> None:
    app = create_app(settings)
    app.get("/api/v1/reports", dependencies=[require_scopes("orgs:read")])(lambda: {})
    assert unguarded(app) == [
        "GET /api/v1/reports: declares no object policy (require_relation, read_with_relation or no_object_policy)"
    ]


def test_an_object_check_not_chained_after_the_scope_check_fails_the_walk(settings: Settings) -> None:
    """A scope check next to the object check, rather than inside it, leaves the order to chance."""
    app = create_app(settings)

    async def org_check(org_id: str) -> str:
        return org_id

    setattr(org_check, RULE_ATTRIBUTE, ObjectRule("org", Relation.viewer))  # an object check, but not chained
    app.get("/api/v1/reports/{org_id}", dependencies=[require_scopes("orgs:read"), Depends(org_check)])(lambda: {})
    assert unguarded(app) == ["GET /api/v1/reports/{org_id}: object check does not depend on a scope check"]


def test_an_explicit_no_object_marker_with_scopes_passes_the_walk(settings: Settings) -> None:
    app = create_app(settings)
    router = APIRouter(prefix="/api/v1")
    router.get("/announcements", dependencies=[no_object_policy(scopes=["orgs:read"])])(lambda: [])
    app.include_router(router)
    assert unguarded(app) == []


def test_a_mounted_app_under_api_cannot_declare_a_policy_and_fails_the_walk(settings: Settings) -> None:
    app = create_app(settings)
    app.router.routes.append(Mount("/api/v2", app=FastAPI()))
    assert unguarded(app) == ["/api/v2: Mount cannot declare a policy"]


def test_a_route_outside_api_fails_the_walk_even_with_a_policy(settings: Settings) -> None:
    """Layer 4 authenticates /api/ only: a route elsewhere would be served to anyone (its policy
    could never find a principal)."""
    app = create_app(settings)
    app.get("/internal/projects")(lambda: [])
    app.get("/internal/reports", dependencies=[no_object_policy(scopes=["orgs:read"])])(lambda: [])
    assert unguarded(app) == [f"GET /internal/projects: {OUTSIDE_API}", f"GET /internal/reports: {OUTSIDE_API}"]


def test_only_the_health_probes_and_the_docs_are_public(app: FastAPI) -> None:
    served = {path for path, _methods, _route, _dependant in _flat_routes(app.routes)}
    assert served & PUBLIC_ROUTES == {"/health/live", "/health/ready"} | (
        {"/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"} if app.docs_url else set()
    )
    assert {
        "/health/live",
        "/health/ready",
        "/openapi.json",
        "/docs",
        "/docs/oauth2-redirect",
        "/redoc",
    } == PUBLIC_ROUTES
    assert all(policy.route.split(" ")[-1] not in PUBLIC_ROUTES for policy in route_policies(app.routes))


def test_a_scope_check_needs_at_least_one_scope() -> None:
    with pytest.raises(ValueError, match="at least one scope"):
        require_scopes()
