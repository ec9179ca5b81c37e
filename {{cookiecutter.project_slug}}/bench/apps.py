"""Bench-only variants of the real app, served by uvicorn as `bench.apps:create` (a factory).

`BENCH_VARIANT` picks one; every variant is the service's own `create_app()` with its settings from
the environment, changed from the outside (the service's modules are not touched):

- `full`: the app as shipped, plus `/bare`: the service's own `/health/live` handler on a FastAPI
  app with no pipeline at all, the ceiling every other number is compared with.
- `slowapi`, `slowapi:swallow`: the pipeline's RateLimit layers replaced by slowapi's limiter on
  the same Redis, with its default `swallow_errors=False` or with `True`.
- `engine:table`: a service baked with authz_engine=cerbos, deciding layer 7 with the permissions
  table instead of the PDP, the engine it would have had with authz_engine=table: the same GET, the
  one difference the decision.
- `without:<layer>`: the pipeline minus one layer (`without:Authenticate` lets the real layer
  authenticate the first request only and hands its principal to every later one),
  `without:authz-object` skips the permission lookup, `without:all` keeps only what the route
  needs to run.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any

from fastapi import FastAPI
from sqlalchemy import bindparam, literal, select
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from {{ cookiecutter.package_name }} import health
from {{ cookiecutter.package_name }}.app import create_app
from {{ cookiecutter.package_name }}.runtime import Runtime
from {{ cookiecutter.package_name }}.security import authz
from {{ cookiecutter.package_name }}.security.principal import API_PREFIX
from {{ cookiecutter.package_name }}.security.ratelimit import client_address, subject
from {{ cookiecutter.package_name }}.security.stack import SecuredApp

BARE_PATH = "/bare"
AUTHZ_OBJECT = "authz-object"


def layer_name(middleware: Middleware) -> str:
    """`RateLimit:ip` for a layer with a policy, else the class name."""
    cls, _args, kwargs = middleware
    policy = kwargs.get("policy")
    return f"{cls.__name__}:{policy}" if policy else str(cls.__name__)


def layer_names(app: SecuredApp) -> list[str]:
    return [layer_name(middleware) for middleware in app.pipeline]


def create() -> ASGIApp:
    variant = os.environ.get("BENCH_VARIANT", "full")
    app = create_app()
    assert isinstance(app, SecuredApp)
    runtime: Runtime = app.state.runtime
    if variant in ("slowapi", "slowapi:swallow"):
        use_slowapi(app, runtime, swallow_errors=variant == "slowapi:swallow")
    elif variant == "without:all":
        authenticate = app.pipeline[layer_names(app).index("Authenticate")]
        app.pipeline = [Middleware(AuthenticatedOnce, real=authenticate)]
        skip_object_checks(app)
    elif variant == f"without:{AUTHZ_OBJECT}":
        skip_object_checks(app)
    elif variant == "engine:table":
        runtime.authorizer = None  # the PDP's client keeps running, unasked
    elif variant.startswith("without:"):
        remove_layer(app, variant.removeprefix("without:"))
    elif variant != "full":
        raise SystemExit(f"unknown BENCH_VARIANT {variant!r}")
    return with_bare_endpoint(app)


def with_bare_endpoint(app: FastAPI) -> ASGIApp:
    """`/bare` answers from the service's liveness handler on a FastAPI app without the pipeline."""
    bare = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)
    bare.include_router(health.router)
    live_path = f"{health.router.prefix}/live"

    async def dispatch(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == BARE_PATH:
            await bare({**scope, "path": live_path, "raw_path": live_path.encode()}, receive, send)
        else:
            await app(scope, receive, send)

    return dispatch


def remove_layer(app: SecuredApp, name: str) -> None:
    names = layer_names(app)
    if name not in names:
        raise SystemExit(f"no layer {name!r} in the pipeline: {', '.join(names)}")
    index = names.index(name)
    if name == "Authenticate":
        # The routes need a principal: the real layer authenticates once, then steps aside.
        app.pipeline[index] = Middleware(AuthenticatedOnce, real=app.pipeline[index])
    else:
        del app.pipeline[index]


class AuthenticatedOnce:
    """Authentication switched off: the real layer authenticates the first /api/ request, and
    every later one gets the request state it set (the principal) without any checking."""

    def __init__(self, app: ASGIApp, *, real: Middleware) -> None:
        cls, args, kwargs = real
        self.app = app
        self.real = cls(self._remember, *args, **kwargs)
        self.before: dict[str, Any] = {}
        self.added: dict[str, Any] | None = None

    async def _remember(self, scope: Scope, receive: Receive, send: Send) -> None:
        state = scope.get("state", {})
        self.added = {key: value for key, value in state.items() if self.before.get(key) is not value}
        await self.app(scope, receive, send)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(API_PREFIX):
            await self.app(scope, receive, send)
        elif self.added is None:
            self.before = dict(scope.get("state", {}))
            await self.real(scope, receive, send)
        else:
            scope.setdefault("state", {}).update(self.added)
            await self.app(scope, receive, send)


def skip_object_checks(app: FastAPI) -> None:
    """The permission lookup switched off: every object check's statement no longer asks the
    permissions table. `read_with_relation` still reads the object (by its id alone), the plain checks select a
    constant; the dependencies, their scope checks and the round trip to the database stay, so
    what this variant saves is the lookup itself. (A `dependency_overrides` entry would cost more
    than it saves: FastAPI analyses an override's signature on every request.)"""
    if not hasattr(authz, "_read_query") or not hasattr(authz, "_holds_query"):
        raise SystemExit("security.authz has no _read_query/_holds_query; bench/apps.py needs updating")

    def by_id(_resource_type: Any, _relation: Any, columns: Any) -> Any:
        return select(*columns).where(columns[0] == bindparam("object_id", None, type_=columns[0].type))

    def anything(_resource_type: Any, _relation: Any) -> Any:
        return select(literal(1))

    authz._read_query = by_id  # type: ignore[assignment]
    authz._holds_query = anything  # type: ignore[assignment]


def use_slowapi(app: SecuredApp, runtime: Runtime, *, swallow_errors: bool) -> None:
    """slowapi (sync `limits` storage on the same Redis) where the pipeline has its RateLimit layers:
    the same two limits, keyed by the same address and subject, headers on as the pipeline has them."""
    import slowapi.middleware
    from slowapi import Limiter, _rate_limit_exceeded_handler
    from slowapi.errors import RateLimitExceeded
    from slowapi.wrappers import LimitGroup

    settings = runtime.settings

    def by_address(request: Request) -> str:
        return client_address(request.scope) or "unknown"

    def by_subject(request: Request) -> str:
        return subject(request.scope) or ""

    limiter = Limiter(
        key_func=by_address,
        default_limits=[settings.rate_limit_ip],
        storage_uri=settings.redis_url,
        headers_enabled=True,
        swallow_errors=swallow_errors,
    )
    limiter._default_limits.append(
        LimitGroup(settings.rate_limit_subject, by_subject, None, False, None, None, None, 1, False)
    )
    # slowapi's middleware looks for the endpoint in `app.routes` and exempts a request it finds
    # none for. FastAPI's included routers are one lazy entry there, so no /api/ route is ever found
    # and nothing is limited. Its lookup still runs (and costs); only an /api/ miss is filled in.
    find_route_handler = slowapi.middleware._find_route_handler

    def api_endpoint() -> None: ...

    def find_with_included_routers(routes: Iterable[Any], scope: Scope) -> Callable[..., Any] | None:
        found = find_route_handler(routes, scope)
        return found or (api_endpoint if scope["path"].startswith(API_PREFIX) else None)

    slowapi.middleware._find_route_handler = find_with_included_routers
    app.pipeline = [middleware for middleware in app.pipeline if middleware.cls.__name__ != "RateLimit"]  # type: ignore[attr-defined]
    app.state.limiter = limiter
    app.add_middleware(slowapi.middleware.SlowAPIASGIMiddleware)
    handler: Callable[..., Any] = _rate_limit_exceeded_handler
    app.add_exception_handler(RateLimitExceeded, handler)
