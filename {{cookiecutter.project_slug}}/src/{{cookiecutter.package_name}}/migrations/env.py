"""Alembic environment: the URL comes from the service's settings (DATABASE_URL), async-aware."""

from __future__ import annotations

import asyncio
import os

from alembic import context
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine

from {{ cookiecutter.package_name }} import (
    extensions,
    models,  # noqa: F401 (the service's own tables)
)
from {{ cookiecutter.package_name }}.config import DEFAULT_DATABASE_URL
from {{ cookiecutter.package_name }}.tables import Base

extensions.chosen()  # the baked options' tables (their extensions import their models)

target_metadata = Base.metadata


def database_url() -> str:
    # Migrations need only the database, not the JWT settings the full Settings require.
    return context.config.get_main_option("sqlalchemy.url") or os.environ.get("DATABASE_URL") or DEFAULT_DATABASE_URL


def run_migrations(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",  # SQLite needs batch mode for ALTER
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


async def run_online() -> None:
    engine = create_async_engine(database_url())
    async with engine.connect() as connection:
        await connection.run_sync(run_migrations)
    await engine.dispose()


if context.is_offline_mode():
    context.configure(url=database_url(), target_metadata=target_metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()
else:
    asyncio.run(run_online())
