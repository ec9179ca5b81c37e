"""The service's Alembic revisions: the core's in `versions/`, each baked option's in
`options/<option>/migrations/` (`extensions.migration_locations`). `alembic.ini` names the same
places for the `alembic` command; `tests/test_migrations.py` checks that the two agree."""

from __future__ import annotations

from alembic.config import Config

from .. import extensions

PACKAGE = __package__.rpartition(".")[0]
SCRIPT_LOCATION = f"{PACKAGE}:migrations"
CORE_VERSIONS = f"{PACKAGE}:migrations/versions"


def version_locations() -> list[str]:
    return [CORE_VERSIONS, *extensions.migration_locations()]


def alembic_config(database_url: str | None = None, *, app_role: str | None = None) -> Config:
    """The configuration `alembic upgrade heads` runs with, for code that runs Alembic itself;
    `app_role` as DATABASE_APP_ROLE (roles.py)."""
    config = Config()
    config.set_main_option("script_location", SCRIPT_LOCATION)
    config.set_main_option("version_locations", " ".join(version_locations()))
    config.set_main_option("path_separator", "space")
    if database_url is not None:
        config.set_main_option("sqlalchemy.url", database_url)
    if app_role is not None:
        config.set_main_option("database_app_role", app_role)
    return config
