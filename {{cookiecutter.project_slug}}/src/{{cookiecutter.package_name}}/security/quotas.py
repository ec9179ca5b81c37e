"""Business limits (ASVS 5.0 V2.1.3, V2.4.1): how many objects of a kind one owner may hold,
checked in the transaction of the insert so concurrent requests cannot overshoot.

`enforce` runs after the insert (flushed, not committed) and before the commit: it counts the
owner's objects, the new one included, and refuses (rolls back, 409 `quota-exceeded`, a
`quota_exceeded` event) beyond the limit. What keeps two requests from both seeing room:
- PostgreSQL: a transaction-scoped advisory lock on the quota and its owner (`hold`, taken before
  the insert): the writers of one owner's quota queue; other owners' do not. The count runs after
  the lock is granted, so it sees every insert committed before.
- SQLite: the insert takes the database's one write lock until the commit (and the engine's pool
  is one connection per process): the count, after it, sees every other writer's committed rows.
Request rates are limited elsewhere (security/ratelimit.py, 429); a quota is a count (409).
"""

from __future__ import annotations

from typing import Any

from fastapi import HTTPException
from sqlalchemy import Select, func, select, text
from sqlalchemy.ext.asyncio import AsyncSession

from .errors import ProblemDetail
from .events import security_event

PROBLEM = "quota-exceeded"


class QuotaExceeded(HTTPException):
    """409: the owner holds as many objects of this kind as its quota allows."""

    problem_name = PROBLEM

    def __init__(self, what: str, limit: int, variable: str) -> None:
        super().__init__(409, ProblemDetail(f"The limit of {limit} {what} is reached ({variable})."))


async def hold(session: AsyncSession, quota: str, owner: str) -> None:
    """Queue behind any other writer of `owner`'s `quota` until this transaction ends (PostgreSQL;
    on SQLite the insert's write lock does it). Call it before the insert."""
    if session.get_bind().dialect.name == "postgresql":
        await session.execute(
            text("SELECT pg_advisory_xact_lock(hashtextextended(:key, 0))"), {"key": f"quota:{quota}:{owner}"}
        )


async def enforce(
    session: AsyncSession,
    count: Select[Any],
    *,
    quota: str,
    limit: int,
    what: str,
    variable: str,
    **event: Any,
) -> None:
    """After the insert, before the commit: roll back and raise `QuotaExceeded` when `count` (the
    owner's objects, the new one included) exceeds `limit`. `event`: the object named in the
    `quota_exceeded` event (the subject comes with the request)."""
    held = await session.scalar(select(func.count()).select_from(count.subquery()))
    if held is not None and held > limit:
        await session.rollback()
        security_event("quota_exceeded", quota=quota, limit=limit, **event)
        raise QuotaExceeded(what, limit, variable)
