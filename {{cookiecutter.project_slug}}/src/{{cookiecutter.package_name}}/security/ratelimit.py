"""Layers 3 and 5, rate limits: per client address before authentication, per subject after it,
and per route next to the route (`dependencies=[limit("10/minute")]`).

They count with `limiter.py` (atomic fixed windows in Redis, or in process memory without
REDIS_URL); the address and subject counts travel with the revocation lookup, one round trip per
request (admission.py). Why not slowapi, and what an outage does: docs/decisions/rate-limiting.md.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from fastapi import Depends, Request, Response
from fastapi.routing import APIRoute
from limits import parse
from starlette.types import ASGIApp, Receive, Scope, Send

from ..resources import runtime_of
from ..store.core import StoreBusy, StoreUnavailable
from .errors import ProblemResponse, problem, store_busy
from .events import add_response_headers, security_event
from .limiter import Decision, Policy
from .lockout import LockedOut, locked_out
from .principal import app_path, under_api
from .transport import rate_limit_bucket

if TYPE_CHECKING:
    from .admission import Admission
    from .principal import Principal


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
        if scope["type"] != "http" or not under_api(app_path(scope)):
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
            result = await runtime_of(request).limiter.hit(policy, key)
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
