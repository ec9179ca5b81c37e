"""Deny by default: every route declares its scopes and its object policy, or is on the public
list (health, docs). A route added without one fails this module, wherever it is: the walk
inspects each route's dependency tree for the marks `require_scopes`, `require_relation`,
`read_with_relation` and `no_object_policy` leave, and refuses any route outside /api/. The same
walk runs when the service starts: it refuses to start with such a route, whatever added it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from fastapi import APIRouter, Depends, FastAPI
from starlette.routing import Mount

from {{ cookiecutter.package_name }}.app import create_app
from {{ cookiecutter.package_name }}.config import Settings
from {{ cookiecutter.package_name }}.security.authz import RULE_ATTRIBUTE, ObjectRule, no_object_policy, require_scopes
from {{ cookiecutter.package_name }}.security.route_policy import (
    DOCS_ROUTES,
    OUTSIDE_API,
    PUBLIC_ROUTES,
    UnguardedRoutes,
    _flat_routes,
    route_policies,
)
from {{ cookiecutter.package_name }}.tables import Relation

from .conftest import TokenFactory, bearer, running, service_environment
from .servers import LOOPBACK, free_port

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
    assert served & PUBLIC_ROUTES == {"/health/live", "/health/ready"} | (DOCS_ROUTES if app.openapi_url else set())
    assert {
        "/health/live",
        "/health/ready",
        "/openapi.json",
        "/docs",
        "/docs/swagger-initializer.js",
        "/docs/swagger-ui-bundle.js",
        "/docs/swagger-ui.css",
        "/docs/favicon-32x32.png",
    } == PUBLIC_ROUTES
    assert all(policy.route.split(" ")[-1] not in PUBLIC_ROUTES for policy in route_policies(app.routes))


def test_a_scope_check_needs_at_least_one_scope() -> None:
    with pytest.raises(ValueError, match="at least one scope"):
        require_scopes()


# --- deny by default at run time ----------------------------------------------------------------


async def test_a_route_added_after_the_app_was_built_makes_its_startup_fail(settings: Settings) -> None:
    app = create_app(settings)
    app.get("/internal/export")(lambda: {})  # after the factory's own walk: the lifespan's walk finds it
    with pytest.raises(UnguardedRoutes) as refused:
        async with running(app):
            pytest.fail("the service started with a route without a policy")
    message = str(refused.value)
    assert f"GET /internal/export: {OUTSIDE_API}" in message
    assert "require_scopes" in message and "PUBLIC_ROUTES" in message
    assert app.state.startup_refused == message


async def test_a_router_without_policies_included_before_the_factory_makes_it_refuse(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    from {{ cookiecutter.package_name }} import api

    reports = APIRouter(prefix="/api/v1")
    reports.get("/reports/{org_id}")(lambda org_id: {})
    router = APIRouter()
    router.include_router(api.router)
    router.include_router(reports)
    monkeypatch.setattr(api, "router", router)
    with pytest.raises(UnguardedRoutes, match=r"GET /api/v1/reports/\{org_id\}: declares no scopes"):
        create_app(settings)


async def test_a_route_on_the_public_list_starts(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    from {{ cookiecutter.package_name }}.security import route_policy

    monkeypatch.setattr(route_policy, "PUBLIC_ROUTES", PUBLIC_ROUTES | {"/status"})
    app = create_app(settings)
    app.get("/status")(lambda: {"ok": True})
    async with running(app) as http:
        assert (await http.get("/status")).status_code == 200


# The service's real entry points, in their own process: a route without a policy present when the
# factory runs (a router the owner included), or added after it (as a plugin or an option's code
# could), is refused with exit status 1 and a message naming the route and what to do.
BEFORE_THE_FACTORY = """
from {{ cookiecutter.package_name }} import api
api.router.get("/reports")(lambda: [])
"""
AFTER_THE_FACTORY = """
from {{ cookiecutter.package_name }} import app as factory
built = factory.create_app
def create_app(*args, **kwargs):
    app = built(*args, **kwargs)
    app.get("/internal/export")(lambda: [])
    return app
factory.create_app = create_app
"""


def run_cli(env: dict[str, str], setup: str, *command: str) -> subprocess.CompletedProcess[str]:
    script = f"{setup}\nimport sys\nfrom {{ cookiecutter.package_name }}.cli import main\nsys.exit(main({list(command)!r}))\n"
    inherited = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run(
        [sys.executable, "-c", script],
        env={**inherited, **env},
        cwd=Path(__file__).parent,  # no .env here
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture
def service_env(migrated_database: str, redis_url: str, public_pem: str) -> dict[str, str]:
    return service_environment(migrated_database, redis_url, public_pem)


@pytest.mark.parametrize(
    ("setup", "route"),
    [(BEFORE_THE_FACTORY, "GET /api/v1/reports: declares no scopes"), (AFTER_THE_FACTORY, "GET /internal/export")],
    ids=["before-the-factory", "after-the-factory"],
)
def test_serve_refuses_to_start_with_a_route_without_a_policy(
    service_env: dict[str, str], setup: str, route: str
) -> None:
    served = run_cli(service_env, setup, "serve", "--host", LOOPBACK, "--port", str(free_port()))
    assert served.returncode == 1, served.stdout + served.stderr
    assert "refusing to start" in served.stderr and route in served.stderr
    assert "PUBLIC_ROUTES" in served.stderr
    assert "Uvicorn running" not in served.stdout + served.stderr


def test_check_config_refuses_a_route_without_a_policy(service_env: dict[str, str]) -> None:
    assert run_cli(service_env, "", "check-config").returncode == 0
    checked = run_cli(service_env, BEFORE_THE_FACTORY, "check-config")
    assert checked.returncode == 1, checked.stdout + checked.stderr
    assert "refusing to start" in checked.stderr and "GET /api/v1/reports" in checked.stderr


# --- /api itself: inside for the walk and for layer 4 alike ---------------------------------------


async def test_api_itself_is_refused_401_without_a_credential(client: httpx.AsyncClient) -> None:
    response = await client.get("/api")
    assert response.status_code == 401
    assert response.headers["content-type"] == "application/problem+json"
    assert "www-authenticate" in response.headers


async def test_a_route_at_api_itself_is_judged_by_the_walk_and_authenticated_by_layer_4(
    settings: Settings, make_token: TokenFactory
) -> None:
    bare = create_app(settings)
    bare.get("/api")(lambda: {})
    assert unguarded(bare) == [
        "GET /api: declares no scopes (require_scopes); "
        "declares no object policy (require_relation, read_with_relation or no_object_policy)"
    ]
    app = create_app(settings)
    app.get("/api", dependencies=[no_object_policy(scopes=["orgs:read"])])(lambda: {"index": True})
    assert unguarded(app) == []
    async with running(app) as http:
        anonymous = await http.get("/api")
        allowed = await http.get("/api", headers=bearer(make_token("alice", "orgs:read")))
    assert anonymous.status_code == 401
    assert (allowed.status_code, allowed.json()) == (200, {"index": True})
