"""The `mtls` option: internal callers are known by their client certificate (the seed's
"Internal microservices: mTLS + JWT + RBAC"). See options/mtls/authenticator.py for what is accepted and
options/mtls/tls_peer.py for how the certificate reaches the pipeline when the service terminates TLS.

Settings (environment variables, validated at start; production refuses unsafe ones by name):

- MTLS_MODE: `mtls` (the workload is the principal unless the caller sends its own credential) or
  `mtls+jwt` (the caller's own credential, a bearer token or an API key, is required as well).
- MTLS_IDENTITIES: JSON, identity -> its scopes, e.g. {"spiffe://example.org/ns/a/sa/b": ["orgs:read"]}.
  Required in production. Empty (development and tests only) leaves the option inactive: no
  certificate is asked for, bearer tokens work as in a service baked without it, and a warning
  says so at start.
- MTLS_SERVER_CERT, MTLS_SERVER_KEY, MTLS_CLIENT_CA: files; all three make `serve` terminate TLS
  and require a client certificate signed by the CA bundle.
- MTLS_PROXY_HEADER: the header a trusted proxy (TRUSTED_PROXIES) forwards the verified certificate
  in: `X-Client-Cert` (nginx `$ssl_client_escaped_cert`, the default) or `X-Forwarded-Client-Cert` (Envoy).
- MTLS_PROXY_CLIENT_CA: a file, the CA bundle a forwarded certificate must be issued by, checked
  again here (defence in depth); unset, the proxy's verification is believed.
"""

from __future__ import annotations

import json
import logging
import os
import ssl
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from ...config import ConfigError, Settings, config_error, empty_is_unset
from ...extensions import Extension
from .authenticator import ENVOY_HEADER, NGINX_HEADER, ClientCertificate, ForwardedIssuers, Mode

if TYPE_CHECKING:
    from ...runtime import Runtime

logger = logging.getLogger(__name__)


class MtlsSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MTLS_", env_file=".env", extra="ignore", frozen=True)

    mode: Mode = "mtls"
    identities: Annotated[dict[str, list[str]], NoDecode] = Field(default_factory=dict)
    server_cert: str | None = None
    server_key: str | None = None
    client_ca: str | None = None
    proxy_header: Literal["X-Client-Cert", "X-Forwarded-Client-Cert"] = "X-Client-Cert"
    proxy_client_ca: str | None = None

    @field_validator("proxy_header", mode="before")
    @classmethod
    def _header_name(cls, value: object) -> object:
        names = {NGINX_HEADER.lower(): NGINX_HEADER, ENVOY_HEADER.lower(): ENVOY_HEADER}
        return names.get(value.strip().lower(), value) if isinstance(value, str) else value

    @field_validator("identities", mode="before")
    @classmethod
    def _json(cls, value: object) -> object:
        if isinstance(value, str):
            try:
                return json.loads(value) if value.strip() else {}
            except ValueError:
                raise ValueError('not JSON; e.g. {"spiffe://example.org/ns/a/sa/b": ["orgs:read"]}') from None
        return value

    @field_validator("identities")
    @classmethod
    def _identities(cls, value: dict[str, list[str]]) -> dict[str, list[str]]:
        for identity, scopes in value.items():
            if not identity.strip() or identity != identity.strip():
                raise ValueError(f"{identity!r} is not an identity (a SPIFFE ID or a subject DN)")
            if any(not scope or " " in scope for scope in scopes):
                raise ValueError(f"the scopes of {identity!r} must be names without spaces")
        return value

    _empty_is_unset = empty_is_unset("server_cert", "server_key", "client_ca", "proxy_client_ca")

    @model_validator(mode="after")
    def _all_or_no_tls_files(self) -> MtlsSettings:
        given = [self.server_cert, self.server_key, self.client_ca]
        if any(given) and not all(given):
            raise ValueError("MTLS_SERVER_CERT, MTLS_SERVER_KEY and MTLS_CLIENT_CA: set all three, or none")
        for name, path in (
            ("MTLS_SERVER_CERT", self.server_cert),
            ("MTLS_SERVER_KEY", self.server_key),
            ("MTLS_CLIENT_CA", self.client_ca),
        ):
            if path and not os.path.isfile(path):
                raise ValueError(f"{name}: no such file {path!r}")
        if self.proxy_client_ca:
            try:
                self.forwarded_issuers()
            except OSError:
                raise ValueError(f"MTLS_PROXY_CLIENT_CA: cannot read {self.proxy_client_ca!r}") from None
            except ValueError:
                raise ValueError("MTLS_PROXY_CLIENT_CA: not a PEM bundle of CA certificates") from None
        return self

    def forwarded_issuers(self) -> ForwardedIssuers | None:
        """The CA bundle forwarded certificates are checked against, read now; None when unset."""
        if not self.proxy_client_ca:
            return None
        with open(self.proxy_client_ca, "rb") as bundle:
            return ForwardedIssuers(bundle.read())

    @property
    def terminates_tls(self) -> bool:
        return bool(self.server_cert)


def load_mtls_settings() -> MtlsSettings:
    """The option's settings from the environment, or ConfigError naming each bad variable."""
    try:
        return MtlsSettings()
    except ValidationError as exc:
        raise config_error(exc, lambda field: f"MTLS_{field.upper()}") from None


def settings_problems(settings: Settings) -> list[str]:
    """Added to the core's by load_settings: each invalid setting, and each unsafe one in
    production, named by its variable."""
    try:
        mtls = load_mtls_settings()
    except ConfigError as exc:
        return [str(exc)]
    if not settings.is_production:
        return []
    problems = []
    if not mtls.identities:
        problems.append("MTLS_IDENTITIES: required in production (the workloads allowed to call, with their scopes)")
    if not mtls.terminates_tls and not settings.trusted_proxies:
        problems.append(
            "MTLS_SERVER_CERT or TRUSTED_PROXIES: required in production; no client certificate can reach "
            "the service without one (it terminates TLS itself, or a trusted proxy forwards the certificate)"
        )
    return problems


def extension(runtime: Runtime) -> Extension:
    mtls = load_mtls_settings()
    if not mtls.identities:  # never in production: load_settings refuses it there (settings_problems)
        logger.warning(
            "mtls inactive: MTLS_IDENTITIES is empty, so no client certificate is required",
            extra={"event": "mtls_inactive"},
        )
        return Extension(name="mtls")
    certificate = ClientCertificate(
        identities=mtls.identities,
        mode=mtls.mode,
        proxy_header=mtls.proxy_header,
        forwarded_issuers=mtls.forwarded_issuers(),
    )
    # A channel credential: required on every authenticated request, combined with the caller's.
    return Extension(name="mtls", channels=[certificate])


def server_options(_settings: Settings) -> dict[str, Any]:
    """What `serve` gives uvicorn: with the server files, TLS that requires a client certificate
    signed by MTLS_CLIENT_CA, and the protocol that shows the application which one it was."""
    mtls = load_mtls_settings()
    if not mtls.terminates_tls:
        return {}
    from .tls_peer import PROTOCOL

    return {
        "ssl_certfile": mtls.server_cert,
        "ssl_keyfile": mtls.server_key,
        "ssl_ca_certs": mtls.client_ca,
        "ssl_cert_reqs": ssl.CERT_REQUIRED,
        "http": PROTOCOL,
    }
