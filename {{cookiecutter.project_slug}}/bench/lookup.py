"""Permission-lookup micro-benchmark: `security.authz.holds`, the query every object-level check
makes, timed through the service's own engine and session at 1,000 and 1,000,000 grants."""

from __future__ import annotations

import asyncio
import random
import sqlite3
import statistics
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from alembic import command
from sqlalchemy import text

from {{ cookiecutter.package_name }}.db import create_engine, create_sessionmaker
from {{ cookiecutter.package_name }}.migrations import alembic_config
from {{ cookiecutter.package_name }}.security.authz import holds
from {{ cookiecutter.package_name }}.tables import Relation

SIZES = (1_000, 1_000_000)
SUBJECTS = 50_000
GRANTS_PER_ORG = 20
RELATIONS = ("viewer", "editor", "admin", "owner")
COLUMNS = ("subject", "resource_type", "resource_id", "relation", "created_by")


@dataclass(frozen=True)
class Lookup:
    database: str
    rows: int
    calls: int
    median_us: float
    p99_us: float
    plan: str


def migrate(database_url: str, *, app_role: str | None = None) -> None:
    command.upgrade(alembic_config(database_url, app_role=app_role), "heads")


def grant(number: int) -> tuple[str, str, str, str, str]:
    """Grant `number`: orgs of 20 members each, 50,000 subjects spread over them."""
    org = str(uuid.UUID(int=number // GRANTS_PER_ORG))
    # Principal ids as a token's are kept (security/principal.py): `jwt:<issuer key>:<sub>`.
    return (f"jwt:0123456789abcdef:user-{(number * 7919) % SUBJECTS}", "org", org, RELATIONS[number % 4], "bench")


def grants(start: int, stop: int) -> Iterator[tuple[str, str, str, str, str]]:
    return (grant(number) for number in range(start, stop))


def insert_sqlite(path: Path, start: int, stop: int) -> None:
    with sqlite3.connect(path) as connection:
        connection.executemany(
            f"INSERT INTO permissions ({', '.join(COLUMNS)}) VALUES (?, ?, ?, ?, ?)",  # noqa: S608  # fixed names
            grants(start, stop),
        )
        connection.execute("ANALYZE")


async def insert_postgres(database_url: str, start: int, stop: int) -> None:
    import asyncpg

    connection = await asyncpg.connect(database_url.replace("postgresql+asyncpg://", "postgresql://"))
    try:
        await connection.copy_records_to_table("permissions", records=grants(start, stop), columns=COLUMNS)
        await connection.execute("ANALYZE permissions")
    finally:
        await connection.close()


async def time_lookups(database_url: str, database: str, rows: int, calls: int) -> Lookup:
    """Median and p99 of `holds` on existing grants, one session per call as in a request."""
    engine = create_engine(database_url)
    sessionmaker = create_sessionmaker(engine)
    chosen = [grant(random.randrange(rows)) for _ in range(calls + calls // 10)]
    timings: list[float] = []
    try:
        for number, (subject, resource_type, resource_id, relation, _by) in enumerate(chosen):
            async with sessionmaker() as session:
                started = time.perf_counter()
                held = await holds(session, subject, resource_type, resource_id, Relation(relation))
                elapsed = time.perf_counter() - started
            if not held:
                raise RuntimeError(f"holds() denied an existing {relation} grant")
            if number >= calls // 10:  # the first tenth warms the pool and statement caches
                timings.append(elapsed)
        subject, resource_type, resource_id, *_ = chosen[0]
        plan = await query_plan(engine.url.get_backend_name(), sessionmaker, subject, resource_id)
    finally:
        await engine.dispose()
    timings.sort()
    return Lookup(
        database=database,
        rows=rows,
        calls=len(timings),
        median_us=statistics.median(timings) * 1e6,
        p99_us=timings[int(len(timings) * 0.99)] * 1e6,
        plan=plan,
    )


async def query_plan(backend: str, sessionmaker: object, subject: str, resource_id: str) -> str:
    """How the database answers the lookup, in one line (index name or a scan)."""
    where = "subject = :s AND resource_type = 'org' AND resource_id = :r"
    prefix = "EXPLAIN QUERY PLAN" if backend == "sqlite" else "EXPLAIN"
    statement = text(f"{prefix} SELECT relation FROM permissions WHERE {where}")  # noqa: S608  # fixed text
    async with sessionmaker() as session:  # type: ignore[operator]
        rows = (await session.execute(statement, {"s": subject, "r": resource_id})).all()
    first = str(rows[0][-1]).strip() if rows else "?"
    return first.split("  (cost=")[0]  # PostgreSQL's first line without its cost estimate


def run_sqlite(directory: Path, calls: int) -> list[Lookup]:
    path = directory / "lookup.db"
    path.unlink(missing_ok=True)
    url = f"sqlite+aiosqlite:///{path}"
    migrate(url)
    results, inserted = [], 0
    for size in SIZES:
        insert_sqlite(path, inserted, size)
        inserted = size
        results.append(asyncio.run(time_lookups(url, "SQLite", size, calls)))
    path.unlink(missing_ok=True)
    return results


def run_postgres(database_url: str, calls: int) -> list[Lookup]:
    migrate(database_url)
    results, inserted = [], 0
    for size in SIZES:
        asyncio.run(insert_postgres(database_url, inserted, size))
        inserted = size
        results.append(asyncio.run(time_lookups(database_url, "PostgreSQL", size, calls)))
    return results
