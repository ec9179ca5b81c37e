"""Where token verification keys come from: a PEM public key parsed once, or the issuer's JWKS.

The JWKS is fetched with an async client off the request path: once at start, then every
JWT_JWKS_REFRESH_SECONDS by a background task. A token naming a `kid` the service does not know
may trigger a refetch (a signing key rotated since the last refresh): each unknown `kid` at most
once per JWT_JWKS_MIN_REFETCH_SECONDS (a `kid` looked for and not found is remembered), and all of
them together at most once per UNKNOWN_KID_FETCH_INTERVAL_SECONDS, the requests in between waiting
for that one fetch rather than being refused. So invented `kid`s can neither turn the service into
a JWKS-fetching amplifier nor spend the refetch a real rotation needs: the new key's first token
is verified within a second, however many invented ones came first. A failed fetch keeps the last
good keys.

With neither JWT_PUBLIC_KEY nor JWT_JWKS_URL, JWT_ISSUER alone is enough (OIDC discovery): the
JWKS address is the `jwks_uri` of `<issuer>/.well-known/openid-configuration`, whose `issuer` must be
JWT_ISSUER exactly; it is read again with every scheduled refresh, so a provider that moves its keys
is followed.

A token's own `jku`, `x5u`, `jwk` or `x5c` header is never used: only these sources are trusted.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import httpx
import jwt
from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePublicKey
from cryptography.hazmat.primitives.asymmetric.ed448 import Ed448PublicKey
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from ..config import ConfigError, Settings
from .events import security_event

VerificationKey = RSAPublicKey | EllipticCurvePublicKey | Ed25519PublicKey | Ed448PublicKey

JWKS_TIMEOUT_SECONDS = 3.0
MAX_JWKS_BYTES = 256 * 1024
MAX_JWKS_KEYS = 64
# The most often unknown `kid`s make this process fetch the JWKS, all of them together; ...
UNKNOWN_KID_FETCH_INTERVAL_SECONDS = 1.0
# ... and how many `kid`s looked for and not found it remembers (each for JWT_JWKS_MIN_REFETCH_SECONDS).
ABSENT_KIDS = 4096
# Which key types can verify which algorithms; a JWK of another type is never tried.
_KEY_TYPE_ALGORITHMS = {
    "RSA": {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"},
    "EC": {"ES256", "ES384", "ES512"},
    "OKP": {"EdDSA"},
}

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class TrustedKey:
    """A public key and the algorithms (from the allowlist) it may verify."""

    key: VerificationKey
    algorithms: frozenset[str]


class KeySource(Protocol):
    """The keys the verifier trusts. `generation` changes whenever the set of keys does."""

    @property
    def generation(self) -> int: ...

    def has_keys(self) -> bool: ...

    async def find(self, kid: str | None) -> TrustedKey | None:
        """The trusted key a token's `kid` names, or None. Never consults the token for a key."""
        ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


def key_source(settings: Settings) -> KeySource:
    if settings.uses_discovery:
        return DiscoveredKeys(
            settings.jwt_issuer,
            production=settings.is_production,
            algorithms=frozenset(settings.jwt_algorithms),
            refresh_seconds=settings.jwt_jwks_refresh_seconds,
            min_refetch_seconds=settings.jwt_jwks_min_refetch_seconds,
        )
    if settings.jwt_jwks_url:
        return JwksKeys(
            settings.jwt_jwks_url,
            algorithms=frozenset(settings.jwt_algorithms),
            refresh_seconds=settings.jwt_jwks_refresh_seconds,
            min_refetch_seconds=settings.jwt_jwks_min_refetch_seconds,
        )
    if settings.jwt_public_key:
        return StaticKey(settings.jwt_public_key, algorithms=frozenset(settings.jwt_algorithms))
    raise ValueError("JWT_PUBLIC_KEY or JWT_JWKS_URL is required")


