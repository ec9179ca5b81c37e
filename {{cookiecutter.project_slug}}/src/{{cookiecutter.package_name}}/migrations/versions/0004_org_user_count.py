"""Orgs keep their user count: the users-per-org quota reads one row, not the org's users.

`orgs.user_count` is what `QUOTA_USERS_PER_ORG` is checked against (api/users.py inserts a user
only while the count is below the limit, in the insert's own statement). The database keeps the
count: triggers add one for each `org_users` row inserted, take one away for each deleted, and
move it when a row changes org, whoever writes the row (the API, the ORM, an operator's SQL). So
the check costs the same in an org of ten users and one of ten thousand. The upgrade counts each
org's existing users once.

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

ADD = "UPDATE orgs SET user_count = user_count + 1 WHERE id = NEW.org_id"
TAKE = "UPDATE orgs SET user_count = user_count - 1 WHERE id = OLD.org_id"
SQLITE_TRIGGERS = {
    "org_users_counted": f"AFTER INSERT ON org_users BEGIN {ADD}; END",
    "org_users_uncounted": f"AFTER DELETE ON org_users BEGIN {TAKE}; END",
    "org_users_moved": (
        f"AFTER UPDATE OF org_id ON org_users WHEN OLD.org_id IS NOT NEW.org_id BEGIN {TAKE}; {ADD}; END"
    ),
}
POSTGRESQL_FUNCTION = f"""
CREATE FUNCTION org_users_count() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP IN ('DELETE', 'UPDATE') THEN {TAKE}; END IF;
    IF TG_OP IN ('INSERT', 'UPDATE') THEN {ADD}; RETURN NEW; END IF;
    RETURN OLD;
END $$
"""


def upgrade() -> None:
    op.add_column("orgs", sa.Column("user_count", sa.Integer(), server_default="0", nullable=False))
    users_of_org = sa.select(sa.func.count()).where(org_users.c.org_id == orgs.c.id).scalar_subquery()
    op.execute(sa.update(orgs).values(user_count=users_of_org))
    if op.get_context().dialect.name == "postgresql":
        op.execute(POSTGRESQL_FUNCTION)
        op.execute(
            "CREATE TRIGGER org_users_count AFTER INSERT OR DELETE ON org_users "
            "FOR EACH ROW EXECUTE FUNCTION org_users_count()"
        )
        op.execute(
            "CREATE TRIGGER org_users_moved AFTER UPDATE OF org_id ON org_users "
            "FOR EACH ROW WHEN (OLD.org_id IS DISTINCT FROM NEW.org_id) EXECUTE FUNCTION org_users_count()"
        )
    else:
        for name, body in SQLITE_TRIGGERS.items():
            op.execute(f"CREATE TRIGGER {name} {body}")


def downgrade() -> None:
    if op.get_context().dialect.name == "postgresql":
        op.execute("DROP TRIGGER org_users_moved ON org_users")
        op.execute("DROP TRIGGER org_users_count ON org_users")
        op.execute("DROP FUNCTION org_users_count()")
    else:
        for name in SQLITE_TRIGGERS:
            op.execute(f"DROP TRIGGER {name}")
    # ALTER TABLE ... DROP COLUMN on both databases (SQLite >= 3.35): no batch copy of `orgs`,
    # whose drop would cascade to its users.
    op.drop_column("orgs", "user_count")
