"""Layer 4 for partner callers: `Authorization: ApiKey <key>` or `X-API-Key: <key>`.

A key reads `<prefix>_<id>_<secret>`: API_KEY_PREFIX names the service (so secret scanners find
leaked keys), the id is public (16 hex characters), the secret 256 random bits (64 hex characters).
The database keeps HMAC-SHA256(API_KEY_PEPPER, id:secret), never the secret; the secret is random,
so a slow hash would add nothing but cost on every request, and the pepper, kept outside the
database, means a dump alone cannot confirm a guess. Hashes are compared in constant time.

A key resolves to the same `Principal` as a token: subject `apikey:<id>`, the key's scopes. Route
policies, the permissions table and the subject limit (layer 5) apply unchanged. Every refusal is
`InvalidCredentials`, so it is a 401 problem and counts towards the address's lockout.

The cost per request: a replica keeps a key it looked up for API_KEY_CACHE_SECONDS (with Redis
only), and then needs no database; revocation stays effective on the next request on every replica
because revoking also sets the subject's revocation mark in Redis, which the admission script
(admission.py) reads in the round trip every request makes anyway. A cache miss is one indexed
SELECT on the primary key through `Statements`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import ipaddress
import logging
import math
import secrets
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Select, String, bindparam, or_, select, update
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.types import Scope

from ...config import IPNetwork
from ...db import Statements
from ...security.admission import Admission
from ...security.principal import API_KEY_NAMESPACE, InvalidCredentials, Principal
from ...store.core import RemoteStore
from .models import ApiKey
from .settings import ApiKeySettings

SUBJECT_PREFIX = API_KEY_NAMESPACE  # principal.py: the namespaces of principal ids
SCHEME = "ApiKey"
ID_HEX = 16
SECRET_HEX = 64
MAX_KEY_BYTES = 128
CACHE_SIZE = 10_000
LAST_USED_INTERVAL_SECONDS = 60.0  # at most one write per key and replica in this time
FLUSH_INTERVAL_SECONDS = 15.0
_HEX = frozenset(b"0123456789abcdef")

logger = logging.getLogger(__name__)


# --- The key format -------------------------------------------------------------------------


def new_key(prefix: str) -> tuple[str, str, str]:
    """A new key: (its public id, its secret, the whole key to hand out once)."""
    key_id, secret = secrets.token_hex(ID_HEX // 2), secrets.token_hex(SECRET_HEX // 2)
    return key_id, secret, f"{prefix}_{key_id}_{secret}"


def new_secret() -> str:
    return secrets.token_hex(SECRET_HEX // 2)


def secret_hash(pepper: bytes, key_id: str, secret: str) -> str:
    """What the database keeps: HMAC-SHA256 under the pepper, over the id and the secret (a hash
    copied to another row does not match there)."""
    return hmac.new(pepper, f"{key_id}:{secret}".encode(), hashlib.sha256).hexdigest()


def scanner_pattern(prefix: str) -> str:
    """The regular expression that finds this service's keys (gitleaks, detect-secrets, GitHub)."""
    return r"\b" + prefix + r"_[0-9a-f]{16}_[0-9a-f]{64}\b"


def secret_id(stored_hash: str) -> str:
    """Names one secret of a key (its hash's first 16 characters) as the principal's `token_id`, so
    the revocation denylist can refuse that secret alone on every replica (rotation without overlap)."""
    return stored_hash[:16]


def api_key_credential(headers: Iterable[tuple[bytes, bytes]]) -> bytes | None:
    """The key in `Authorization: ApiKey <key>` or `X-API-Key: <key>`: None when neither is sent,
    b"" when the credential is unusable (sent twice, in both places, or empty)."""
    found: bytes | None = None
    for name, value in headers:
        if name == b"x-api-key":
            candidate = value.strip()
        elif name == b"authorization":
            scheme, _, rest = value.partition(b" ")
            if scheme.lower() != b"apikey":
                continue
            candidate = rest.strip()
        else:
            continue
        if found is not None:
            return b""
        found = candidate
    return found


