"""The users of an org (the seed's CreateUser example)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, Request, status
from sqlalchemy import Table, bindparam, insert, select
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
    table = OrgUser.__table__
    assert isinstance(table, Table)
    values = {name: bindparam(name, None, type_=table.c[name].type) for name in _INSERTED}
    return insert(table).values(values).returning(table.c.created_at)


_INSERTED = ("id", "org_id", "email", "role", "metadata", "created_at")


@router.post("", status_code=status.HTTP_201_CREATED)
async def create_user(org_id: CanWriteUsers, body: UserCreate, request: Request, session: SessionDep) -> UserOut:
    """The insert and the org's user count in one transaction: 409 for an email the org has
    already, else 409 `quota-exceeded` beyond QUOTA_USERS_PER_ORG (`orgs.user_count`,
    security/quotas.py; its refusal rolls the insert back)."""
    user = {
        "id": uuid.uuid4(),
        "org_id": org_id,
        "email": body.email.lower(),
        "role": body.role.value,
        "metadata": body.metadata or {},
        "created_at": datetime.now(UTC),
    }
    try:
        await session.execute(_insert_user(), user)
    except IntegrityError:
        await session.rollback()
        raise HTTPException(409, ProblemDetail("A user with this email already exists in this org.")) from None
    await quotas.take(
        session,
        Org.user_count,
        Org.id == org_id,
        quota="users_per_org",
        limit=runtime_of(request).settings.quota_users_per_org,
        what="users per org",
        variable="QUOTA_USERS_PER_ORG",
        resource_type=ORG,
        resource_id=str(org_id),
    )
    await session.commit()
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
    await quotas.give_back(session, Org.user_count, Org.id == org_id)
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