class StaticKey:
    """JWT_PUBLIC_KEY: one key, parsed once at start and again only when its file changes
    (`replace`, called off the request path by secret_files.py). A `kid` has nothing to choose from."""

    def __init__(self, pem: str, *, algorithms: frozenset[str]) -> None:
        self.algorithms = algorithms
        self.generation = 0
        self.key = self._parse(pem)

    def _parse(self, pem: str) -> TrustedKey:
        key = load_pem_public_key(pem.replace("\\n", "\n").strip().encode())
        if not isinstance(key, VerificationKey):
            raise ValueError("JWT_PUBLIC_KEY must be an RSA, EC or EdDSA public key")
        return TrustedKey(key, self.algorithms & _algorithms_for(key))

    def replace(self, pem: str) -> None:
        """Trust this key from now on; tokens cached under the old one are verified again.
        ValueError (the old key stays) when `pem` is not a usable public key."""
        self.key = self._parse(pem)
        self.generation += 1

    def has_keys(self) -> bool:
        return True

    async def find(self, kid: str | None) -> TrustedKey | None:
        return self.key

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None


def _algorithms_for(key: VerificationKey) -> set[str]:
    if isinstance(key, RSAPublicKey):
        return _KEY_TYPE_ALGORITHMS["RSA"]
    if isinstance(key, EllipticCurvePublicKey):
        return _KEY_TYPE_ALGORITHMS["EC"]
    return _KEY_TYPE_ALGORITHMS["OKP"]


class JwksError(Exception):
    """The JWKS could not be fetched or holds no usable key. The message is for the log."""


def parse_jwks(document: Any, allowlist: frozenset[str]) -> dict[str | None, TrustedKey]:
    """The usable signing keys of a JWKS document, by `kid` (None for a key without one).

    Skipped: encryption keys, symmetric and private keys, key types or declared algorithms
    outside the allowlist, and anything PyJWT cannot load.
    """
    if not isinstance(document, Mapping) or not isinstance(document.get("keys"), list):
        raise JwksError("not a JWKS document")
    keys: dict[str | None, TrustedKey] = {}
    for jwk in document["keys"][:MAX_JWKS_KEYS]:
        trusted = _trusted_key(jwk, allowlist)
        if trusted is not None:
            kid = jwk.get("kid")
            keys[kid if isinstance(kid, str) else None] = trusted
    if not keys:
        raise JwksError("no usable signing key")
    return keys


def _trusted_key(jwk: Any, allowlist: frozenset[str]) -> TrustedKey | None:
    if not isinstance(jwk, Mapping) or jwk.get("use", "sig") != "sig" or "d" in jwk:
        return None
    algorithms = allowlist & _KEY_TYPE_ALGORITHMS.get(str(jwk.get("kty")), set())
    declared = jwk.get("alg")
    if declared is not None:
        algorithms &= {declared}
    if not algorithms:
        return None
    try:
        key = jwt.PyJWK(dict(jwk), algorithm=min(algorithms)).key
    except (jwt.PyJWTError, ValueError, TypeError):
        return None
    return TrustedKey(key, frozenset(algorithms)) if isinstance(key, VerificationKey) else None