def _parts(prefix: bytes, key: bytes) -> tuple[str, str]:
    """The id and secret of a well-formed key of this service, else InvalidCredentials."""
    if len(key) > MAX_KEY_BYTES:
        raise InvalidCredentials("malformed_api_key")
    parts = key.split(b"_")
    if len(parts) != 3:
        raise InvalidCredentials("malformed_api_key")
    given_prefix, key_id, secret = parts
    if given_prefix != prefix:
        raise InvalidCredentials("wrong_api_key_prefix")
    if len(key_id) != ID_HEX or len(secret) != SECRET_HEX or not _HEX.issuperset(key_id + secret):
        raise InvalidCredentials("malformed_api_key")
    return key_id.decode(), secret.decode()


# --- The lookup -----------------------------------------------------------------------------


def lookup_query() -> Select[*tuple[Any, ...]]:
    return select(
        ApiKey.scopes,
        ApiKey.networks,
        ApiKey.secret_hash,
        ApiKey.previous_hash,
        ApiKey.previous_expires_at,
        ApiKey.created_at,
        ApiKey.expires_at,
        ApiKey.revoked_at,
    ).where(ApiKey.id == bindparam("key_id", None, type_=String))


def as_utc(moment: datetime) -> datetime:
    """SQLite hands timestamps back naive (it stores no offset); they were written in UTC."""
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment


@dataclass(frozen=True, slots=True)
class KnownKey:
    """A key that verified: its principal, its networks, and until when this replica may reuse it."""

    principal: Principal
    networks: tuple[IPNetwork, ...]
    reuse_until: float


class KnownKeys:
    """A bounded LRU of keys that verified, by the SHA-256 of the whole key. An entry ends at its
    reuse time or at the end of its secret's validity (expiry, or the end of a rotation's overlap),
    whichever comes first. Only successes are kept."""

    def __init__(self, size: int = CACHE_SIZE) -> None:
        self.size = size
        self._entries: OrderedDict[bytes, KnownKey] = OrderedDict()

    def get(self, digest: bytes) -> KnownKey | None:
        entry = self._entries.get(digest)
        if entry is None:
            return None
        now = time.time()
        if entry.reuse_until <= now or entry.principal.expires_at <= now:
            del self._entries[digest]
            return None
        self._entries.move_to_end(digest)  # least recently used first out, not first in
        return entry

    def put(self, digest: bytes, entry: KnownKey) -> None:
        self._entries[digest] = entry
        self._entries.move_to_end(digest)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)


