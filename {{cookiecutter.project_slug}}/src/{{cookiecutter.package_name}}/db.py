"""The async engine and one session per request for writes; `Statements` for the request path's reads."""

from __future__ import annotations

import asyncio
import importlib
import logging
import sqlite3
import threading
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Annotated, Any, TypeAlias

from fastapi import Depends, Request
from sqlalchemy import Select, event
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.sql.dml import ReturningInsert

from .resources import runtime_of

logger = logging.getLogger(__name__)

AnyStatement: TypeAlias = Select[*tuple[Any, ...]] | ReturningInsert[*tuple[Any, ...]]


def postgres_server_settings(statement_timeout_seconds: float | None) -> dict[str, str]:
    """What every PostgreSQL session of the service is opened with (asyncpg's `server_settings`):
    its `statement_timeout` (DATABASE_STATEMENT_TIMEOUT_SECONDS), so no statement outlives its
    request by much; a statement that exceeds it fails (SQLSTATE 57014, answered 503)."""
    if statement_timeout_seconds is None:
        return {}
    return {"statement_timeout": str(max(1, round(statement_timeout_seconds * 1000)))}


def create_engine(
    database_url: str,
    *,
    pool_size: int = 10,
    max_overflow: int = 10,
    statement_timeout_seconds: float | None = None,
) -> AsyncEngine:
    """An engine that does no I/O until first used; on PostgreSQL with at most `pool_size` +
    `max_overflow` connections (DATABASE_POOL_SIZE, DATABASE_MAX_OVERFLOW) and each session's
    `statement_timeout` (DATABASE_STATEMENT_TIMEOUT_SECONDS). Its errors never
    carry the statement's bound values (`hide_parameters`): they are subjects, e-mail addresses
    and key hashes, and an error's text reaches the log."""
    if database_url.startswith("sqlite"):
        # One connection: writers queue for it in this process instead of spinning on SQLite's
        # file lock through busy_timeout (which gave a p99 of a second under 32 concurrent
        # writers). Request-path reads do not wait for it: they go through `Statements`.
        engine = create_async_engine(
            database_url,
            connect_args={"timeout": 5},
            pool_size=1,
            max_overflow=0,
            pool_timeout=10,
            hide_parameters=True,
        )
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        return engine
    server_settings = postgres_server_settings(statement_timeout_seconds)
    return create_async_engine(
        database_url,
        connect_args={"server_settings": server_settings} if server_settings else {},
        pool_pre_ping=True,
        pool_size=pool_size,
        max_overflow=max_overflow,
        pool_timeout=5,
        hide_parameters=True,
    )


# What production refuses of the role it serves as (PostgreSQL; a SQLite file has no roles). One
# query at start: a superuser, or the owner of `audit_events` (who can drop its append-only
# triggers), is the role that migrates, not the one that serves.
_ROLE_QUERY = """
SELECT current_user, r.rolsuper,
       EXISTS (SELECT 1 FROM pg_tables t
               WHERE t.tablename = 'audit_events' AND t.schemaname = current_schema()
                 AND pg_has_role(current_user, t.tableowner, 'USAGE'))
FROM pg_roles r WHERE r.rolname = current_user
"""


async def serving_role_problems(engine: AsyncEngine) -> list[str] | None:
    """Each reason the role DATABASE_URL connects as must not serve in production, naming the
    variable; empty on SQLite. None when the database cannot be reached: the role is unchecked, and
    readiness fails until a later check passes (health.py), so an unchecked role never serves."""
    if engine.dialect.name != "postgresql":
        return []
    try:
        async with engine.connect() as connection:
            row = (await connection.exec_driver_sql(_ROLE_QUERY)).one()
    except (sa_exc.SQLAlchemyError, OSError) as exc:
        logger.warning(
            "database role not checked: the database cannot be reached; not ready until it is",
            extra={"event": "database_role_unchecked", "error": type(exc).__name__},
        )
        return None
    role, superuser, owns_audit = tuple(row)
    if superuser:
        return [
            f"DATABASE_URL: connects as {role}, a superuser; production serves as a role with only the "
            "service's privileges (README, Database access)"
        ]
    if owns_audit:
        return [
            f"DATABASE_URL: connects as {role}, the owner of audit_events, which can drop its append-only "
            "triggers; migrate as the owner, serve as DATABASE_APP_ROLE (README, Database access)"
        ]
    return []


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # Concurrent writers get "database is locked" without WAL and a busy timeout.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=5000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def create_sessionmaker(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, expire_on_commit=False)


async def get_session(request: Request) -> AsyncIterator[AsyncSession]:
    async with runtime_of(request).sessionmaker() as session:
        yield session


SessionDep = Annotated[AsyncSession, Depends(get_session)]


# --- Statements on the request path ----------------------------------------------------------------


