"""Issuing, listing, rotating and revoking API keys: the writes, shared by the API and the CLI.

The whole key is returned once, by `issue` and `rotate`, and is never stored or logged; the
database keeps the keyed hash of its secret (options/api_keys/authenticator.py). Revoking, and rotating without
an overlap, also write to Redis, so replicas that reuse a looked-up key refuse it on its next
request (the admission script reads the subject's revocation mark and the secret's denylist entry);
Redis is written before the database commits, so a write Redis cannot take changes nothing and is
reported as an error (StoreUnavailable), never as done; where Redis has replicas, a write no replica
acknowledged in time (NotReplicated, a StoreUnavailable: a failover could lose it) is such a write.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from ...security.revocation import Revocations
from .authenticator import SUBJECT_PREFIX, as_utc, new_key, new_secret, secret_hash, secret_id
from .models import ApiKey
from .settings import ApiKeySettings

SCOPE_PATTERN = r"^[A-Za-z0-9:._-]{1,64}$"
OWNER_PATTERN = r"^[A-Za-z0-9_.:@|-]{1,255}$"  # the subjects a grant may name (grants.SUBJECT_PATTERN)
MAX_SCOPES = 32
MAX_NETWORKS = 32
MAX_OVERLAP_SECONDS = 7 * 86400
# Scopes a key never carries: a key cannot manage keys (a leaked key must not mint its successor).
KEY_MANAGEMENT_SCOPE_PREFIX = "api-keys:"


class KeyRefused(ValueError):
    """A request to issue or rotate a key that is not acceptable. The message is safe to show."""


@dataclass(frozen=True, slots=True)
class KeyInfo:
    """What may be shown about a key: never its secret or hash."""

    id: str
    owner: str
    name: str
    scopes: list[str]
    networks: list[str]
    created_at: datetime
    created_by: str
    expires_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None
    previous_secret_expires_at: datetime | None

    @property
    def subject(self) -> str:
        """The subject its requests act as (grant permissions to it)."""
        return SUBJECT_PREFIX + self.id

    @classmethod
    def of(cls, row: ApiKey) -> KeyInfo:
        def utc(moment: datetime | None) -> datetime | None:
            return None if moment is None else as_utc(moment)

        return cls(
            id=row.id,
            owner=row.owner,
            name=row.name,
            scopes=row.scopes.split(),
            networks=row.networks.split(),
            created_at=as_utc(row.created_at),
            created_by=row.created_by,
            expires_at=as_utc(row.expires_at),
            last_used_at=utc(row.last_used_at),
            revoked_at=utc(row.revoked_at),
            previous_secret_expires_at=utc(row.previous_expires_at),
        )


@dataclass(frozen=True, slots=True)
class IssuedKey:
    """A key just issued or rotated. `key` is the whole key: show it once, never log it."""

    info: KeyInfo
    key: str


def checked_owner(owner: str) -> str:
    if not re.fullmatch(OWNER_PATTERN, owner) or owner.startswith(SUBJECT_PREFIX):
        raise KeyRefused("The owner must be a token subject (not an API key).")
    return owner


def checked_scopes(scopes: Sequence[str]) -> list[str]:
    unique = sorted(set(scopes))
    if not unique or len(unique) > MAX_SCOPES:
        raise KeyRefused(f"A key needs 1 to {MAX_SCOPES} scopes.")
    for scope in unique:
        if not re.fullmatch(SCOPE_PATTERN, scope):
            raise KeyRefused("A scope is 1 to 64 letters, digits and the characters : . _ -")
        if scope.startswith(KEY_MANAGEMENT_SCOPE_PREFIX):
            raise KeyRefused("A key cannot carry the scopes that manage keys.")
    return unique


def checked_networks(networks: Sequence[str]) -> list[str]:
    if len(networks) > MAX_NETWORKS:
        raise KeyRefused(f"At most {MAX_NETWORKS} networks.")
    checked = []
    for network in networks:
        try:
            checked.append(str(ipaddress.ip_network(network.strip(), strict=False)))
        except ValueError:
            raise KeyRefused("Each network is an IP address or a CIDR such as 192.0.2.0/24.") from None
    return sorted(set(checked))


def checked_lifetime(settings: ApiKeySettings, seconds: int | None) -> timedelta:
    maximum = settings.max_lifetime_days * 86400
    if seconds is None:
        return timedelta(days=settings.default_lifetime_days)
    if not 60 <= seconds <= maximum:
        raise KeyRefused(f"A key lives 60 seconds to {maximum} seconds (API_KEY_MAX_LIFETIME_DAYS).")
    return timedelta(seconds=seconds)


async def issue(
    session: AsyncSession,
    settings: ApiKeySettings,
    *,
    owner: str,
    name: str,
    scopes: Sequence[str],
    networks: Sequence[str] = (),
    lifetime_seconds: int | None = None,
    created_by: str,
) -> IssuedKey:
    """A new key owned by `owner`. The caller commits."""
    now = datetime.now(UTC)
    row = ApiKey(
        owner=checked_owner(owner),
        name=name,
        scopes=" ".join(checked_scopes(scopes)),
        networks=" ".join(checked_networks(networks)),
        created_at=now,
        created_by=created_by,
        expires_at=now + checked_lifetime(settings, lifetime_seconds),
    )
    key_id, secret, key = new_key(settings.prefix)
    row.id = key_id
    row.secret_hash = secret_hash(settings.pepper_bytes(), key_id, secret)
    session.add(row)
    await session.flush()
    return IssuedKey(KeyInfo.of(row), key)


async def list_keys(session: AsyncSession, owner: str | None = None) -> list[KeyInfo]:
    """Keys by creation, all of them or one owner's."""
    query = select(ApiKey).order_by(ApiKey.created_at, ApiKey.id)
    if owner is not None:
        query = query.where(ApiKey.owner == owner)
    return [KeyInfo.of(row) for row in await session.scalars(query)]


