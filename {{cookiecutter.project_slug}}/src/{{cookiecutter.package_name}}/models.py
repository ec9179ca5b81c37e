"""The service's own tables (the example domain: orgs and their users), on the template's `Base`
(`tables.py`, whose naming convention keeps migrations predictable)."""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import JSON, DateTime, ForeignKey, Integer, String, UniqueConstraint, Uuid, func
from sqlalchemy.orm import Mapped, mapped_column

from .tables import Base, utc_now


class Org(Base):
    __tablename__ = "orgs"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    name: Mapped[str] = mapped_column(String(100))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now(), default=utc_now)
    created_by: Mapped[str] = mapped_column(String(255))
    # Kept by the database (triggers on org_users, revision 0004); QUOTA_USERS_PER_ORG reads it.
    user_count: Mapped[int] = mapped_column(Integer, server_default="0", default=0)


class OrgUser(Base):
    __tablename__ = "org_users"
    __table_args__ = (UniqueConstraint("org_id", "email", name="uq_org_users_org_id_email"),)

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    org_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("orgs.id", ondelete="CASCADE"), index=True)
    email: Mapped[str] = mapped_column(String(254))
    role: Mapped[str] = mapped_column(String(16))
    metadata_: Mapped[dict[str, str]] = mapped_column("metadata", JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now(), default=utc_now)
