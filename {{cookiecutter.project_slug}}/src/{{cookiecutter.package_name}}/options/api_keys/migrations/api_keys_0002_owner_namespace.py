"""API keys: a key's owner is a principal id, `jwt:<issuer key>:<sub>`, not a bare `sub` (ASVS V10.3.3).

Only a bearer token manages keys, so every owner written before this revision is the `sub` of a
token of the issuer trusted then, which the service cannot know: like the core's revision 0003, it
asks (`alembic -x jwt_issuer=<JWT_ISSUER> upgrade heads`) when there are such owners, and changes
nothing without it. The downgrade strips that issuer's namespace again.

Revision ID: api_keys_0002
Revises: api_keys_0001
Create Date: 2026-12-05
"""

import hashlib
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import context, op

revision: str = "api_keys_0002"
down_revision: str | None = "api_keys_0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

api_keys = sa.table("api_keys", sa.column("owner", sa.String))


def _namespace() -> str | None:
    issuer = context.get_x_argument(as_dictionary=True).get("jwt_issuer")
    return f"jwt:{hashlib.sha256(issuer.encode()).hexdigest()[:16]}:" if issuer else None


def _rename(pairs: list[tuple[str, str]]) -> None:
    if pairs:
        statement = sa.update(api_keys).where(api_keys.c.owner == sa.bindparam("old")).values(owner=sa.bindparam("new"))
        op.get_bind().execute(statement, [{"old": old, "new": new} for old, new in pairs])


def _owners() -> list[str]:
    return list(op.get_bind().execute(sa.select(api_keys.c.owner).distinct()).scalars())


def upgrade() -> None:
    bare = [owner for owner in _owners() if not owner.startswith("jwt:")]
    if not bare:
        return
    namespace = _namespace()
    if namespace is None:
        raise RuntimeError(
            f"{len(bare)} API key owner(s) name a token without its issuer; run "
            "`alembic -x jwt_issuer=<the JWT_ISSUER they were issued under> upgrade heads`. Nothing was changed."
        )
    _rename([(owner, namespace + owner) for owner in bare])


def downgrade() -> None:
    namespace = _namespace()
    if namespace is not None:
        _rename([(owner, owner[len(namespace) :]) for owner in _owners() if owner.startswith(namespace)])
