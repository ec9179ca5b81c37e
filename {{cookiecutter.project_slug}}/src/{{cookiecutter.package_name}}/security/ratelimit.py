"""Layers 3 and 5, rate limits: per client address before authentication, per subject after it,
and per route next to the route (`dependencies=[limit("10/minute")]`).

Every check is one atomic round trip to Redis (a small Lua script: count, then read the window's
time left), so N replicas together admit exactly the limit and the headers never race the count.
Without REDIS_URL (development only) the same fixed window lives in process memory. Why not
slowapi, and what an outage does: docs/decisions/rate-limiting.md.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from fastapi import Depends, Request, Response
from fastapi.routing import APIRoute
from limits import RateLimitItem, parse
from redis.asyncio import Redis
from redis.exceptions import RedisError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..config import Settings
from .authn import API_PREFIX
from .errors import ProblemResponse, problem
from .events import security_event

KEY_PREFIX = "ratelimit"
WARNING_INTERVAL_SECONDS = 60.0
SWEEP_INTERVAL_SECONDS = 60.0

# Count this request and read the time left in its window, atomically. The expiry is set only
# when the window opens (or if it was somehow lost), so a client that keeps knocking cannot
# stretch its own window. One key per call, so it runs unchanged on a Redis Cluster shard.
COUNT_SCRIPT = """
local count = redis.call('INCR', KEYS[1])
local ttl = redis.call('PTTL', KEYS[1])
if ttl < 0 then
  redis.call('PEXPIRE', KEYS[1], ARGV[1])
  ttl = tonumber(ARGV[1])
end
return {count, ttl}
"""


@dataclass(frozen=True, slots=True)
class Policy:
    """A named limit: `limit` requests per `window` seconds. The name appears in the headers."""

    name: str
    limit: int
    window: int
    key_prefix: str = field(repr=False)
    policy_header: bytes = field(repr=False)

    @classmethod
    def of(cls, name: str, item: RateLimitItem, key_name: str | None = None) -> Policy:
        window = item.get_expiry()
        return cls(
            name=name,
            limit=item.amount,
            window=window,
            # The limit is part of the key, so changing it starts fresh counters instead of
            # judging old counts by the new number.
            key_prefix=f"{KEY_PREFIX}:{key_name or name}:{item.amount}/{window}:",
            policy_header=f'"{name}";q={item.amount};w={window}'.encode(),
        )


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome of counting one request against one policy."""

    policy: Policy
    count: int
    reset_in: int  # whole seconds until the window ends

    @property
    def allowed(self) -> bool:
        return self.count <= self.policy.limit

    @property
    def remaining(self) -> int:
        return max(0, self.policy.limit - self.count)

    def headers(self) -> list[tuple[bytes, bytes]]:
        """The IETF fields (draft-ietf-httpapi-ratelimit-headers)."""
        return [
            (b"ratelimit-policy", self.policy.policy_header),
            (b"ratelimit", f'"{self.policy.name}";r={self.remaining};t={self.reset_in}'.encode()),
        ]


class Counter(Protocol):
    async def count(self, key: str, window_ms: int) -> tuple[int, int]:
        """Count one request in the window of `key`; return the count and the milliseconds left."""
        ...


class RedisCounter:
    """Fixed windows in Redis, shared by every replica: one EVALSHA per check."""

    def __init__(self, redis: Redis) -> None:
        self.script = redis.register_script(COUNT_SCRIPT)

    async def count(self, key: str, window_ms: int) -> tuple[int, int]:
        count, ttl = await self.script(keys=[key], args=[window_ms])
        return int(count), int(ttl)


class MemoryCounter:
    """The same fixed windows in process memory, for development without Redis. `count` never
    awaits, so on one event loop it is as atomic as the script. Each process counts alone."""

    def __init__(self) -> None:
        self.windows: dict[str, tuple[int, float]] = {}
        self.next_sweep = 0.0

    async def count(self, key: str, window_ms: int) -> tuple[int, int]:
        now = time.monotonic()
        if now >= self.next_sweep:
            self.windows = {k: w for k, w in self.windows.items() if w[1] > now}
            self.next_sweep = now + SWEEP_INTERVAL_SECONDS
        count, ends = self.windows.get(key, (0, 0.0))
        if ends <= now:
            count, ends = 0, now + window_ms / 1000
        count += 1
        self.windows[key] = (count, ends)
        return count, math.ceil((ends - now) * 1000)


class StoreUnavailable(Exception):
    """The rate-limit store did not answer in time and RATE_LIMIT_FAILURE_MODE is `closed`."""


