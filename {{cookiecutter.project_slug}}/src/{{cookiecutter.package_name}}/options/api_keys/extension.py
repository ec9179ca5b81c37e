"""The `api_keys` option's wiring: its layer-4 authenticator, its routes, its settings' check."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ...config import ConfigError, Settings
from .authenticator import ApiKeys, LastUsed
from .routes import router
from .running import ApiKeysExtension
from .settings import load_api_key_settings

if TYPE_CHECKING:
    from ...runtime import Runtime

from .cli import add_commands

__all__ = ["add_commands", "extension", "settings_problems"]


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


def settings_problems(core: Settings) -> list[str]:
    """Added to the core's by load_settings: the API_KEY_* variables that are invalid or unsafe."""
    try:
        load_api_key_settings(core)
    except ConfigError as exc:
        return [str(exc)]
    return []
