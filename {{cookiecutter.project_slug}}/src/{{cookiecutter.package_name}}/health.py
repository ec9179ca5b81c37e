"""Health probes: liveness does no I/O; readiness checks every dependency and the pipeline itself.

Readiness reports only `ok`, `fail` or `not_configured` per check, never a connection string or an
exception text. Its answer is cached for a second and computed single-flight: any number of
concurrent probes share one run of the checks, so they cost at most one check per dependency per
second and cannot hammer (or exhaust the pool of) the dependencies.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sqlalchemy import text

from .db import serving_role_problems
from .resources import runtime_of
from .runtime import Runtime
from .security.stack import SecuredApp, expected_layers, installed_layers
from .store.core import RemoteStore

router = APIRouter(prefix="/health", tags=["health"])
logger = logging.getLogger(__name__)

CheckStatus = Literal["ok", "fail", "not_configured"]
CHECK_TIMEOUT_SECONDS = 1.0
CACHE_SECONDS = 1.0


class Live(BaseModel):
    status: Literal["ok"] = "ok"


class Ready(BaseModel):
    status: Literal["ok", "fail"]
    checks: dict[str, CheckStatus]


@router.get("/live")
async def live() -> Live:
    return Live()


class Readiness:
    """The last readiness answer, and the run of the checks in flight that every probe awaits."""

    def __init__(self) -> None:
        self.answer: Ready | None = None
        self.checked_at = -float("inf")
        self.running: asyncio.Task[Ready] | None = None

    async def get(self, app: SecuredApp, runtime: Runtime) -> Ready:
        if self.answer is not None and time.monotonic() - self.checked_at <= CACHE_SECONDS:
            return self.answer
        if self.running is None:
            self.running = asyncio.ensure_future(self._check(app, runtime))
        # shield: a probe that disconnects does not cancel the run the others are waiting for
        return await asyncio.shield(self.running)

    async def _check(self, app: SecuredApp, runtime: Runtime) -> Ready:
        try:
            self.answer = await _readiness(app, runtime)
            self.checked_at = time.monotonic()
            return self.answer
        finally:
            self.running = None


# Shutting down (shutdown.py): out of the load balancer at once, whatever the cache holds.
DRAINING = Ready(status="fail", checks={"shutdown": "fail"})


@router.get("/ready", response_model=Ready, responses={503: {"model": Ready, "description": "Not ready"}})
async def ready(request: Request) -> JSONResponse:
    runtime = runtime_of(request)
    if runtime.draining:
        return JSONResponse(DRAINING.model_dump(), status_code=503)
    result = await readiness_of(request.app).get(request.app, runtime)
    return JSONResponse(result.model_dump(), status_code=200 if result.status == "ok" else 503)


def readiness_of(app: Any) -> Readiness:
    """The application's readiness, shared by the probes and the metrics listener (metrics.py)."""
    readiness: Readiness | None = getattr(app.state, "readiness", None)
    if readiness is None:
        readiness = app.state.readiness = Readiness()
    return readiness


async def _readiness(app: SecuredApp, runtime: Runtime) -> Ready:
    checks: dict[str, Callable[[], Awaitable[CheckStatus]]] = {
        "database": lambda: _database(runtime),
        "migrations": lambda: _migrations(runtime),
        "redis": lambda: _redis(runtime),
        "pipeline": lambda: _pipeline(app),
        "keys": lambda: _keys(runtime),
        "authorizer": lambda: _authorizer(runtime),
    }
    results = await asyncio.gather(*(_bounded(name, check) for name, check in checks.items()))
    statuses = dict(zip(checks, results, strict=True))
    overall: Literal["ok", "fail"] = "fail" if "fail" in statuses.values() else "ok"
    return Ready(status=overall, checks=statuses)


async def _bounded(name: str, check: Callable[[], Awaitable[CheckStatus]]) -> CheckStatus:
    try:
        async with asyncio.timeout(CHECK_TIMEOUT_SECONDS):
            return await check()
    except Exception as exc:
        logger.warning(
            "readiness check failed",
            extra={"event": "dependency_unavailable", "check": name, "error": type(exc).__name__},
        )
        return "fail"


async def _database(runtime: Runtime) -> CheckStatus:
    if runtime.role_unchecked:
        # Production refuses to start as a role that must not serve; one the database was down
        # for at start is checked here, and a refused one keeps the replica out of service.
        problems = await serving_role_problems(runtime.engine)
        if problems is None:
            return "fail"
        if problems:
            logger.error("; ".join(problems), extra={"event": "database_role_refused"})
            return "fail"
        runtime.role_unchecked = False
    async with runtime.engine.connect() as connection:
        await connection.execute(text("SELECT 1"))
    return "ok"


async def _migrations(runtime: Runtime) -> CheckStatus:
    async with runtime.engine.connect() as connection:
        current = set((await connection.execute(text("SELECT version_num FROM alembic_version"))).scalars())
    return "ok" if current == runtime.migration_heads else "fail"


async def _redis(runtime: Runtime) -> CheckStatus:
    if not isinstance(runtime.store, RemoteStore):
        return "not_configured"
    await runtime.store.ping()  # one node; Sentinel: the current primary; Cluster: every primary
    return "ok"


async def _pipeline(app: SecuredApp) -> CheckStatus:
    installed, expected = installed_layers(app), expected_layers(app)
    return "ok" if installed[: len(expected)] == expected else "fail"


async def _keys(runtime: Runtime) -> CheckStatus:
    return "ok" if runtime.verifier.has_keys() else "fail"


async def _authorizer(runtime: Runtime) -> CheckStatus:
    """The policy engine (authz_engine=cerbos): not ready while it does not answer, since every
    decision would be a 503."""
    if runtime.authorizer is None:
        return "not_configured"
    return "ok" if await runtime.authorizer.ready() else "fail"
