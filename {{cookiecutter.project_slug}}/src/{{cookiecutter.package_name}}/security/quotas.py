"""Business limits (ASVS 5.0 V2.1.3, V2.4.1): how many objects of a kind one owner may hold,
checked in the transaction of the insert so concurrent requests cannot overshoot. Two ways:

- A count kept with the owner's row (`take` after the insert, `give_back` after a delete, each
  before the commit): one conditional UPDATE adds one only while the count is below the limit, so
  the check costs the same however many objects the owner holds. The UPDATE locks the owner's row
  (PostgreSQL; a concurrent writer's UPDATE waits, then sees the count committed) or holds the
  database's write lock (SQLite) until the commit: the writers of one owner queue, and a refused
  or rolled-back insert takes its unit back with it. Use it where an owner may hold many
  (users per org, `orgs.user_count`).
- A count of the owner's rows (`hold` before the insert, `enforce` after it, flushed, not
  committed): no column to keep, a cost that grows with the owner's objects; fine for small limits
  (orgs per subject, API keys per owner). What keeps two requests from both seeing room:
  PostgreSQL, a transaction-scoped advisory lock on the quota and its owner (`hold`): the writers
  of one owner's quota queue, and the count, after the lock is granted, sees every insert
  committed before. SQLite: the insert takes the database's one write lock until the commit (and
  the engine's pool is one connection per process): the count sees every other writer's rows.

Either way a refusal rolls back and is a 409 `quota-exceeded` problem and a `quota_exceeded` event.
Request rates are limited elsewhere (security/ratelimit.py, 429); a quota is a count (409).
"""

from __future__ import annotations

from typing import Any

from fastapi import HTTPException
from sqlalchemy import ColumnElement, Select, func, select, text, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import InstrumentedAttribute

from .errors import ProblemDetail
from .events import security_event

PROBLEM = "quota-exceeded"


class QuotaExceeded(HTTPException):
    """409: the owner holds as many objects of this kind as its quota allows."""

    problem_name = PROBLEM

    def __init__(self, what: str, limit: int, variable: str) -> None:
        super().__init__(409, ProblemDetail(f"The limit of {limit} {what} is reached ({variable})."))


async def take(
    session: AsyncSession,
    count: InstrumentedAttribute[int],
    owner: ColumnElement[bool],
    *,
    quota: str,
    limit: int,
    what: str,
    variable: str,
    **event: Any,
) -> None:
    """After the insert, before the commit: add one to `count`, the column kept with the owner's row
    that `owner` selects, while it is below `limit`; otherwise roll back (the insert too) and raise
    `QuotaExceeded`. `event`: the
    object named in the `quota_exceeded` event (the subject comes with the request)."""
    table = count.class_.__table__
    taken = await session.scalar(
        update(table).where(owner, count < limit).values({count.key: count + 1}).returning(count)
    )
    if taken is None:
        await session.rollback()
        security_event("quota_exceeded", quota=quota, limit=limit, **event)
        raise QuotaExceeded(what, limit, variable)


async def give_back(session: AsyncSession, count: InstrumentedAttribute[int], owner: ColumnElement[bool]) -> None:
    """After a delete, in its transaction: take one from the count `take` added to."""
    table = count.class_.__table__
    await session.execute(update(table).where(owner, count > 0).values({count.key: count - 1}))


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