class RateLimiter:
    """Counts requests against policies and applies the declared failure mode."""

    def __init__(self, settings: Settings, redis: Redis | None) -> None:
        self.counter: Counter = RedisCounter(redis) if redis is not None else MemoryCounter()
        self.fail_open = settings.rate_limit_failure_mode == "open"
        # A hard bound on top of the client's socket timeouts: one attempt and one retry.
        self.budget = 2 * settings.redis_timeout_seconds
        self._warned_at = -math.inf

    async def hit(self, policy: Policy, key: str) -> Decision | None:
        """Count one request. None: the store is down and the failure mode is `open`."""
        try:
            async with asyncio.timeout(self.budget):
                count, ttl_ms = await self.counter.count(policy.key_prefix + key, policy.window * 1000)
        except (RedisError, OSError, TimeoutError) as exc:
            if not self.fail_open:
                raise StoreUnavailable from exc
            self._warn_open(exc)
            return None
        return Decision(policy, count, max(0, math.ceil(ttl_ms / 1000)))

    def _warn_open(self, exc: Exception) -> None:
        now = time.monotonic()
        if now - self._warned_at >= WARNING_INTERVAL_SECONDS:
            self._warned_at = now
            security_event(
                "rate_limit_store_unavailable",
                failure_mode="open",
                error=type(exc).__name__,
                repeats_suppressed_for_seconds=WARNING_INTERVAL_SECONDS,
            )


def too_many_requests(decision: Decision) -> ProblemResponse:
    security_event("rate_limited", policy=decision.policy.name, limit=decision.policy.limit)
    response = problem(
        429,
        "Too many requests; retry after the number of seconds in Retry-After.",
        name="rate-limited",
        headers={"Retry-After": str(max(1, decision.reset_in))},
    )
    response.raw_headers.extend(decision.headers())
    return response


def store_unavailable() -> ProblemResponse:
    security_event("dependency_unavailable", dependency="redis", layer="ratelimit", failure_mode="closed")
    return problem(
        503,
        "The rate limit store is unavailable; retry later.",
        name="dependency-unavailable",
        headers={"Retry-After": "1"},
    )


class RateLimit:
    """Limits /api/ traffic by a key taken from the request (client address, subject)."""

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
        self.policy = Policy.of(policy, item)
        self.key = key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        key = self.key(scope) if scope["type"] == "http" and scope["path"].startswith(API_PREFIX) else None
        if key is None:
            await self.app(scope, receive, send)
            return
        try:
            decision = await self.limiter.hit(self.policy, key)
        except StoreUnavailable:
            await store_unavailable()(scope, receive, send)
            return
        if decision is None:
            await self.app(scope, receive, send)
            return
        if not decision.allowed:
            await too_many_requests(decision)(scope, receive, send)
            return
        headers = decision.headers()

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                # Prepended, so the fields read outermost policy first: ip, subject, route.
                message["headers"] = [*headers, *message.get("headers", [])]
            await send(message)

        await self.app(scope, receive, send_with_headers)


def client_address(scope: Scope) -> str:
    """The address the transport layer decided (TRUSTED_PROXIES-aware)."""
    client = scope.get("client")
    return client[0] if client else "unknown"


def subject(scope: Scope) -> str | None:
    principal = scope.get("state", {}).get("principal")
    return getattr(principal, "subject", None)


class RouteLimitExceeded(Exception):
    """Raised by `limit()`: answered 429 with the decision, or 503 without one (store down,
    failure mode closed). `app.py` registers `route_limit_exceeded` for it."""

    def __init__(self, decision: Decision | None) -> None:
        self.decision = decision


async def route_limit_exceeded(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RouteLimitExceeded)
    return too_many_requests(exc.decision) if exc.decision else store_unavailable()


def limit(notation: str, *, name: str | None = None) -> Any:
    """A per-route limit per caller, declared next to the route: `dependencies=[limit("10/minute")]`.

    The policy is named after the route (its function name) unless `name` is given; routes that
    share a `name` share one count. Put it first in `dependencies` so it runs before authorization.
    """
    item = parse(notation)
    policies: dict[str, Policy] = {}  # one per route, built on its first request

    async def check(request: Request, response: Response) -> None:
        route: APIRoute = request.scope["route"]
        # unique_id (name, path and method, word characters only) keeps routes apart in the key.
        policy = policies.get(route.unique_id)
        if policy is None:
            policy = policies[route.unique_id] = Policy.of(name or route.name, item, key_name=name or route.unique_id)
        key = subject(request.scope) or client_address(request.scope)
        try:
            decision = await request.app.state.runtime.limiter.hit(policy, key)
        except StoreUnavailable:
            raise RouteLimitExceeded(None) from None
        if decision is None:
            return
        if not decision.allowed:
            raise RouteLimitExceeded(decision)
        for header, value in decision.headers():
            response.headers.append(header.decode(), value.decode())

    return Depends(check)
