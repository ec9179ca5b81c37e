"""The settings every entry point reads (the service, `check-config`, every command): the core's
(`config.Settings`), your own (`settings.ServiceSettings`, which extends them) and the baked
options', refused together, one line per variable."""

from __future__ import annotations

from . import extensions
from .config import ConfigError, read_settings
from .settings import ServiceSettings


def load_settings() -> ServiceSettings:
    """Read the environment, or raise ConfigError with one line per unsafe or invalid variable."""
    settings = read_settings(ServiceSettings)
    problems = settings.production_problems() + extensions.settings_problems(settings)
    if problems:
        raise ConfigError("; ".join(problems))
    return settings