class Query:
    """A statement (a SELECT, or an INSERT ... RETURNING) compiled once for the engine's dialect and
    run on the database driver itself: its SQL, its parameters in order with SQLAlchemy's bind
    processors, and its columns with SQLAlchemy's result processors, so a row reads back exactly
    as the ORM would read it. Python-side column defaults are not applied: pass every value."""

    def __init__(self, statement: AnyStatement, dialect: Dialect) -> None:
        compiled = statement.compile(dialect=dialect, compile_kwargs={"render_postcompile": True})
        self.sql = compiled.string
        self.names = tuple(compiled.positiontup or ())
        self.defaults = dict(compiled.params)
        binds = {name: compiled.binds[name] for name in self.names if name in compiled.binds}
        self.binders = tuple(
            binds[name].type.dialect_impl(dialect).bind_processor(dialect) if name in binds else None
            for name in self.names
        )
        self.processors = tuple(
            column.type.dialect_impl(dialect).result_processor(dialect, None) for column in statement.exported_columns
        )

    def parameters(self, values: Mapping[str, Any]) -> list[Any]:
        merged = {**self.defaults, **values}
        return [
            merged[name] if binder is None else binder(merged[name])
            for name, binder in zip(self.names, self.binders, strict=True)
        ]

    def row(self, raw: Sequence[Any]) -> tuple[Any, ...]:
        return tuple(
            value if process is None or value is None else process(value)
            for value, process in zip(raw, self.processors, strict=True)
        )


class Statements:
    """Single statements on the hot path, one round trip each on the driver (aiosqlite or asyncpg):
    no ORM session, no transaction begun (each statement commits by itself), no ping on checkout
    (a dead PostgreSQL connection is retried once on another, reads only), a fixed pool. `fetch`
    reads on read-only connections; `write` runs an INSERT ... RETURNING, on SQLite through one
    writer connection that writes queue for in this process. Work of several statements that must
    commit together keeps SQLAlchemy's session (`SessionDep`). Driver errors come out as
    SQLAlchemy's (IntegrityError, OperationalError, ...), so callers and the error layer handle
    them as they always have."""

    def __init__(self, engine: AsyncEngine, pool_size: int, *, statement_timeout_seconds: float | None = None) -> None:
        self.dialect = engine.dialect
        self.url = engine.url
        self.pool_size = pool_size
        self._queries: dict[Any, Query] = {}
        self._sqlite: list[Any] = []  # aiosqlite connections, opened on first use
        self._next = 0
        self._postgres = PostgresConnections(
            self.dialect, self.url, pool_size, server_settings=postgres_server_settings(statement_timeout_seconds)
        )
        self._writer: Any = None  # SQLite: one aiosqlite connection in autocommit mode
        self._opening = asyncio.Lock()

    def query(self, key: Any, build: Callable[[], AnyStatement]) -> Query:
        """The compiled form of the statement `build` makes, compiled once per `key`."""
        query = self._queries.get(key)
        if query is None:
            query = self._queries[key] = Query(build(), self.dialect)
        return query

    async def fetch(self, query: Query, **values: Any) -> list[tuple[Any, ...]]:
        parameters = query.parameters(values)
        try:
            if self.dialect.name == "sqlite":
                rows = await (await self._sqlite_connection()).execute_fetchall(query.sql, parameters)
            else:
                rows = await self._fetch_postgres(query.sql, parameters)
        except sa_exc.SQLAlchemyError:
            raise
        except Exception as exc:
            raise _translated(query.sql, exc) from exc
        return [query.row(row) for row in rows]

    async def write(self, query: Query, **values: Any) -> list[tuple[Any, ...]]:
        """Run one INSERT ... RETURNING that commits by itself; its returned rows."""
        parameters = query.parameters(values)
        try:
            if self.dialect.name == "sqlite":
                rows = await (await self._sqlite_writer()).execute_fetchall(query.sql, parameters)
            else:
                rows = await self._postgres.fetch(query.sql, parameters, retry=False)
        except sa_exc.SQLAlchemyError:
            raise
        except Exception as exc:
            raise _translated(query.sql, exc) from exc
        return [query.row(row) for row in rows]

    async def _sqlite_writer(self) -> Any:
        if self._writer is None:
            async with self._opening:
                if self._writer is None:
                    # isolation_level=None: each statement is its own transaction, committed
                    # (synchronous=FULL, WAL) before the call returns; one thread hop per write.
                    writer = await self._open_sqlite(isolation_level=None)
                    await writer.execute("PRAGMA foreign_keys=ON")
                    self._writer = writer
        return self._writer

    async def _sqlite_connection(self) -> Any:
        if len(self._sqlite) < self.pool_size:
            async with self._opening:
                if len(self._sqlite) < self.pool_size:
                    connection = await self._open_sqlite()
                    await connection.execute("PRAGMA query_only=ON")
                    self._sqlite.append(connection)
                    return connection
        self._next = (self._next + 1) % len(self._sqlite)
        return self._sqlite[self._next]

    async def _open_sqlite(self, **options: Any) -> Any:
        # The bake installs only its own database's driver.
        aiosqlite = importlib.import_module("aiosqlite")
        args, kwargs = self.dialect.create_connect_args(self.url)
        connection = aiosqlite.connect(*args, **{**kwargs, "timeout": 5, **options})
        # aiosqlite runs each connection on a thread of its own; as SQLAlchemy does for its own
        # aiosqlite connections, a daemon one, so a connection nobody closed (an app served
        # without its lifespan) cannot keep the process from exiting.
        thread = connection if isinstance(connection, threading.Thread) else connection._thread  # < 0.22 / 0.22+
        thread.daemon = True
        return await connection

    async def _fetch_postgres(self, sql: str, parameters: list[Any]) -> list[Any]:
        return await self._postgres.fetch(sql, parameters, retry=True)

    def pool_usage(self) -> tuple[int | None, int, int]:
        """Connections (in use, open, at most), for the metrics listener (metrics.py). SQLite's
        connections each queue the statements given to them: "in use" is None there."""
        if self.dialect.name == "sqlite":
            return None, len(self._sqlite) + (self._writer is not None), self.pool_size + 1
        return self._postgres.in_use(), len(self._postgres._open), self.pool_size

    async def aclose(self) -> None:
        for connection in self._sqlite:
            await connection.close()
        self._sqlite.clear()
        if self._writer is not None:
            await self._writer.close()
            self._writer = None
        await self._postgres.aclose()


