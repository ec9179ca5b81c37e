"""The `webhooks` option: partners' signed webhooks (Standard Webhooks), the seed's B2B row.

Settings (environment variables, validated at start):

- WEBHOOK_SECRETS, or WEBHOOK_SECRETS_FILE (re-read every SECRET_FILE_REFRESH_SECONDS): a JSON
  object of partner name to its `whsec_` secret, or to a list of secrets during a rotation (none
  set: every webhook is refused, as from an unknown partner);
- WEBHOOK_TOLERANCE_SECONDS (default 300): how far a message's timestamp may be from this clock,
  either way, and so how long its id is remembered against replays;
- WEBHOOK_MAX_BODY_BYTES (default 262144): the largest webhook body read (MAX_BODY_BYTES still
  caps it).

Operators: `webhook-secret generate` prints a new secret to share with a partner; `webhook-secret
list` shows each configured partner's secrets by fingerprint (never the secrets).
"""

from __future__ import annotations

import argparse
import hashlib
import os
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from ...config import ConfigError, Settings, config_error
from ...extensions import Extension
from ...secret_files import read_secret_file
from . import routes as routes
from .authenticator import PartnerSecrets, ReplayGuard, WebhookSignature, parse_secrets
from .outbound import generate_secret

if TYPE_CHECKING:
    from ...runtime import Runtime


class WebhookSettings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", extra="ignore", frozen=True)

    environment: Literal["development", "test", "production"] = "development"
    webhook_secrets: SecretStr | None = None
    webhook_secrets_file: str | None = None
    webhook_tolerance_seconds: int = Field(300, ge=30, le=3600)
    webhook_max_body_bytes: int = Field(262_144, ge=1024)

    @model_validator(mode="before")
    @classmethod
    def _secrets_from_file(cls, data: object) -> object:
        if not isinstance(data, dict) or not data.get("webhook_secrets_file"):
            return data
        if data.get("webhook_secrets") not in (None, ""):
            raise ValueError("set WEBHOOK_SECRETS or WEBHOOK_SECRETS_FILE, not both")
        production = data.get("environment") == "production"
        text = read_secret_file("webhook_secrets", str(data["webhook_secrets_file"]), production=production)
        return {**data, "webhook_secrets": text}

    @field_validator("webhook_secrets")
    @classmethod
    def _valid_secrets(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and value.get_secret_value().strip():
            parse_secrets(value.get_secret_value())  # ValueError names the partner, never a secret
            return value
        return None

    @property
    def partners(self) -> PartnerSecrets:
        text = self.webhook_secrets.get_secret_value() if self.webhook_secrets else "{}"
        return PartnerSecrets(parse_secrets(text))


def load_webhook_settings(environment: str) -> WebhookSettings:
    """The option's settings in the service's ENVIRONMENT, or ConfigError naming each variable that is wrong."""
    try:
        settings = WebhookSettings(environment=environment)
    except ValidationError as exc:
        # A field's error names its variable; the file's errors name WEBHOOK_SECRETS_FILE themselves.
        raise config_error(exc, str.upper) from None
    return settings


def extension(runtime: Runtime) -> Extension:
    settings = load_webhook_settings(runtime.settings.environment)
    secrets = settings.partners
    if settings.webhook_secrets_file and settings.webhook_secrets:
        runtime.secret_files.watch(
            "webhook_secrets",
            settings.webhook_secrets_file,
            settings.webhook_secrets.get_secret_value(),
            secrets.replace,
        )
    authenticator = WebhookSignature(
        secrets,
        ReplayGuard(runtime.store, settings.webhook_tolerance_seconds),
        tolerance_seconds=settings.webhook_tolerance_seconds,
        max_body_bytes=min(settings.webhook_max_body_bytes, runtime.settings.max_body_bytes),
    )
    return Extension(name="webhooks", authenticators=[authenticator], routers=[routes.router])


def generate(_args: argparse.Namespace) -> int:
    """Print a new secret; add it to WEBHOOK_SECRETS next to the partner's current one to rotate."""
    print(generate_secret())
    return 0


def fingerprint(key: bytes) -> str:
    """Names a secret in output and logs: the start of its SHA-256, which reveals nothing of it."""
    return hashlib.sha256(key).hexdigest()[:12]


def settings_problems(core: Settings) -> list[str]:
    """Added to the core's by load_settings: the WEBHOOK_* variables that are invalid or unsafe."""
    try:
        load_webhook_settings(core.environment)
    except ConfigError as exc:
        return [str(exc)]
    return []


def list_secrets(_args: argparse.Namespace) -> int:
    """Each partner of WEBHOOK_SECRETS(_FILE) with its secrets' fingerprints, to check a rotation."""
    settings = load_webhook_settings(os.environ.get("ENVIRONMENT", "development"))
    partners = settings.partners.partners
    if not partners:
        print("no partners: WEBHOOK_SECRETS is not set, so every webhook is refused")
    for partner, keys in sorted(partners.items()):
        print(f"{partner}: {len(keys)} secret(s): {', '.join(fingerprint(key) for key in keys)}")
    return 0


def add_commands(commands: argparse._SubParsersAction[Any]) -> None:
    secret = commands.add_parser("webhook-secret", help="partners' webhook secrets").add_subparsers(
        dest="action", required=True
    )
    secret.add_parser("generate", help="print a new whsec_ secret to share with a partner").set_defaults(
        handler=generate
    )
    secret.add_parser("list", help="the partners and their secrets' fingerprints (never the secrets)").set_defaults(
        handler=list_secrets
    )
