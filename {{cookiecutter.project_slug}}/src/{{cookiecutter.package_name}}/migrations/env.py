"""Alembic environment: the URL comes from the service's settings (DATABASE_URL or
DATABASE_URL_FILE), async-aware. Run it as the role that owns the tables; on PostgreSQL, with
DATABASE_APP_ROLE set, each run ends by granting that role what the service needs (roles.py)."""

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
from {{ cookiecutter.package_name }}.config import DEFAULT_DATABASE_URL, Settings
from {{ cookiecutter.package_name }}.db import postgres_server_settings
from {{ cookiecutter.package_name }}.migrations.roles import app_role, grant_service_role
from {{ cookiecutter.package_name }}.secret_files import read_secret_file
from {{ cookiecutter.package_name }}.tables import Base

extensions.chosen()  # the baked options' tables (their extensions import their models)

target_metadata = Base.metadata


def database_url() -> str:
    # Migrations need only the database, not the JWT settings the full Settings require.
    configured = context.config.get_main_option("sqlalchemy.url")
    if configured:
        return configured
    value, path = os.environ.get("DATABASE_URL"), os.environ.get("DATABASE_URL_FILE")
    if value and path:
        raise ValueError("set DATABASE_URL or DATABASE_URL_FILE, not both")
    if path:
        production = os.environ.get("ENVIRONMENT", "").strip().lower() == "production"
        return read_secret_file("database_url", path, production=production)
    return value or DEFAULT_DATABASE_URL


def statement_timeout_seconds() -> float:
    """DATABASE_STATEMENT_TIMEOUT_SECONDS, as the service reads it: a migration's statements are
    bounded too (raise it for the run of a migration that rewrites a large table)."""
    value = os.environ.get("DATABASE_STATEMENT_TIMEOUT_SECONDS", "").strip()
    default = Settings.model_fields["database_statement_timeout_seconds"].default
    return float(value) if value else float(default)


def run_migrations(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",  # SQLite needs batch mode for ALTER
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()
        role = app_role(context.config.get_main_option("database_app_role"), connection.dialect.name)
        if role:
            grant_service_role(connection, role)


async def run_online() -> None:
    # hide_parameters: a failing migration's error (and its log line) never quotes a row's values.
    url = database_url()
    server_settings = postgres_server_settings(statement_timeout_seconds()) if url.startswith("postgresql") else {}
    engine = create_async_engine(
        url, hide_parameters=True, connect_args={"server_settings": server_settings} if server_settings else {}
    )
    async with engine.connect() as connection:
        await connection.run_sync(run_migrations)
    await engine.dispose()


if context.is_offline_mode():
    context.configure(url=database_url(), target_metadata=target_metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()
else:
    asyncio.run(run_online())