class PostgresConnections:
    """At most `size` asyncpg connections, opened on first use; a statement beyond them waits for
    one. Smaller than asyncpg's Pool on purpose: these connections run single statements outside
    any transaction and change no session state, so a connection goes back as it came, with no
    reset query and no acquire/release bookkeeping on the request path (measured in make bench)."""

    def __init__(
        self, dialect: Dialect, url: Any, size: int, *, server_settings: Mapping[str, str] | None = None
    ) -> None:
        self.dialect = dialect
        self.url = url
        self.server_settings = dict(server_settings or {})
        self._slots = asyncio.Semaphore(size)
        self._idle: list[Any] = []
        self._open: set[Any] = set()

    async def fetch(self, sql: str, parameters: list[Any], *, retry: bool) -> list[Any]:
        """Run one statement. `retry`: once more on another connection if this one turns out
        dead (the server restarted, an idle timeout), for statements that are safe to repeat."""
        async with self._slots:
            connection = self._idle.pop() if self._idle else await self._connect()
            try:
                rows: list[Any] = await connection.fetch(sql, *parameters)
            except _postgres_connection_errors():
                self._discard(connection)
                if not retry:
                    raise
                connection = await self._connect()
                try:
                    rows = await connection.fetch(sql, *parameters)
                except BaseException:
                    self._discard(connection)
                    raise
            except BaseException as exc:
                # A statement error leaves the connection usable; a cancellation mid-statement
                # may not, so that one is closed.
                if isinstance(exc, Exception) and not connection.is_closed():
                    self._idle.append(connection)
                else:
                    self._discard(connection)
                raise
            self._idle.append(connection)
            return rows

    def in_use(self) -> int:
        return len(self._open) - len(self._idle)

    async def _connect(self) -> Any:
        asyncpg = importlib.import_module("asyncpg")
        args, kwargs = self.dialect.create_connect_args(self.url)
        settings = {**kwargs.pop("server_settings", {}), **self.server_settings}
        connection = await asyncpg.connect(
            *args, **kwargs, timeout=5, command_timeout=30, server_settings=settings or None
        )
        self._open.add(connection)
        return connection

    def _discard(self, connection: Any) -> None:
        self._open.discard(connection)
        connection.terminate()

    async def aclose(self) -> None:
        for connection in list(self._open):
            await connection.close()
        self._open.clear()
        self._idle.clear()


def _postgres_connection_errors() -> tuple[type[Exception], ...]:
    asyncpg = importlib.import_module("asyncpg")
    return (OSError, ConnectionError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError)


# asyncpg's IntegrityConstraintViolationError subclasses (SQLSTATE class 23), by name: the bake
# installs only its own database's driver.
_POSTGRES_INTEGRITY_ERRORS = frozenset(
    {
        "IntegrityConstraintViolationError",
        "UniqueViolationError",
        "ForeignKeyViolationError",
        "NotNullViolationError",
        "CheckViolationError",
        "ExclusionViolationError",
        "RestrictViolationError",
    }
)


def _translated(sql: str, exc: Exception) -> sa_exc.DBAPIError:
    """The driver's error as SQLAlchemy would raise it: OperationalError (answered 503) for a
    database that cannot serve, DBAPIError (500 unless its SQLSTATE says unavailable) otherwise."""
    if isinstance(exc, sqlite3.IntegrityError) or type(exc).__name__ in _POSTGRES_INTEGRITY_ERRORS:
        return sa_exc.IntegrityError(sql, None, exc)
    unavailable = isinstance(exc, OSError | ConnectionError | TimeoutError | sqlite3.OperationalError)
    if not unavailable and type(exc).__module__.startswith("asyncpg"):
        unavailable = isinstance(exc, _postgres_connection_errors())
    if unavailable:
        return sa_exc.OperationalError(sql, None, exc, connection_invalidated=True)
    return sa_exc.DBAPIError(sql, None, exc)
