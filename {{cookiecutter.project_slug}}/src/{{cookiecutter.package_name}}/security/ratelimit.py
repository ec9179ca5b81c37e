"""Layers 3 and 5, rate limits: per client address before authentication, per subject after it,
and per route next to the route (`dependencies=[limit("10/minute")]`).

Every count is atomic in Redis (a small Lua script: count, then read the window's time left), so N
replicas together admit exactly the limit and the headers never race the count. The address and
subject counts travel with the revocation lookup, one round trip per request (admission.py).
Without REDIS_URL (development only) the same fixed window lives in process memory. Why not
slowapi, and what an outage does: docs/decisions/rate-limiting.md.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fastapi import Depends, Request, Response
from fastapi.routing import APIRoute
from limits import RateLimitItem, parse
from starlette.types import ASGIApp, Receive, Scope, Send

from ..config import Settings
from ..store.core import Command, MemoryStore, RemoteStore, Script, StoreBusy, StoreUnavailable
from .errors import ProblemResponse, problem, store_busy
from .events import add_response_headers, security_event
from .lockout import LockedOut, locked_out
from .principal import API_PREFIX, app_path
from .transport import rate_limit_bucket

if TYPE_CHECKING:
    from .admission import Admission
    from .principal import Principal

KEY_PREFIX = "ratelimit"
WARNING_INTERVAL_SECONDS = 60.0


# Count this request and read the time left in its window, atomically. The expiry is set only
# when the window opens (or if it was somehow lost), so a client that keeps knocking cannot
# stretch its own window. One key per call, so it runs unchanged on a Redis Cluster shard. The
# subject limit counts with the same steps inside the revocation lookup (admission.py).
def count_in_window(key: str, window_ms: str) -> str:
    """Lua that counts one request in the fixed window at `key` (a KEYS[i]) of `window_ms` (an
    ARGV[j]) and leaves `count` and `ttl` (ms) in locals; the scripts that count build on it."""
    return (
        (
            "local count = redis.call('INCR', KEY)\n"
            "local ttl = redis.call('PTTL', KEY)\n"
            "if ttl < 0 then\n"
            "  redis.call('PEXPIRE', KEY, WINDOW)\n"
            "  ttl = tonumber(WINDOW)\n"
            "end\n"
        )
        .replace("KEY", key)
        .replace("WINDOW", window_ms)
    )


COUNT_SCRIPT = count_in_window("KEYS[1]", "ARGV[1]") + "return {count, ttl}\n"


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


WINDOW = Script(COUNT_SCRIPT)
BLOCKED_CACHE_SIZE = 10_000


def window(policy: Policy, key: str) -> Command:
    """The store command that counts one request in `key`'s window of `policy`."""
    return WINDOW.call([policy.key_prefix + key], [policy.window * 1000])


def decision(policy: Policy, reply: Any) -> Decision:
    count, ttl_ms = reply
    return Decision(policy, int(count), max(0, math.ceil(int(ttl_ms) / 1000)))