class JwksKeys:
    """JWT_JWKS_URL: the issuer's key set, cached, refreshed in the background."""

    def __init__(
        self,
        url: str,
        *,
        algorithms: frozenset[str],
        refresh_seconds: float,
        min_refetch_seconds: float,
        timeout_seconds: float = JWKS_TIMEOUT_SECONDS,
    ) -> None:
        self.url = url
        self.algorithms = algorithms
        self.refresh_seconds = refresh_seconds
        self.min_refetch_seconds = min_refetch_seconds
        self.timeout_seconds = timeout_seconds
        self.generation = 0
        self._keys: dict[str | None, TrustedKey] = {}
        self._document: Any = None
        self._client: httpx.AsyncClient | None = None
        self._task: asyncio.Task[None] | None = None
        self._inflight: asyncio.Future[bool] | None = None
        self._kid_fetch: asyncio.Future[None] | None = None
        self._last_kid_refetch = -math.inf
        self.kid_fetch_interval = UNKNOWN_KID_FETCH_INTERVAL_SECONDS
        self._absent: OrderedDict[str, float] = OrderedDict()  # kid -> when a fetch did not find it
        self.client_hook: Callable[[httpx.AsyncClient], None] | None = None  # set by the runtime

    def has_keys(self) -> bool:
        return bool(self._keys)

    async def find(self, kid: str | None) -> TrustedKey | None:
        if kid is None:
            # Without a `kid` only an unambiguous key set can verify the token.
            return next(iter(self._keys.values())) if len(self._keys) == 1 else None
        key = self._keys.get(kid)
        if key is not None:
            return key
        looked = self._absent.get(kid)
        if looked is not None and time.monotonic() - looked < self.min_refetch_seconds:
            return None  # a fetch did not find it a moment ago
        await self._fetch_for_unknown_kid()
        key = self._keys.get(kid)
        if key is None:
            self._absent[kid] = time.monotonic()
            self._absent.move_to_end(kid)
            while len(self._absent) > ABSENT_KIDS:
                self._absent.popitem(last=False)
        return key

    async def _fetch_for_unknown_kid(self) -> None:
        """Join the fetch running, or the next one unknown `kid`s may make (at most one per
        `kid_fetch_interval`), shared by every request that waits for it."""
        if self._inflight is not None:
            await self.refresh()
            return
        if self._kid_fetch is None:
            delay = self._last_kid_refetch + self.kid_fetch_interval - time.monotonic()
            self._kid_fetch = asyncio.ensure_future(self._fetch_after(delay))
        # Shielded, like refresh(): a request that gives up does not cancel the fetch others wait for.
        await asyncio.shield(self._kid_fetch)

    async def _fetch_after(self, delay: float) -> None:
        try:
            if delay > 0:
                await asyncio.sleep(delay)
            self._last_kid_refetch = time.monotonic()
            await self.refresh()
        finally:
            self._kid_fetch = None

    async def refresh(self) -> bool:
        """Fetch the JWKS now, or join the fetch already running. False when it failed."""
        if self._inflight is None:
            self._inflight = asyncio.ensure_future(self._fetch())
            self._inflight.add_done_callback(self._fetch_done)
        # Shielded: a request that gives up does not cancel a fetch others wait for.
        return await asyncio.shield(self._inflight)

    def _fetch_done(self, _future: asyncio.Future[bool]) -> None:
        self._inflight = None

    async def _fetch(self) -> bool:
        try:
            document = await self._download()
            keys = parse_jwks(document, self.algorithms)
        except Exception as exc:  # whatever went wrong, the last good keys keep serving
            reason = str(exc) if isinstance(exc, JwksError) else type(exc).__name__
            security_event("jwks_fetch_failed", reason=reason, keys_kept=len(self._keys))
            return False
        if document != self._document:
            self._document, self._keys = document, keys
            self.generation += 1
            logger.info("jwks loaded", extra={"event": "jwks_loaded", "keys": len(keys)})
        return True

    async def _download(self, url: str | None = None) -> Any:
        if self._client is None:
            self._client = self._new_client()
        async with self._client.stream("GET", url or self.url, headers={"Accept": "application/json"}) as response:
            if response.status_code != 200:
                raise JwksError(f"status {response.status_code}")
            body = bytearray()
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) > MAX_JWKS_BYTES:
                    raise JwksError("document too large")
        return json.loads(body)

    def _new_client(self) -> httpx.AsyncClient:
        # No redirects: the configured URL is the only place keys come from.
        client = httpx.AsyncClient(timeout=self.timeout_seconds, follow_redirects=False)
        if self.client_hook is not None:
            self.client_hook(client)  # tracing (telemetry.py), when on
        return client

    async def start(self) -> None:
        self._client = self._new_client()
        await self.refresh()
        self._task = asyncio.create_task(self._refresh_forever(), name="jwks-refresh")

    async def _refresh_forever(self) -> None:
        ok = self.has_keys()
        while True:
            # Retry sooner while the issuer is unreachable; the last good keys serve meanwhile.
            await asyncio.sleep(self.refresh_seconds if ok else self.min_refetch_seconds)
            ok = await self.refresh()

    async def stop(self) -> None:
        if self._kid_fetch is not None:
            self._kid_fetch.cancel()
        if self._inflight is not None:
            self._inflight.cancel()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._client is not None:
            await self._client.aclose()
            self._client = None


