"""The users of an org (the seed's CreateUser example)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, Request, status
from sqlalchemy import Integer, Select, Table, bindparam, insert, literal, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.sql.dml import ReturningInsert

from ..db import SessionDep
from ..domain import ORG
from ..models import Org, OrgUser
from ..resources import runtime_of
from ..security import quotas
from ..security.errors import ProblemDetail
from ..security.events import privilege_changed
from .deps import CanReadUsers, CanWriteUsers, as_utc
from .schemas import MAX_OFFSET, Page, Role, UserCreate, UserOut

router = APIRouter(prefix="/orgs/{org_id}/users", tags=["users"])

DUPLICATE = "A user with this email already exists in this org."

MAX_PAGE_SIZE = 100


def _user_out(user: OrgUser) -> UserOut:
    return UserOut(
        id=user.id,
        org_id=user.org_id,
        email=user.email,
        role=Role(user.role),
        metadata=user.metadata_,
        created_at=as_utc(user.created_at),
    )


def _insert_user() -> ReturningInsert[datetime]:
    """INSERT ... SELECT: the user, only while its org's `user_count` is below `limit` (the org's
    row locked against other writers on PostgreSQL; on SQLite the statement holds the write lock).
    The database's triggers add the new user to the count (revision 0004)."""
    users, orgs = OrgUser.__table__, Org.__table__
    assert isinstance(users, Table) and isinstance(orgs, Table)
    values = [bindparam(name, None, type_=users.c[name].type) for name in _INSERTED]
    below_limit = (
        select(*values)
        .where(orgs.c.id == bindparam("org_id"), orgs.c.user_count < bindparam("limit", type_=Integer))
        .with_for_update(key_share=True)  # FOR NO KEY UPDATE: the users' foreign key checks still pass
    )
    return insert(users).from_select(list(_INSERTED), below_limit).returning(users.c.created_at)


_INSERTED = ("id", "org_id", "email", "role", "metadata", "created_at")


def _user_exists() -> Select[int]:
    return select(literal(1)).where(OrgUser.org_id == bindparam("org_id"), OrgUser.email == bindparam("email"))


@router.post("", status_code=status.HTTP_201_CREATED, responses={409: {"description": "Duplicate or quota exceeded"}})
async def create_user(org_id: CanWriteUsers, body: UserCreate, request: Request) -> UserOut:
    """One INSERT ... SELECT ... RETURNING that commits by itself (no session: a single statement
    needs no transaction of ours) and inserts nothing when the org holds QUOTA_USERS_PER_ORG users
    already: then 409 for an email the org has, else 409 `quota-exceeded` (security/quotas.py)."""
    runtime = runtime_of(request)
    statements, limit = runtime.statements, runtime.settings.quota_users_per_org
    user = {
        "id": uuid.uuid4(),
        "org_id": org_id,
        "email": body.email.lower(),
        "role": body.role.value,
        "metadata": body.metadata or {},
        "created_at": datetime.now(UTC),
    }
    try:
        inserted = await statements.write(statements.query("insert_user", _insert_user), limit=limit, **user)
    except IntegrityError:
        raise HTTPException(409, ProblemDetail(DUPLICATE)) from None
    if not inserted:
        # The org is full; an email it has already is still answered as the duplicate it is.
        if await statements.fetch(statements.query("user_exists", _user_exists), org_id=org_id, email=user["email"]):
            raise HTTPException(409, ProblemDetail(DUPLICATE))
        raise quotas.exceeded(
            "users_per_org",
            limit,
            what="users per org",
            variable="QUOTA_USERS_PER_ORG",
            resource_type=ORG,
            resource_id=str(org_id),
        )
    # The email is masked in the log like every email (AUDIT_MASKED_FIELDS).
    privilege_changed(
        "user_created",
        resource_type=ORG,
        resource_id=str(org_id),
        user_id=str(user["id"]),
        email=user["email"],
        role=body.role.value,
    )
    return UserOut(
        id=user["id"],
        org_id=org_id,
        email=user["email"],
        role=body.role,
        metadata=user["metadata"],
        created_at=user["created_at"],
    )


@router.get("")
async def list_users(
    org_id: CanReadUsers,
    session: SessionDep,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE_SIZE)] = 20,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
) -> Page[UserOut]:
    rows = await session.scalars(
        select(OrgUser)
        .where(OrgUser.org_id == org_id)
        .order_by(OrgUser.created_at, OrgUser.id)
        .limit(limit + 1)
        .offset(offset)
    )
    users = list(rows)
    more = len(users) > limit
    return Page[UserOut](items=[_user_out(u) for u in users[:limit]], next_offset=offset + limit if more else None)


@router.get("/{user_id}")
async def get_user(org_id: CanReadUsers, user_id: uuid.UUID, session: SessionDep) -> UserOut:
    return _user_out(await _user_in_org(session, org_id, user_id))


@router.delete("/{user_id}", status_code=status.HTTP_204_NO_CONTENT)
async def delete_user(org_id: CanWriteUsers, user_id: uuid.UUID, session: SessionDep) -> None:
    user = await _user_in_org(session, org_id, user_id)
    email, role = user.email, user.role
    await session.delete(user)
    await session.commit()
    privilege_changed(
        "user_deleted", resource_type=ORG, resource_id=str(org_id), user_id=str(user_id), email=email, role=role
    )


async def _user_in_org(session: SessionDep, org_id: uuid.UUID, user_id: uuid.UUID) -> OrgUser:
    """404 for a user of another org: the child must belong to the parent in the path."""
    user = await session.scalar(select(OrgUser).where(OrgUser.id == user_id, OrgUser.org_id == org_id))
    if user is None:
        raise HTTPException(404)
    return user
