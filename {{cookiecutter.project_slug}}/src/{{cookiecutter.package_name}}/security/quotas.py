"""Business limits (ASVS 5.0 V2.1.3, V2.4.1): how many objects of a kind one owner may hold,
checked with the insert so concurrent requests cannot overshoot. Two ways:

- A count the database keeps with the owner's row (users per org: `orgs.user_count`, kept by
  triggers, revision 0004): the insert itself is conditional (`INSERT ... SELECT ... WHERE
  count < limit`, api/users.py), one statement whose cost does not grow with the owner's objects;
  the owner's row is locked against other writers for it (PostgreSQL `FOR NO KEY UPDATE`; SQLite's
  statement holds the write lock). Nothing inserted is the refusal: `exceeded`.
- A count of the owner's rows (`hold` before the insert, `enforce` after it, flushed, not
  committed), for small limits (orgs per subject, API keys per owner): no column to keep, a cost
  that grows with the count. What keeps two requests from both seeing room: PostgreSQL, a
  transaction-scoped advisory lock on the quota and its owner (`hold`): the writers of one
  owner's quota queue, and the count, after the lock is granted, sees every insert committed
  before. SQLite: the insert takes the database's one write lock until the commit (and the
  engine's pool is one connection per process): the count sees every other writer's rows.

Either way a refusal is a 409 `quota-exceeded` problem and a `quota_exceeded` event, and nothing
of the refused object is written. Request rates are limited elsewhere (security/ratelimit.py,
429); a quota is a count (409).
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


def exceeded(quota: str, limit: int, *, what: str, variable: str, **event: Any) -> QuotaExceeded:
    """The refusal to raise: logs the `quota_exceeded` event (`event`: the object it names; the
    subject comes with the request) and returns the 409."""
    security_event("quota_exceeded", quota=quota, limit=limit, **event)
    return QuotaExceeded(what, limit, variable)


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
        raise exceeded(quota, limit, what=what, variable=variable, **event)
