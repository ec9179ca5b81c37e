"""`db.Statements`, the request path's single statements on the driver: what they read back, how
driver errors come out, and (PostgreSQL) that a connection the server dropped is replaced."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import exc as sa_exc
from sqlalchemy import literal, select
from sqlalchemy.pool import QueuePool

from {{ cookiecutter.package_name }}.config import Settings
from {{ cookiecutter.package_name }}.db import Statements, create_engine
from {{ cookiecutter.package_name }}.runtime import Runtime

from .conftest import DATABASE, UNREACHABLE_DATABASE_URL
from .servers import start_postgres


async def test_an_unreachable_database_is_an_operational_error(tmp_path: Path) -> None:
    statements = Statements(create_engine(UNREACHABLE_DATABASE_URL), 2)
    query = statements.query("one", lambda: select(literal(1)))
    with pytest.raises(sa_exc.OperationalError) as raised:
        await statements.fetch(query)
    assert raised.value.connection_invalidated  # the error layer answers it 503
    await statements.aclose()


async def test_reads_come_back_through_sqlalchemys_result_processors(migrated_database: str) -> None:
    from {{ cookiecutter.package_name }}.models import Org

    statements = Statements(create_engine(migrated_database), 2)
    query = statements.query("no org", lambda: select(Org.id, Org.created_at).where(Org.id == uuid.uuid4()))
    assert await statements.fetch(query) == []
    await statements.aclose()


@pytest.mark.skipif(DATABASE != "postgresql", reason="a restartable server is PostgreSQL's case")
async def test_a_connection_the_server_dropped_is_replaced_for_a_read(tmp_path: Path) -> None:
    server = start_postgres(tmp_path / "postgres")
    try:
        statements = Statements(create_engine(server.url), 2)
        query = statements.query("one", lambda: select(literal(1)))
        assert await statements.fetch(query) == [(1,)]
        server.restart()  # the pooled connection is now dead
        assert await statements.fetch(query) == [(1,)]  # retried once on a new connection
        server.stop()
        with pytest.raises(sa_exc.OperationalError):
            await statements.fetch(query)
        await statements.aclose()
    finally:
        server.stop()


def test_the_engine_pool_follows_database_pool_size_and_max_overflow(settings_for: Callable[..., Settings]) -> None:
    """The connections one replica may hold are the settings' (README: Scaling); SQLite keeps its
    one writer connection whatever they say."""
    engine = Runtime.create(settings_for(database_pool_size=3, database_max_overflow=2)).engine
    pool = engine.pool
    assert isinstance(pool, QueuePool)
    expected = (3, 2) if DATABASE == "postgresql" else (1, 0)
    assert (pool.size(), pool._max_overflow) == expected  # no public accessor for the overflow
