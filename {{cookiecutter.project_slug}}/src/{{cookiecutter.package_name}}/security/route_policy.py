"""The route-policy walk, deny by default: every route declares scopes and an object policy
(`authz.py`), or is on the public list below; the step-up a route declares (`authz.StepUp`) is
reported with its policy. The application refuses to start with a route that is
neither (`refuse_unguarded_routes`, run by the app factory and again by the lifespan on the final
route table, so a router included later or a route behind a setting is judged too), and the test
suite fails on one.

A route must also be under /api/ (or be `/api` itself): layer 4 authenticates every request there
and nowhere else (`principal.under_api`, the one definition both use), so a route elsewhere would
serve anyone whatever it declares."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import fastapi.routing
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute
from starlette.routing import BaseRoute

from ..config import ConfigError
from .authz import RULE_ATTRIBUTE, ObjectRule, ScopeRule, StepUp
from .principal import under_api

# Recent FastAPI keeps included routers nested in app.routes and walks them with this; older
# versions flatten app.routes themselves.
_iter_route_contexts = getattr(fastapi.routing, "iter_route_contexts", None)

# The routes anyone may call: the health probes (a load balancer and Kubernetes ask them without a
# credential) and the API documentation (DOCS_ENABLED; off in production). Nothing else: a route
# of your own that must be public belongs here, with the reason, in your copy (README
# "Authorization"). The credential options' routes are under /api/ and declare policies too.
# The API page and the files it loads (docs_page.py), all from the service itself.
DOCS_ROUTES = frozenset(
    {
        "/openapi.json",
        "/docs",
        "/docs/swagger-initializer.js",
        "/docs/swagger-ui-bundle.js",
        "/docs/swagger-ui.css",
        "/docs/favicon-32x32.png",
    }
)
PUBLIC_ROUTES = frozenset({"/health/live", "/health/ready"}) | DOCS_ROUTES
OUTSIDE_API = "is outside /api/, where no caller is authenticated, and not on the public list (PUBLIC_ROUTES)"


@dataclass(frozen=True, slots=True)
class RoutePolicy:
    route: str
    scopes: frozenset[str]
    object_rule: ObjectRule | None
    problems: tuple[str, ...]
    # How the user must have authenticated (a step-up, RFC 9470), when the route declares one.
    step_up: StepUp | None = None


def _tree(dependant: Dependant) -> Iterator[Dependant]:
    yield dependant
    for sub in dependant.dependencies:
        yield from _tree(sub)


def _rules(dependant: Dependant) -> Iterator[tuple[Dependant, ScopeRule | ObjectRule | StepUp]]:
    for node in _tree(dependant):
        rule = getattr(node.call, RULE_ATTRIBUTE, None)
        if isinstance(rule, ScopeRule | ObjectRule | StepUp):
            yield node, rule


def route_policy(name: str, dependant: Dependant) -> RoutePolicy:
    """The policy a route declares in its dependency tree, with what is wrong with it."""
    rules = list(_rules(dependant))
    scopes: set[str] = set()
    for _, rule in rules:
        if isinstance(rule, ScopeRule):
            scopes |= rule.scopes
    objects = [(node, rule) for node, rule in rules if isinstance(rule, ObjectRule)]
    problems = []
    if not scopes:
        problems.append("declares no scopes (require_scopes)")
    if not objects:
        problems.append("declares no object policy (require_relation, read_with_relation or no_object_policy)")
    elif len({rule for _, rule in objects}) > 1:
        problems.append("declares more than one object policy")
    for node, _ in objects:
        if not any(isinstance(rule, ScopeRule) for _, rule in _rules(node)):
            problems.append("object check does not depend on a scope check")
    step_ups = {rule for _, rule in rules if isinstance(rule, StepUp)}
    if len(step_ups) > 1:
        problems.append("declares more than one step-up (StepUp)")
    step_up = next(iter(step_ups)) if len(step_ups) == 1 else None
    return RoutePolicy(name, frozenset(scopes), objects[0][1] if objects else None, tuple(problems), step_up)


def route_policies(routes: Sequence[BaseRoute], *, public: frozenset[str] | None = None) -> list[RoutePolicy]:
    """The policy of every route but the public ones, included routers flattened (with the
    dependencies they add). A route outside /api/, or one under it that cannot declare a policy
    (a mount, a plain route), is a problem."""
    public = PUBLIC_ROUTES if public is None else public  # read at call time: the list as it is now
    policies = []
    for path, methods, route, dependant in _flat_routes(routes):
        if path in public:
            continue
        name = f"{','.join(sorted(methods))} {path}" if methods else path
        if not under_api(path):
            policies.append(RoutePolicy(name, frozenset(), None, (OUTSIDE_API,)))
        elif isinstance(route, APIRoute) and dependant is not None:
            policies.append(route_policy(name, dependant))
        else:
            problem = f"{type(route).__name__} cannot declare a policy"
            policies.append(RoutePolicy(path, frozenset(), None, (problem,)))
    return policies


class UnguardedRoutes(ConfigError):
    """A route has no complete authorization policy and is not public: the service does not start."""


def unguarded(routes: Sequence[BaseRoute]) -> list[str]:
    """One line per route whose policy is missing or incomplete (`METHOD /path: what is wrong`)."""
    return [f"{policy.route}: {'; '.join(policy.problems)}" for policy in route_policies(routes) if policy.problems]


def refuse_unguarded_routes(routes: Sequence[BaseRoute]) -> None:
    """Deny by default at run time: raise UnguardedRoutes, naming each route and what to do, when
    any route is neither guarded nor public. Walks the route table once (milliseconds, at start)."""
    problems = unguarded(routes)
    if problems:
        raise UnguardedRoutes(
            f"{len(problems)} route(s) without an authorization policy: {'; '.join(problems)}. "
            "Declare one on each route (require_scopes with require_relation, read_with_relation or "
            'no_object_policy; README "Authorization"), or, for a route anyone may call, put its path '
            "on PUBLIC_ROUTES (security/route_policy.py)"
        )


def _flat_routes(routes: Sequence[BaseRoute]) -> Iterator[tuple[str, set[str], BaseRoute, Dependant | None]]:
    if _iter_route_contexts is None:
        for route in routes:
            yield (
                getattr(route, "path", ""),
                getattr(route, "methods", None) or set(),
                route,
                getattr(route, "dependant", None),
            )
        return
    for context in _iter_route_contexts(routes):
        original = context.original_route
        dependant = context.dependant if isinstance(original, APIRoute) else None
        yield context.path or "", context.methods or set(), original, dependant