async def get_key(session: AsyncSession, key_id: str, owner: str | None = None) -> KeyInfo | None:
    row = await _row(session, key_id, owner)
    return None if row is None else KeyInfo.of(row)


async def rotate(
    session: AsyncSession,
    settings: ApiKeySettings,
    revocations: Revocations,
    key_id: str,
    *,
    overlap_seconds: int,
    owner: str | None = None,
) -> IssuedKey | None:
    """A new secret for the key; the current one keeps working for `overlap_seconds` (0: refused
    from the next request on every replica). None when there is no such live key (of `owner`).
    Writes the denylist entries, then commits (see `revoke`)."""
    if not 0 <= overlap_seconds <= MAX_OVERLAP_SECONDS:
        raise KeyRefused(f"The overlap is 0 to {MAX_OVERLAP_SECONDS} seconds.")
    if 0 < overlap_seconds < settings.cache_seconds:
        # A replica may reuse the current secret for API_KEY_CACHE_SECONDS after looking it up.
        raise KeyRefused(f"The overlap is 0 or at least API_KEY_CACHE_SECONDS ({settings.cache_seconds}).")
    row = await _row(session, key_id, owner, for_update=True)
    now = datetime.now(UTC)
    if row is None or row.revoked_at is not None or as_utc(row.expires_at) <= now:
        return None
    # Secrets that stop working now: the current one without an overlap, and a previous one still
    # inside an earlier overlap (a key has at most two secrets).
    ended = [] if overlap_seconds else [row.secret_hash]
    if row.previous_hash is not None and row.previous_expires_at and as_utc(row.previous_expires_at) > now:
        ended.append(row.previous_hash)
    expires_at = as_utc(row.expires_at)
    if overlap_seconds:
        row.previous_hash = row.secret_hash
        row.previous_expires_at = min(now + timedelta(seconds=overlap_seconds), expires_at)
    else:
        row.previous_hash = row.previous_expires_at = None
    secret = new_secret()
    row.secret_hash = secret_hash(settings.pepper_bytes(), row.id, secret)
    info = KeyInfo.of(row)
    # The secrets that end go on the denylist first, inside the transaction: if Redis cannot take
    # them, nothing is changed (StoreUnavailable) and the caller is told so; replicas that reuse a
    # looked-up key would otherwise accept the old secret for up to API_KEY_CACHE_SECONDS.
    try:
        for stored in ended:
            await revocations.revoke_token(info.subject, secret_id(stored), expires_at.timestamp())
    except BaseException:
        await session.rollback()
        raise
    await session.commit()
    return IssuedKey(info, f"{settings.prefix}_{row.id}_{secret}")


async def revoke(session: AsyncSession, revocations: Revocations, key_id: str, *, owner: str | None = None) -> bool:
    """Revoke the key for good; False when there is no such key (of `owner`) not revoked already.

    The key subject's revocation mark goes to Redis inside the transaction, before the commit: when
    Redis cannot take it (StoreUnavailable, StoreBusy) the row is rolled back and the error raised,
    so a revocation either reaches every replica on its next request or is reported as not done
    (a replica reusing a looked-up key would otherwise accept it for API_KEY_CACHE_SECONDS). A mark
    set for a revocation whose commit then fails only refuses the key early; the caller retries."""
    values = {"revoked_at": datetime.now(UTC), "previous_hash": None, "previous_expires_at": None}
    statement = update(ApiKey).where(ApiKey.id == key_id, ApiKey.revoked_at.is_(None))
    if owner is not None:
        statement = statement.where(ApiKey.owner == owner)
    result = await session.execute(statement.values(**values).returning(ApiKey.id))
    revoked = result.first() is not None
    if not revoked:
        await session.rollback()
        return False
    try:
        await revocations.revoke_subject(SUBJECT_PREFIX + key_id)
    except BaseException:
        await session.rollback()
        raise
    await session.commit()
    return True


async def _row(session: AsyncSession, key_id: str, owner: str | None, *, for_update: bool = False) -> ApiKey | None:
    query = select(ApiKey).where(ApiKey.id == key_id)
    if owner is not None:
        query = query.where(ApiKey.owner == owner)
    if for_update:
        query = query.with_for_update()
    row: ApiKey | None = await session.scalar(query)
    return row