class ApiKeys:
    """The `Authenticator` for API keys."""

    challenge = SCHEME

    def __init__(
        self, settings: ApiKeySettings, statements: Statements, admission: Admission, last_used: LastUsed
    ) -> None:
        self.settings = settings
        self.prefix = settings.prefix.encode()
        self.pepper = settings.pepper_bytes()
        self.statements = statements
        self.admission = admission
        self.last_used = last_used
        # Reusing a looked-up key is safe only while revocation reaches every replica through Redis.
        self.reuse_seconds = settings.cache_seconds if isinstance(admission.store, RemoteStore) else 0
        self.known_keys = KnownKeys()
        self.query = statements.query("api_key", lookup_query)

    def known(self, scope: Scope) -> Principal | None:
        """The caller, when its key is one this replica looked up recently (for layer 3's lookahead):
        no I/O, no hashing beyond one SHA-256."""
        key = api_key_credential(scope["headers"])
        if not key or not self.reuse_seconds:
            return None
        entry = self.known_keys.get(hashlib.sha256(key).digest())
        if entry is None or (entry.networks and not _allowed(scope, entry.networks)):
            return None  # refused by layer 4 anyway: spend none of the key's subject limit
        return entry.principal

    async def authenticate(self, scope: Scope) -> Principal | None:
        key = api_key_credential(scope["headers"])
        if key is None:
            return None
        if not key:
            raise InvalidCredentials("malformed_api_key")
        key_id, secret = _parts(self.prefix, key)
        digest = hashlib.sha256(key).digest()
        entry = self.known_keys.get(digest) if self.reuse_seconds else None
        if entry is None:
            entry = await self._look_up(key_id, secret)
            if self.reuse_seconds:
                self.known_keys.put(digest, entry)
        if entry.networks and not _allowed(scope, entry.networks):
            raise InvalidCredentials("api_key_network_not_allowed")
        principal = await self.admission.admit(scope, entry.principal)
        self.last_used.note(key_id)
        return principal

    async def _look_up(self, key_id: str, secret: str) -> KnownKey:
        rows = await self.statements.fetch(self.query, key_id=key_id)
        # The hash is computed whether or not the id exists, so both refusals cost the same.
        presented = secret_hash(self.pepper, key_id, secret)
        if not rows:
            raise InvalidCredentials("unknown_api_key")
        scopes, networks, current, previous, previous_ends, created, expires, revoked = rows[0]
        now = datetime.now(UTC)
        valid_until = as_utc(expires)
        matches_current = hmac.compare_digest(presented, current)
        matches_previous = previous is not None and hmac.compare_digest(presented, previous)
        matched = current
        if not matches_current:
            matched = previous or ""
            if not matches_previous:
                raise InvalidCredentials("wrong_api_key_secret")
            if previous_ends is None or as_utc(previous_ends) <= now:
                raise InvalidCredentials("rotated_api_key_secret")
            valid_until = min(valid_until, as_utc(previous_ends))
        subject = SUBJECT_PREFIX + key_id
        if revoked is not None:
            raise InvalidCredentials("revoked", subject=subject)
        if valid_until <= now:
            raise InvalidCredentials("expired", subject=subject)
        principal = Principal(
            subject=subject,
            scopes=frozenset(scopes.split()),
            token_id=secret_id(matched),
            issued_at=int(as_utc(created).timestamp()),
            expires_at=math.floor(valid_until.timestamp()),
            credential=SCHEME,
        )
        parsed = tuple(ipaddress.ip_network(network, strict=False) for network in networks.split())
        return KnownKey(principal, parsed, time.time() + self.reuse_seconds)


def _allowed(scope: Scope, networks: tuple[IPNetwork, ...]) -> bool:
    client = scope.get("client")
    try:
        address = ipaddress.ip_address(client[0]) if client else None
    except ValueError:
        return False
    if address is None:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address in network for network in networks)


# --- Last use -------------------------------------------------------------------------------


class LastUsed:
    """Records when keys were last used without a write per request: a key is noted at most once
    per LAST_USED_INTERVAL_SECONDS in this replica, and the notes are written in one batch every
    FLUSH_INTERVAL_SECONDS by a background task (and at shutdown)."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self._noted: dict[str, float] = {}  # key id -> monotonic time of its last note
        self._pending: dict[str, datetime] = {}

    def note(self, key_id: str) -> None:
        now = time.monotonic()
        if now - self._noted.get(key_id, -math.inf) < LAST_USED_INTERVAL_SECONDS:
            return
        if len(self._noted) >= CACHE_SIZE:
            self._noted = {k: t for k, t in self._noted.items() if now - t < LAST_USED_INTERVAL_SECONDS}
        self._noted[key_id] = now
        self._pending[key_id] = datetime.now(UTC)

    async def flush(self) -> None:
        """Write the pending notes in one statement batch; a failure is logged and they are dropped
        (a last-used time is informational)."""
        if not self._pending:
            return
        pending, self._pending = self._pending, {}
        statement = (
            update(ApiKey)
            .where(
                ApiKey.id == bindparam("key_id"),
                or_(ApiKey.last_used_at.is_(None), ApiKey.last_used_at < bindparam("used_at")),
            )
            .values(last_used_at=bindparam("used_at"))
            .execution_options(synchronize_session=False)
        )
        try:
            async with self.engine.begin() as connection:
                await connection.execute(
                    statement, [{"key_id": key_id, "used_at": used_at} for key_id, used_at in pending.items()]
                )
        except Exception as exc:
            logger.warning("api key last-use times not written: %s", type(exc).__name__)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        async def loop() -> None:
            while True:
                await asyncio.sleep(FLUSH_INTERVAL_SECONDS)
                await self.flush()

        task = asyncio.create_task(loop())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await self.flush()
