"""The API-key settings (API_KEY_*), read from the environment at start like the core settings."""

from __future__ import annotations

import re

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from ...config import SERVICE_NAME, ConfigError, Settings, config_error, empty_is_unset
from ...secret_files import read_secret_file

# Lowercase letters and digits: the key's parts are separated by "_", and a secret scanner's
# pattern stays a plain literal.
PREFIX_PATTERN = r"^[a-z][a-z0-9]{1,31}$"
DEFAULT_PREFIX = re.sub(r"[^a-z0-9]", "", SERVICE_NAME.lower()) or "apikey"
# Outside production only: a known pepper, so development keys survive a restart and the CLI and
# the service agree. Production refuses to start without API_KEY_PEPPER.
DEVELOPMENT_PEPPER = "development-only-api-key-pepper-not-secret"


class ApiKeySettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="API_KEY_", env_file=".env", extra="ignore", frozen=True)

    # The server-side key of the keyed hash: a database dump alone cannot confirm a guessed secret.
    pepper: SecretStr | None = Field(None, min_length=32)
    pepper_file: str | None = None
    prefix: str = DEFAULT_PREFIX
    # How long a replica reuses a key it looked up (0: one indexed SELECT on every request). A revoked
    # key is refused on the next request anyway: revocation also sets a mark in Redis that every
    # request's admission script reads. At most 60, less than the mark's lifetime.
    cache_seconds: int = Field(30, ge=0, le=60)
    default_lifetime_days: int = Field(90, ge=1, le=3650)
    max_lifetime_days: int = Field(365, ge=1, le=3650)
    # A business limit (ASVS 5.0 V2.1.3): the keys one owner may hold that are neither revoked nor
    # expired; issuing one more is 409 `quota-exceeded` (security/quotas.py).
    max_per_owner: int = Field(20, ge=1, le=10_000)

    _empty_is_unset = empty_is_unset("pepper")

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        if not re.fullmatch(PREFIX_PATTERN, value):
            raise ValueError("must be 2 to 32 lowercase letters and digits, starting with a letter")
        return value

    @model_validator(mode="after")
    def _lifetimes(self) -> ApiKeySettings:
        if self.default_lifetime_days > self.max_lifetime_days:
            raise ValueError("API_KEY_DEFAULT_LIFETIME_DAYS must not exceed API_KEY_MAX_LIFETIME_DAYS")
        return self

    def pepper_bytes(self) -> bytes:
        return self.pepper.get_secret_value().encode() if self.pepper else DEVELOPMENT_PEPPER.encode()


def load_api_key_settings(core: Settings) -> ApiKeySettings:
    """The API_KEY_* settings, or ConfigError naming each invalid or unsafe variable."""
    try:
        settings = ApiKeySettings()
        if settings.pepper_file:
            if settings.pepper is not None:
                raise ConfigError("set API_KEY_PEPPER or API_KEY_PEPPER_FILE, not both")
            try:
                value = read_secret_file("api_key_pepper", settings.pepper_file, production=core.is_production)
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
            if len(value) < 32:
                raise ConfigError("API_KEY_PEPPER_FILE: the pepper must be at least 32 characters")
            settings = settings.model_copy(update={"pepper": SecretStr(value)})
    except ValidationError as exc:
        raise config_error(exc, lambda field: f"API_KEY_{field.upper()}") from None
    if core.is_production:
        pepper = settings.pepper.get_secret_value() if settings.pepper else ""
        if len(pepper) < 32:
            raise ConfigError("API_KEY_PEPPER: required in production (at least 32 characters, kept secret)")
    return settings
