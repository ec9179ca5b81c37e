"""Orgs keep their user count: the users-per-org quota reads one row, not the org's users.

`orgs.user_count` is what `QUOTA_USERS_PER_ORG` is checked against (security/quotas.py): creating a
user adds one to it in the statement that checks the limit, deleting one takes one away, so the
check costs the same in an org of ten users and one of ten thousand. The upgrade counts each org's
existing users once.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-06
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

orgs = sa.table("orgs", sa.column("id", sa.Uuid), sa.column("user_count", sa.Integer))
org_users = sa.table("org_users", sa.column("org_id", sa.Uuid))


def upgrade() -> None:
    op.add_column("orgs", sa.Column("user_count", sa.Integer(), server_default="0", nullable=False))
    users_of_org = sa.select(sa.func.count()).where(org_users.c.org_id == orgs.c.id).scalar_subquery()
    op.execute(sa.update(orgs).values(user_count=users_of_org))


def downgrade() -> None:
    # ALTER TABLE ... DROP COLUMN on both databases (SQLite >= 3.35): no batch copy of `orgs`,
    # whose drop would cascade to its users.
    op.drop_column("orgs", "user_count")
