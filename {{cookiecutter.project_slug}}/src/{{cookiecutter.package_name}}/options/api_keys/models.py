"""The api_keys table: one row per key, holding a keyed hash of its secret, never the secret."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import DateTime, String, func
from sqlalchemy.orm import Mapped, mapped_column

from ...tables import Base

KEY_ID_LENGTH = 16  # hex characters of the public id
HASH_LENGTH = 64  # hex characters of an HMAC-SHA256
SCOPES_LENGTH = 2100  # 32 scopes of up to 64 characters, space-separated
NETWORKS_LENGTH = 1500  # 32 CIDRs of up to 43 characters, space-separated


def _now() -> datetime:
    return datetime.now(UTC)


class ApiKey(Base):
    __tablename__ = "api_keys"

    # The public id, the middle part of the key: what logs, lists and the subject `apikey:<id>` name.
    id: Mapped[str] = mapped_column(String(KEY_ID_LENGTH), primary_key=True)
    owner: Mapped[str] = mapped_column(String(255), index=True)
    name: Mapped[str] = mapped_column(String(100))
    # Space-separated, like a token's `scope` claim (plain text: the request path reads it with the
    # database driver alone, which decodes no JSON).
    scopes: Mapped[str] = mapped_column(String(SCOPES_LENGTH))
    # Space-separated CIDRs the key may be used from (the client address layer 1 decided); empty: anywhere.
    networks: Mapped[str] = mapped_column(String(NETWORKS_LENGTH))
    secret_hash: Mapped[str] = mapped_column(String(HASH_LENGTH))
    # The secret before the last rotation, accepted until previous_expires_at (the overlap window).
    previous_hash: Mapped[str | None] = mapped_column(String(HASH_LENGTH))
    previous_expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now(), default=_now)
    created_by: Mapped[str] = mapped_column(String(255))
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    # Updated at most once a minute per key and replica, off the request path (options/api_keys/authenticator.py).
    last_used_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
