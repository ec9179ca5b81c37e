"""Principal namespaces: grants name `jwt:<issuer key>:<sub>`, not a bare `sub` (ASVS V10.3.3).

Before this revision a token's principal was its bare `sub`, which an API key (`apikey:<id>`), a
webhook partner (`webhook:<partner>`), a workload (SPIFFE ID, DN) or another issuer's user could
share. A bare subject in the permissions table names a token of whichever issuer the service
trusted when the grant was made; the service cannot know which, so this revision asks:

    alembic -x jwt_issuer=<JWT_ISSUER the grants were made under> upgrade heads

It then prefixes every bare subject with that issuer's namespace (security/principal.py). Rows
that already name a principal id of another type (`apikey:`, `webhook:`, `spiffe://`, a DN such
as `CN=...`, or `jwt:`) are left as they are. A database with no bare subject (a new one) needs no
argument; one with bare subjects and no argument is refused, changing nothing. The downgrade
strips the namespace of that same issuer (`-x jwt_issuer=...`), leaving other issuers' rows.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-05
"""

import hashlib
import re
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import context, op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# As security/principal.py names them when this revision was written (kept here: a migration must
# not change when the service's code does).
NAMESPACED = ("jwt:", "apikey:", "webhook:", "spiffe://")
DISTINGUISHED_NAME = re.compile(r"(?:[A-Za-z][A-Za-z0-9-]*|[0-9]+(?:\.[0-9]+)+)=")
BATCH = 500

permissions = sa.table("permissions", sa.column("subject", sa.String))


def _namespace(issuer: str) -> str:
    return f"jwt:{hashlib.sha256(issuer.encode()).hexdigest()[:16]}:"


def _issuer() -> str | None:
    issuer = context.get_x_argument(as_dictionary=True).get("jwt_issuer")
    return issuer or None


def _bare(subject: str) -> bool:
    return not subject.startswith(NAMESPACED) and DISTINGUISHED_NAME.match(subject) is None


def _rename(pairs: list[tuple[str, str]]) -> None:
    statement = (
        sa.update(permissions).where(permissions.c.subject == sa.bindparam("old")).values(subject=sa.bindparam("new"))
    )
    for start in range(0, len(pairs), BATCH):
        op.get_bind().execute(statement, [{"old": old, "new": new} for old, new in pairs[start : start + BATCH]])


def upgrade() -> None:
    subjects = op.get_bind().execute(sa.select(permissions.c.subject).distinct()).scalars().all()
    bare = [subject for subject in subjects if _bare(subject)]
    if not bare:
        return
    issuer = _issuer()
    if issuer is None:
        raise RuntimeError(
            f"{len(bare)} subject(s) in the permissions table name a token without its issuer; run "
            "`alembic -x jwt_issuer=<the JWT_ISSUER they were granted under> upgrade heads` "
            "(README: Authorization, Changing the issuer). Nothing was changed."
        )
    namespace = _namespace(issuer)
    too_long = [subject for subject in bare if len(namespace + subject) > 255]
    if too_long:
        raise RuntimeError(f"{len(too_long)} subject(s) are too long to carry their issuer's namespace")
    _rename([(subject, namespace + subject) for subject in bare])


def downgrade() -> None:
    issuer = _issuer()
    if issuer is None:
        return  # nothing can be told apart without the issuer: the rows stay namespaced
    namespace = _namespace(issuer)
    subjects = op.get_bind().execute(sa.select(permissions.c.subject).distinct()).scalars().all()
    _rename([(subject, subject[len(namespace) :]) for subject in subjects if subject.startswith(namespace)])