# --- OIDC discovery -------------------------------------------------------------------------

DISCOVERY_PATH = "/.well-known/openid-configuration"


def discovery_url(issuer: str) -> str:
    """OpenID Connect Discovery 1.0 §4: the issuer without a trailing slash, then the well-known path."""
    return issuer.rstrip("/") + DISCOVERY_PATH


class DiscoveryRefused(JwksError):
    """The discovery document is answered but not acceptable (another issuer, no or an unsafe
    jwks_uri): a configuration error, not an outage. The message names the setting."""


def jwks_uri_of(document: Any, issuer: str, *, production: bool) -> str:
    """The `jwks_uri` of an OpenID Provider configuration document, checked against JWT_ISSUER."""
    if not isinstance(document, Mapping):
        raise JwksError("not an OpenID Provider configuration document")
    named = document.get("issuer")
    if named != issuer:
        # OIDC Discovery §4.3: the issuer in the document must be identical to the one asked for.
        shown = repr(named)[:200]
        raise DiscoveryRefused(
            f"JWT_ISSUER: the discovery document at {discovery_url(issuer)} names the issuer {shown}, "
            f"not {issuer!r}; JWT_ISSUER must equal the provider's issuer exactly"
        )
    uri = document.get("jwks_uri")
    if not isinstance(uri, str) or not uri.startswith(("https://", "http://")):
        raise DiscoveryRefused(f"JWT_ISSUER: the discovery document at {discovery_url(issuer)} has no jwks_uri")
    if production and not uri.startswith("https://"):
        raise DiscoveryRefused(
            f"JWT_ISSUER: the discovery document's jwks_uri {uri[:200]!r} is not https://, refused in production"
        )
    return uri


class DiscoveredKeys(JwksKeys):
    """JWT_ISSUER alone: the JWKS found through the issuer's discovery document, then kept and
    refreshed exactly as JWT_JWKS_URL's. The document is read at start and again with the scheduled
    refresh (at most once per JWT_JWKS_REFRESH_SECONDS); while nothing has loaded, retries back off
    from 1 second to JWT_JWKS_MIN_REFETCH_SECONDS, and readiness reports the keys as failing.

    A document that names another issuer, or (in production) a jwks_uri that is not https://, is
    never used: in production the service refuses to start with it."""

    def __init__(
        self,
        issuer: str,
        *,
        production: bool,
        algorithms: frozenset[str],
        refresh_seconds: float,
        min_refetch_seconds: float,
        timeout_seconds: float = JWKS_TIMEOUT_SECONDS,
    ) -> None:
        super().__init__(
            "",
            algorithms=algorithms,
            refresh_seconds=refresh_seconds,
            min_refetch_seconds=min_refetch_seconds,
            timeout_seconds=timeout_seconds,
        )
        self.issuer = issuer
        self.production = production
        self.discovery_url = discovery_url(issuer)
        self.refused: DiscoveryRefused | None = None
        self._discovered_at = -math.inf

    async def _fetch(self) -> bool:
        if not self.url or time.monotonic() - self._discovered_at >= self.refresh_seconds:
            try:
                document = await self._download(self.discovery_url)
                self.url = jwks_uri_of(document, self.issuer, production=self.production)
                self._discovered_at = time.monotonic()
                self.refused = None
            except Exception as exc:  # the last good keys keep serving
                self.refused = exc if isinstance(exc, DiscoveryRefused) else None
                reason = str(exc) if isinstance(exc, JwksError) else type(exc).__name__
                security_event("oidc_discovery_failed", reason=reason, keys_kept=len(self._keys))
                if self.refused is not None or not self.url:
                    return False
        return await super()._fetch()

    async def start(self) -> None:
        await super().start()
        if self.production and self.refused is not None:
            await self.stop()
            raise ConfigError(str(self.refused))

    async def _refresh_forever(self) -> None:
        failures = 0 if self.has_keys() else 1
        while True:
            delay = self.refresh_seconds if not failures else min(self.min_refetch_seconds, 2.0 ** (failures - 1))
            await asyncio.sleep(delay)
            failures = 0 if await self.refresh() else failures + 1
