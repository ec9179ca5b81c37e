"""Tables. Constraint names follow one convention so migrations stay predictable."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    ForeignKey,
    Integer,
    MetaData,
    String,
    UniqueConstraint,
    Uuid,
    func,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Relation(StrEnum):
    """What a subject may do to an object. Each relation includes the ones below it."""

    viewer = "viewer"
    editor = "editor"
    admin = "admin"
    owner = "owner"

    @property
    def rank(self) -> int:
        return _RANK[self]

    def at_least(self) -> list[Relation]:
        """This relation and every relation above it."""
        return [relation for relation in Relation if relation.rank >= self.rank]


_RANK = {Relation.viewer: 1, Relation.editor: 2, Relation.admin: 3, Relation.owner: 4}


def _now() -> datetime:
    # UTC, so that SQLite, which stores no offset, hands back naive UTC that as_utc() can label.
    return datetime.now(UTC)


class Permission(Base):
    """One relation of one subject on one object. Authorization asks only this table."""

    __tablename__ = "permissions"
    __table_args__ = (
        # One index serves both lookups: a subject's relation to an object (all three columns)
        # and an object's grants, e.g. counting its owners (the leading two).
        UniqueConstraint("resource_type", "resource_id", "subject", name="uq_permissions_resource_subject"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    subject: Mapped[str] = mapped_column(String(255))
    resource_type: Mapped[str] = mapped_column(String(64))
    resource_id: Mapped[str] = mapped_column(String(64))
    relation: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now(), default=_now)
    created_by: Mapped[str] = mapped_column(String(255))


class Org(Base):
    __tablename__ = "orgs"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    name: Mapped[str] = mapped_column(String(100))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now(), default=_now)
    created_by: Mapped[str] = mapped_column(String(255))


class OrgUser(Base):
    __tablename__ = "org_users"
    __table_args__ = (UniqueConstraint("org_id", "email", name="uq_org_users_org_id_email"),)

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    org_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("orgs.id", ondelete="CASCADE"), index=True)
    email: Mapped[str] = mapped_column(String(254))
    role: Mapped[str] = mapped_column(String(16))
    metadata_: Mapped[dict[str, str]] = mapped_column("metadata", JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now(), default=_now)


class AuditEvent(Base):
    """One security event (AUDIT_DB_ENABLED). Append-only: the service only INSERTs rows
    (security/audit.py, AuditSink) and the table's triggers refuse UPDATE and DELETE."""

    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    occurred_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    trace_id: Mapped[str] = mapped_column(String(32), index=True)
    event: Mapped[str] = mapped_column(String(64))
    level: Mapped[str] = mapped_column(String(16))
    subject: Mapped[str | None] = mapped_column(String(255))
    client: Mapped[str | None] = mapped_column(String(64))
    route: Mapped[str | None] = mapped_column(String(255))
    details: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
