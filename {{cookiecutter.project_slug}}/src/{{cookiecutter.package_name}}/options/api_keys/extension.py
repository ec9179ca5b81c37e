"""The `api_keys` option's wiring: its layer-4 authenticator, its routes, its settings' check."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

from sqlalchemy import CursorResult, func, literal, update
from sqlalchemy.ext.asyncio import AsyncSession

from ...config import ConfigError, Settings
from .authenticator import ApiKeys, LastUsed
from .models import ApiKey
from .routes import router
from .running import ApiKeysExtension
from .settings import load_api_key_settings

if TYPE_CHECKING:
    from ...runtime import Runtime

from .cli import add_commands

__all__ = ["add_commands", "extension", "move_issuer", "settings_problems"]


def extension(runtime: Runtime) -> ApiKeysExtension:
    settings = load_api_key_settings(runtime.settings)
    last_used = LastUsed(runtime.engine)
    authenticator = ApiKeys(settings, runtime.statements, runtime.admission, last_used)
    return ApiKeysExtension(
        name="api_keys",
        settings=settings,
        authenticators=[authenticator],
        routers=[router],
        lifespan=last_used.running,
    )


async def move_issuer(session: AsyncSession, old_namespace: str, new_namespace: str) -> int:
    """`grants move-issuer`: keys owned by a principal of the old issuer belong to the same `sub`
    of the new one (who may list, rotate and revoke them); keys owned by another type of
    principal stay. In the caller's transaction; how many keys changed owner."""
    start = len(old_namespace) + 1
    result = await session.execute(
        update(ApiKey)
        .where(ApiKey.owner.startswith(old_namespace, autoescape=True))
        .values(owner=literal(new_namespace) + func.substr(ApiKey.owner, start))
        .execution_options(synchronize_session=False)
    )
    return int(cast(CursorResult[Any], result).rowcount)


def settings_problems(core: Settings) -> list[str]:
    """Added to the core's by load_settings: the API_KEY_* variables that are invalid or unsafe."""
    try:
        load_api_key_settings(core)
    except ConfigError as exc:
        return [str(exc)]
    return []
