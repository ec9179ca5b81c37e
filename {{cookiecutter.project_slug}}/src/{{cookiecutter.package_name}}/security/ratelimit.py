"""Layers 3 and 5, rate limits: per client address before authentication, per subject after it,
and per route next to the route. Built on `limits.aio` (the engine slowapi wraps) so Redis is
never called synchronously on the event loop; see the README's rate-limit section."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastapi import Depends, Request
from limits import RateLimitItem, parse
from limits.aio.storage import MemoryStorage, RedisStorage, Storage
from limits.aio.strategies import FixedWindowRateLimiter
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..config import Settings
from .authn import API_PREFIX
from .errors import problem
from .events import security_event

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    limit: int
    remaining: int
    reset_in: int
    window: int
    policy: str

    def headers(self) -> list[tuple[bytes, bytes]]:
        """IETF draft-ietf-httpapi-ratelimit-headers fields."""
        return [
            (b"ratelimit-policy", f'"{self.policy}";q={self.limit};w={self.window}'.encode()),
            (b"ratelimit", f'"{self.policy}";r={self.remaining};t={self.reset_in}'.encode()),
        ]


class StoreUnavailable(Exception):
    """The rate-limit store could not answer in time."""


class RateLimiter:
    """Atomic check-and-count against the shared store (Redis) or, in development, memory."""

    def __init__(self, settings: Settings) -> None:
        self.storage: Storage
        if settings.redis_url:
            self.storage = RedisStorage(
                f"async+{settings.redis_url}",
                implementation="redispy",
                socket_timeout=settings.redis_timeout_seconds,
                socket_connect_timeout=settings.redis_timeout_seconds,
            )
        else:
            self.storage = MemoryStorage()
        self.strategy = FixedWindowRateLimiter(self.storage)
        self.fail_open = settings.rate_limit_failure_mode == "open"
        self._last_warning = 0.0

    async def hit(self, item: RateLimitItem, policy: str, key: str) -> Decision | None:
        """Count one request. None means the store is down and the failure mode is `open`."""
        try:
            allowed = await self.strategy.hit(item, policy, key)
            stats = await self.strategy.get_window_stats(item, policy, key)
        except Exception as exc:  # redis errors, timeouts: any store failure takes the declared path
            if not self.fail_open:
                raise StoreUnavailable from exc
            self._warn_open(policy)
            return None
        window = item.get_expiry()
        reset_in = max(0, math.ceil(stats.reset_time - time.time()))
        return Decision(allowed, item.amount, stats.remaining, reset_in, window, policy)

    def _warn_open(self, policy: str) -> None:
        now = time.monotonic()
        if now - self._last_warning > 60:
            self._last_warning = now
            security_event("rate_limit_store_unavailable", policy=policy, failure_mode="open")


def rejection(decision: Decision, scope: Scope, receive: Receive, send: Send) -> Any:
    security_event("rate_limited", policy=decision.policy)
    response = problem(
        429,
        "Too many requests; retry later.",
        name="rate-limited",
        headers={"Retry-After": str(max(1, decision.reset_in))},
    )
    response.raw_headers.extend(decision.headers())
    return response(scope, receive, send)


def unavailable(scope: Scope, receive: Receive, send: Send) -> Any:
    security_event("dependency_unavailable", dependency="redis", layer="ratelimit")
    return problem(
        503,
        "The rate limit store is unavailable; retry later.",
        name="dependency-unavailable",
        headers={"Retry-After": "1"},
    )(scope, receive, send)


class RateLimit:
    """Limits /api/ traffic by a key taken from the request (address, subject)."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        limiter: RateLimiter,
        item: RateLimitItem,
        policy: str,
        key: Callable[[Scope], str | None],
    ) -> None:
        self.app = app
        self.limiter = limiter
        self.item = item
        self.policy = policy
        self.key = key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        key = self.key(scope) if scope["type"] == "http" and scope["path"].startswith(API_PREFIX) else None
        if key is None:
            await self.app(scope, receive, send)
            return
        try:
            decision = await self.limiter.hit(self.item, self.policy, key)
        except StoreUnavailable:
            await unavailable(scope, receive, send)
            return
        if decision is None:
            await self.app(scope, receive, send)
            return
        if not decision.allowed:
            await rejection(decision, scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *decision.headers()]
            await send(message)

        await self.app(scope, receive, send_with_headers)


def client_address(scope: Scope) -> str | None:
    client = scope.get("client")
    return client[0] if client else "unknown"


def subject(scope: Scope) -> str | None:
    principal = scope.get("state", {}).get("principal")
    return getattr(principal, "subject", None)


def limit(notation: str, policy: str | None = None) -> Any:
    """A per-route limit per subject, declared next to the route: `dependencies=[limit("10/minute")]`."""
    item = parse(notation)

    async def check(request: Request) -> None:
        limiter: RateLimiter = request.app.state.runtime.limiter
        name = policy or f"route:{request.scope['route'].path}"
        key = subject(request.scope) or client_address(request.scope) or "unknown"
        try:
            decision = await limiter.hit(item, name, key)
        except StoreUnavailable:
            raise RouteLimitExceeded(None) from None
        if decision is not None and not decision.allowed:
            raise RouteLimitExceeded(decision)

    return Depends(check)


class RouteLimitExceeded(Exception):
    def __init__(self, decision: Decision | None) -> None:
        self.decision = decision
