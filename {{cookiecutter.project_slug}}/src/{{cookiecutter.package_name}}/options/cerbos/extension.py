"""The `cerbos` option's settings and its wiring into the running service."""

from __future__ import annotations

import ipaddress
import os
from typing import TYPE_CHECKING

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from ...config import ConfigError, Settings, config_error, empty_is_unset
from ...extensions import Extension

if TYPE_CHECKING:
    from ...runtime import Runtime

LOOPBACK_NAMES = frozenset({"localhost"})


class CerbosSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CERBOS_", env_file=".env", extra="ignore", frozen=True)

    address: str = "127.0.0.1:3593"
    timeout_seconds: float = Field(0.5, gt=0, le=10)
    tls_ca_file: str | None = None
    allow_plaintext: bool = False

    _empty_is_unset = empty_is_unset("tls_ca_file")

    @field_validator("address")
    @classmethod
    def _host_and_port(cls, value: str) -> str:
        host, _, port = value.strip().rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"{value!r} is not host:port, e.g. 127.0.0.1:3593")
        return value.strip()

    @field_validator("tls_ca_file")
    @classmethod
    def _readable(cls, value: str | None) -> str | None:
        if value and not os.path.isfile(value):
            raise ValueError(f"no such file {value!r}")
        return value

    @property
    def host(self) -> str:
        return self.address.rpartition(":")[0].strip("[]")

    @property
    def on_loopback(self) -> bool:
        if self.host in LOOPBACK_NAMES:
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False


def read_settings() -> CerbosSettings:
    try:
        return CerbosSettings()
    except ValidationError as exc:
        raise config_error(exc, lambda field: f"CERBOS_{field.upper()}" if field else "CERBOS_*") from None


def settings_problems(settings: Settings) -> list[str]:
    """Invalid CERBOS_* settings, and in production a PDP reached in plaintext over a network."""
    try:
        cerbos = read_settings()
    except ConfigError as exc:
        return [str(exc)]
    if settings.is_production and not cerbos.on_loopback and not cerbos.tls_ca_file and not cerbos.allow_plaintext:
        return [
            "CERBOS_ADDRESS: names a host other than loopback over plaintext gRPC (whoever sits on the path "
            "can answer every decision with an allow); set CERBOS_TLS_CA_FILE to speak TLS to the PDP, run it "
            "as a sidecar on 127.0.0.1, or set CERBOS_ALLOW_PLAINTEXT=true if the network alone protects it"
        ]
    return []


def extension(runtime: Runtime) -> Extension:
    from .pdp import Pdp

    pdp = Pdp(read_settings(), log_allows=runtime.settings.audit_authz_allows)
    return Extension(name="cerbos", authorizer=pdp, lifespan=pdp.running)
