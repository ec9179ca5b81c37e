"""The table of the webhooks option: partners' messages received, one row per (partner, id)."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import BigInteger, DateTime, Integer, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from ...tables import Base


class WebhookEvent(Base):
    """A verified webhook, recorded once: a retry of the same message id finds its row."""

    __tablename__ = "webhook_events"
    __table_args__ = (UniqueConstraint("partner", "webhook_id", name="uq_webhook_events_partner_webhook_id"),)

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    partner: Mapped[str] = mapped_column(String(63))
    webhook_id: Mapped[str] = mapped_column(String(255))
    type: Mapped[str] = mapped_column(String(128))
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=lambda: datetime.now(UTC))
