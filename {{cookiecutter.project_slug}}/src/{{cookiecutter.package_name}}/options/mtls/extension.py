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
- MTLS_PROXY_ADDRESSES: the address(es) of a proxy that terminates the client's TLS and forwards
  the certificate over a plain connection: a sidecar or a proxy on loopback (`127.0.0.1`), or one
  with a fixed address no other host can take. Each is one address; a range is refused (any host
  in it could forward a certificate). Not with MTLS_SERVER_CERT.
- MTLS_PROXY_IDENTITIES: JSON list, the identities (SPIFFE IDs or subject DNs) of proxies that
  connect to the service over its own TLS (MTLS_SERVER_CERT) with their own client certificate,
  e.g. an ingress controller, and forward their client's certificate. Never in MTLS_IDENTITIES.
- MTLS_PROXY_HEADER: the header a forwarding proxy puts the verified certificate in:
  `X-Client-Cert` (nginx `$ssl_client_escaped_cert`, the default) or `X-Forwarded-Client-Cert` (Envoy).
- MTLS_PROXY_CLIENT_CA: a file, the CA bundle a forwarded certificate must be issued by, checked
  again here (defence in depth); unset, the proxy's verification is believed.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import ssl
from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from ...config import ConfigError, Settings, config_error, empty_is_unset
from ...extensions import Extension
from ...security.transport import IPAddress
from .authenticator import ENVOY_HEADER, NGINX_HEADER, ClientCertificate, ForwardedIssuers, ForwardingProxies, Mode

if TYPE_CHECKING:
    from ...runtime import Runtime

logger = logging.getLogger(__name__)

# When `serve` terminates TLS: TLS 1.2 and 1.3 only, and for TLS 1.2 only ECDHE key exchange with an
# AEAD cipher (TLS 1.3's suites are all AEAD). No CBC, no SHA-1 MAC, no static RSA key exchange.
TLS_MINIMUM_VERSION = ssl.TLSVersion.TLSv1_2
TLS_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"


class MtlsSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MTLS_", env_file=".env", extra="ignore", frozen=True)

    mode: Mode = "mtls"
    identities: Annotated[dict[str, list[str]], NoDecode] = Field(default_factory=dict)
    server_cert: str | None = None
    server_key: str | None = None
    client_ca: str | None = None
    proxy_addresses: Annotated[list[str], NoDecode] = Field(default_factory=list)
    proxy_identities: Annotated[list[str], NoDecode] = Field(default_factory=list)
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

    @field_validator("proxy_addresses", mode="before")
    @classmethod
    def _commas(cls, value: object) -> object:
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    @field_validator("proxy_addresses")
    @classmethod
    def _single_addresses(cls, value: list[str]) -> list[str]:
        for item in value:
            try:
                network = ipaddress.ip_network(item, strict=False)
            except ValueError:
                raise ValueError(f"{item!r} is not an IP address") from None
            if network.num_addresses != 1:
                raise ValueError(
                    f"{item} is a range: a forwarded client certificate is believed only from one address "
                    "(a sidecar or a proxy on loopback), since any host in a range could send one; a proxy "
                    "without a fixed address connects over TLS with its own certificate (MTLS_PROXY_IDENTITIES)"
                )
        return value

    @field_validator("proxy_identities", mode="before")
    @classmethod
    def _json_list(cls, value: object) -> object:
        if isinstance(value, str):
            try:
                value = json.loads(value) if value.strip() else []
            except ValueError:
                raise ValueError('not JSON; e.g. ["spiffe://example.org/ns/ingress-nginx/sa/ingress-nginx"]') from None
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
        if self.proxy_addresses and self.terminates_tls:
            raise ValueError(
                "MTLS_PROXY_ADDRESSES: not with MTLS_SERVER_CERT; when serve terminates TLS, a proxy is known by "
                "its own client certificate (MTLS_PROXY_IDENTITIES), never by its address"
            )
        if self.proxy_identities and not self.terminates_tls:
            raise ValueError(
                "MTLS_PROXY_IDENTITIES: only with MTLS_SERVER_CERT, MTLS_SERVER_KEY and MTLS_CLIENT_CA "
                "(a proxy proves its identity at the service's own TLS handshake)"
            )
        both = sorted(set(self.proxy_identities) & set(self.identities))
        if both:
            raise ValueError(
                f"MTLS_PROXY_IDENTITIES: {', '.join(both)} is also in MTLS_IDENTITIES; a proxy forwards its "
                "clients' certificates and is never a caller itself"
            )
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

    def forwarding_proxies(self) -> ForwardingProxies:
        """Whom a forwarded certificate is believed from; addresses as the transport layer reads a
        peer's (`::ffff:127.0.0.1` is `127.0.0.1`)."""
        addresses: list[IPAddress] = []
        for item in self.proxy_addresses:
            address = ipaddress.ip_network(item).network_address
            mapped = address.ipv4_mapped if isinstance(address, ipaddress.IPv6Address) else None
            addresses.append(mapped or address)
        return ForwardingProxies(addresses=addresses, identities=self.proxy_identities)


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
    if not mtls.terminates_tls and not mtls.proxy_addresses:
        problems.append(
            "MTLS_SERVER_CERT or MTLS_PROXY_ADDRESSES: required in production; no client certificate can reach "
            "the service without one (it terminates TLS itself, or a proxy at one address, a sidecar, forwards "
            "the certificate; TRUSTED_PROXIES never makes a forwarded certificate believed)"
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
        proxies=mtls.forwarding_proxies(),
        forwarded_issuers=mtls.forwarded_issuers(),
    )
    # A channel credential: required on every authenticated request, combined with the caller's.
    return Extension(name="mtls", channels=[certificate])


def server_options(_settings: Settings) -> dict[str, Any]:
    """What `serve` gives uvicorn: with the server files, TLS 1.2+ with AEAD suites only that
    requires a client certificate signed by MTLS_CLIENT_CA, and the protocol that shows the
    application which one it was."""
    mtls = load_mtls_settings()
    if not mtls.terminates_tls:
        return {}
    from .tls_peer import PROTOCOL

    return {
        "ssl_certfile": mtls.server_cert,
        "ssl_keyfile": mtls.server_key,
        "ssl_ca_certs": mtls.client_ca,
        "ssl_cert_reqs": ssl.CERT_REQUIRED,
        "ssl_ciphers": TLS_CIPHERS,
        "ssl_context_factory": tls_context,
        "http": PROTOCOL,
    }


def tls_context(_config: object, default: Callable[[], ssl.SSLContext]) -> ssl.SSLContext:
    """uvicorn's context (certificates, client verification, TLS_CIPHERS) with TLS 1.2 as the
    minimum version, which uvicorn has no setting for."""
    context = default()
    context.minimum_version = TLS_MINIMUM_VERSION
    return context