class RateLimiter:
    """Counts requests against policies in the store and applies the declared failure mode.

    It also remembers, in this process, the keys the store has refused until their window ends:
    within a fixed window a count only grows, so such a key is refused again without asking the
    store (and, for the address limit, before any token is verified).
    """

    def __init__(self, settings: Settings, store: RemoteStore | MemoryStore) -> None:
        self.store = store
        self.fail_open = settings.rate_limit_failure_mode == "open"
        self._blocked: dict[str, tuple[float, Decision]] = {}  # key -> (monotonic end, decision)
        self._warned_at = -math.inf

    async def hit(self, policy: Policy, key: str) -> Decision | None:
        """Count one request: one round trip. None: the store is down and the failure mode is
        `open`. Raises StoreUnavailable (mode `closed`) or StoreBusy (this process overloaded)."""
        known = self.blocked(policy, key)
        if known is not None:
            return known
        if isinstance(self.store, MemoryStore):
            count, ttl_ms = self.store.count(policy.key_prefix + key, policy.window * 1000)
            return self.note(decision(policy, (count, ttl_ms)), key)
        try:
            (reply,) = await self.store.run([window(policy, key)])
        except StoreUnavailable as exc:
            self.unavailable(exc)
            return None
        return self.note(decision(policy, reply), key)

    def blocked(self, policy: Policy, key: str) -> Decision | None:
        """The refusal the store gave this key earlier in the same window, if any."""
        entry = self._blocked.get(policy.key_prefix + key)
        if entry is None:
            return None
        ends, refused = entry
        left = ends - time.monotonic()
        if left <= 0:
            del self._blocked[policy.key_prefix + key]
            return None
        return Decision(policy, refused.count, math.ceil(left))

    def note(self, result: Decision, key: str) -> Decision:
        """Remember a refusal until its window ends."""
        if not result.allowed:
            if len(self._blocked) >= BLOCKED_CACHE_SIZE:
                now = time.monotonic()
                self._blocked = {k: v for k, v in self._blocked.items() if v[0] > now}
                while len(self._blocked) >= BLOCKED_CACHE_SIZE:
                    del self._blocked[next(iter(self._blocked))]
            self._blocked[result.policy.key_prefix + key] = (time.monotonic() + result.reset_in, result)
        return result

    def unavailable(self, exc: Exception) -> None:
        """The store is down: raises StoreUnavailable in `closed` mode; in `open` mode the check is
        skipped, logged once a minute."""
        if not self.fail_open:
            raise StoreUnavailable from exc
        now = time.monotonic()
        if now - self._warned_at >= WARNING_INTERVAL_SECONDS:
            self._warned_at = now
            security_event(
                "rate_limit_store_unavailable",
                failure_mode="open",
                error=type(exc.__cause__ or exc).__name__,
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
    """Limits /api/ traffic per client address (layer 3) or per subject (layer 5).

    `lookahead` (layer 3 only) names the caller when its credential is one already verified, so the
    subject's answers can ride along in the same round trip (admission.py)."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        admission: Admission,
        policy: str,
        key: Callable[[Scope], str] | None = None,
        lookahead: Callable[[Scope], Principal | None] | None = None,
    ) -> None:
        if policy not in ("ip", "subject"):
            raise ValueError(f"unknown rate limit policy {policy!r}")
        self.app = app
        self.admission = admission
        self.policy = policy
        self.key = key or client_address
        self.lookahead = lookahead

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not app_path(scope).startswith(API_PREFIX):
            await self.app(scope, receive, send)
            return
        try:
            result = await self._decide(scope)
        except LockedOut as exc:
            await locked_out(exc)(scope, receive, send)
            return
        except StoreUnavailable:
            await store_unavailable()(scope, receive, send)
            return
        except StoreBusy:
            await store_busy("ratelimit")(scope, receive, send)
            return
        if result is None:
            await self.app(scope, receive, send)
            return
        if not result.allowed:
            await too_many_requests(result)(scope, receive, send)
            return
        # Written before the answer's own, so the fields read outermost policy first: ip, subject, route.
        add_response_headers(scope, result.headers())
        await self.app(scope, receive, send)

    async def _decide(self, scope: Scope) -> Decision | None:
        if self.policy == "ip":
            known = self.lookahead(scope) if self.lookahead is not None else None
            return await self.admission.address(scope, self.key(scope), known)
        answer = self.admission.kept(scope)
        if answer is not None:
            return answer.decision
        key = subject(scope)  # a principal that did not come through admission (none ships)
        return None if key is None else await self.admission.limiter.hit(self.admission.subject_policy, key)


def client_address(scope: Scope) -> str:
    """The address the transport layer decided (TRUSTED_PROXIES-aware)."""
    client = scope.get("client")
    return client[0] if client else "unknown"


def client_bucket(v6_prefix: int) -> Callable[[Scope], str]:
    """The address limit's key: the client address, an IPv6 one cut to its /`v6_prefix` (one
    subscriber usually holds a whole /64, so counting per /128 would give each one unlimited
    buckets)."""

    def key(scope: Scope) -> str:
        return rate_limit_bucket(client_address(scope), v6_prefix)

    return key


def subject(scope: Scope) -> str | None:
    principal = scope.get("state", {}).get("principal")
    return getattr(principal, "subject", None)


class RouteLimitExceeded(Exception):
    """Raised by `limit()`: answered 429 with the decision, or 503 without one (store down,
    failure mode closed). `app.py` registers `route_limit_exceeded` for it."""

    def __init__(self, decision: Decision | None, *, busy: bool = False) -> None:
        self.decision = decision
        self.busy = busy


async def route_limit_exceeded(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RouteLimitExceeded)
    if exc.decision:
        return too_many_requests(exc.decision)
    return store_busy("ratelimit") if exc.busy else store_unavailable()


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
            result = await request.app.state.runtime.limiter.hit(policy, key)
        except StoreUnavailable:
            raise RouteLimitExceeded(None) from None
        except StoreBusy:
            raise RouteLimitExceeded(None, busy=True) from None
        if result is None:
            return
        if not result.allowed:
            raise RouteLimitExceeded(result)
        for header, value in result.headers():
            response.headers.append(header.decode(), value.decode())

    return Depends(check)
