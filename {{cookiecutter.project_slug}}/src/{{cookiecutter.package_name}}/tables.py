"""The template's tables: the declarative base and its constraint naming convention, the
permissions table that authorization asks, and the audit events. The service's own tables
(`models.py`) build on `Base`."""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import JSON, BigInteger, DateTime, Integer, MetaData, String, UniqueConstraint, func
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


def utc_now() -> datetime:
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
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now(), default=utc_now)
    created_by: Mapped[str] = mapped_column(String(255))


class AuditEvent(Base):
    """One security event (AUDIT_DB_ENABLED). Append-only: the service only INSERTs rows
    (security/audit_sink.py) and the table's triggers refuse UPDATE and DELETE."""

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
