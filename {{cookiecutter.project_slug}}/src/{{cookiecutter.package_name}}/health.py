"""Health probes: liveness does no I/O; readiness checks every dependency and the pipeline itself.

Readiness reports only `ok`, `fail` or `not_configured` per check, never a connection string or an
exception text, and caches its answer for a second so probes cannot hammer the dependencies.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sqlalchemy import text

from .runtime import Runtime
from .security.pipeline import SecuredApp, expected_layers, installed_layers

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


@router.get("/ready", response_model=Ready, responses={503: {"model": Ready, "description": "Not ready"}})
async def ready(request: Request) -> JSONResponse:
    runtime: Runtime = request.app.state.runtime
    now = time.monotonic()
    cached: tuple[float, Ready] | None = getattr(request.app.state, "readiness", None)
    if cached is None or now - cached[0] > CACHE_SECONDS:
        cached = (now, await _readiness(request.app, runtime))
        request.app.state.readiness = cached
    result = cached[1]
    return JSONResponse(result.model_dump(), status_code=200 if result.status == "ok" else 503)


async def _readiness(app: SecuredApp, runtime: Runtime) -> Ready:
    checks: dict[str, Callable[[], Awaitable[CheckStatus]]] = {
        "database": lambda: _database(runtime),
        "migrations": lambda: _migrations(runtime),
        "redis": lambda: _redis(runtime),
        "pipeline": lambda: _pipeline(app),
        "keys": lambda: _keys(runtime),
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
    async with runtime.engine.connect() as connection:
        await connection.execute(text("SELECT 1"))
    return "ok"


async def _migrations(runtime: Runtime) -> CheckStatus:
    async with runtime.engine.connect() as connection:
        current = set((await connection.execute(text("SELECT version_num FROM alembic_version"))).scalars())
    return "ok" if current == runtime.migration_heads else "fail"


async def _redis(runtime: Runtime) -> CheckStatus:
    if runtime.redis is None:
        return "not_configured"
    await runtime.redis.ping()
    return "ok"


async def _pipeline(app: SecuredApp) -> CheckStatus:
    installed, expected = installed_layers(app), expected_layers(app)
    return "ok" if installed[: len(expected)] == expected else "fail"


async def _keys(runtime: Runtime) -> CheckStatus:
    return "ok" if runtime.verifier.has_keys() else "fail"
