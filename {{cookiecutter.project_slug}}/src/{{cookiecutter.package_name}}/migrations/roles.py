"""What the serving role may do, granted by the migrating role at the end of every `alembic
upgrade` (PostgreSQL, with DATABASE_APP_ROLE set).

Two roles, so a compromised service cannot rewrite history or its own schema: the owner runs
the migrations (the migration Job) and owns every table, function and trigger; the serving role
(the Deployment's DATABASE_URL) reads and writes rows and nothing else. On `audit_events` it may
only INSERT (and read back the ids, for INSERT ... RETURNING id): no reading of the events, no
UPDATE, DELETE or TRUNCATE, and, not being the owner, it cannot drop or disable the table's
append-only triggers. `alembic_version` it may only read (readiness compares
it with the code's heads). No ALTER DEFAULT PRIVILEGES: every upgrade grants again on the tables
as they are, so a table added by a later revision is covered when that revision is applied.

A SQLite file has no roles: whoever can open the file can do anything to it.
"""

from __future__ import annotations

import os

from sqlalchemy import text
from sqlalchemy.engine import Connection

APPEND_ONLY_TABLES = frozenset({"audit_events"})
READ_ONLY_TABLES = frozenset({"alembic_version"})


def app_role(configured: str | None, dialect: str) -> str | None:
    """The serving role: the Alembic option `database_app_role` (tests, code that runs Alembic
    itself) or DATABASE_APP_ROLE; None when neither is set."""
    role = (configured or os.environ.get("DATABASE_APP_ROLE", "")).strip()
    if role and dialect != "postgresql":
        raise ValueError("DATABASE_APP_ROLE: PostgreSQL only (a SQLite file has no roles)")
    return role or None


def grant_service_role(connection: Connection, role: str) -> None:
    """Grant `role` the service's privileges on every table of the current schema, taking away
    anything more (a role granted ALL by hand is brought back to this)."""
    owner, schema = connection.execute(text("SELECT current_user, current_schema()")).one()
    if role == owner:
        raise ValueError(
            f"DATABASE_APP_ROLE: {role} is the role running the migrations; the service must connect as "
            "another role, which does not own the tables"
        )
    quote = connection.dialect.identifier_preparer.quote
    grantee, namespace = quote(role), quote(schema)
    tables = connection.execute(
        text("SELECT tablename FROM pg_tables WHERE schemaname = :schema ORDER BY tablename"), {"schema": schema}
    ).scalars()
    connection.execute(text(f"GRANT USAGE ON SCHEMA {namespace} TO {grantee}"))
    for table in tables:
        name = f"{namespace}.{quote(table)}"
        connection.execute(text(f"REVOKE ALL ON {name} FROM {grantee}"))
        if table in APPEND_ONLY_TABLES:
            # SELECT of the id alone: SQLAlchemy's INSERT ... RETURNING id needs it, and no more.
            privileges = "INSERT, SELECT (id)"
        elif table in READ_ONLY_TABLES:
            privileges = "SELECT"
        else:
            privileges = "SELECT, INSERT, UPDATE, DELETE"
        connection.execute(text(f"GRANT {privileges} ON {name} TO {grantee}"))
    # The id sequences, for the INSERTs above (nextval); never setval.
    connection.execute(text(f"GRANT USAGE ON ALL SEQUENCES IN SCHEMA {namespace} TO {grantee}"))
