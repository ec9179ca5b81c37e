"""API lifecycle (OWASP API9): a route is deprecated with a date, a sunset date and a successor in
one declaration, and retired by the clock, not by a forgotten follow-up change.

    GET_ORG_V0 = Deprecation(since=datetime(...), sunset=datetime(...), successor="/api/v1/orgs/{org_id}")

    @router.get("/orgs/{org_id}", **GET_ORG_V0.route(dependencies=[require_scopes("orgs:read")]))

Before the sunset the route works and every answer carries `Deprecation: @<unix seconds>`
(RFC 9745), `Sunset: <IMF-fixdate>` (RFC 8594) and `Link: <successor>; rel="successor-version"`;
each call is logged as a `deprecated_use` event with the subject, so owners know who still calls
it. From the sunset on it answers 410 without running the handler. OpenAPI marks it deprecated.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any
from urllib.parse import quote

from fastapi import Depends, HTTPException, Request
from starlette.types import Scope

from ..resources import runtime_of
from .errors import Problem, ProblemDetail
from .events import security_event

SCOPE_KEY = "deprecation_headers"
_PLACEHOLDER = re.compile(r"\{(\w+)\}")


def utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class Deprecation:
    since: datetime
    sunset: datetime
    successor: str  # the successor's path; `{name}` is filled from the request's path parameters
    headers: tuple[tuple[bytes, bytes], ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.since.tzinfo is None or self.sunset.tzinfo is None:
            raise ValueError("deprecation dates need a time zone, e.g. datetime(2026, 1, 1, tzinfo=UTC)")
        if self.sunset <= self.since:
            raise ValueError("the sunset must come after the deprecation")
        static = (
            (b"deprecation", f"@{int(self.since.timestamp())}".encode()),
            (b"sunset", format_datetime(self.sunset.astimezone(UTC), usegmt=True).encode()),
        )
        object.__setattr__(self, "headers", static)

    def successor_for(self, path_params: dict[str, Any]) -> str:
        # Path parameters are percent-encoded: a header value never carries what the client sent raw.
        return _PLACEHOLDER.sub(lambda m: quote(str(path_params.get(m.group(1), "")), safe=""), self.successor)

    def route(
        self, *, dependencies: Sequence[Any] = (), responses: dict[int | str, dict[str, Any]] | None = None
    ) -> dict[str, Any]:
        """Keyword arguments for `router.get(...)` & co.: the lifecycle check runs first, before the
        route's own dependencies, so a retired route does no work at all."""

        async def lifecycle(request: Request) -> None:
            await self.check(request)

        lifecycle.deprecation = self  # type: ignore[attr-defined]  # for tests and introspection
        return {
            "deprecated": True,
            "dependencies": [Depends(lifecycle), *dependencies],
            "responses": {410: {"model": Problem, "description": "Gone: past the sunset date"}, **(responses or {})},
        }

    async def check(self, request: Request) -> None:
        successor = self.successor_for(request.path_params)
        request.scope[SCOPE_KEY] = [*self.headers, (b"link", f'<{successor}>; rel="successor-version"'.encode())]
        now = runtime_of(request).clock()
        retired = now >= self.sunset
        security_event("deprecated_use", level=logging.INFO, successor=successor, sunset_passed=retired)
        if retired:
            raise HTTPException(
                410, ProblemDetail(f"This endpoint was retired on {self.sunset.date().isoformat()}; use {successor}.")
            )


def response_headers(scope: Scope) -> Sequence[tuple[bytes, bytes]]:
    """The lifecycle headers of the route this request matched, added by the audit layer to every
    answer of that route, errors included."""
    headers: Sequence[tuple[bytes, bytes]] = scope.get(SCOPE_KEY, ())
    return headers
