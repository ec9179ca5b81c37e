"""Layer 7, authorization: the token's scopes, then the caller's relation to the object, asked of
the permissions table. Ownership is never inferred from a path parameter.

Both checks are FastAPI dependencies declared in the route signature, so each route states its
policy in one line and no check is pasted into a handler.
"""

from __future__ import annotations

import uuid
from typing import Any

from fastapi import Depends, HTTPException
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from ..db import SessionDep
from ..models import Permission, Relation
from .authn import CurrentPrincipal, Principal
from .events import security_event


async def relation_of(session: AsyncSession, subject: str, resource_type: str, resource_id: str) -> Relation | None:
    """The subject's relation to one object: one query on the unique (subject, type, id) index."""
    stored = await session.scalar(
        select(Permission.relation).where(
            Permission.subject == subject,
            Permission.resource_type == resource_type,
            Permission.resource_id == resource_id,
        )
    )
    return Relation(stored) if stored else None


def require_scopes(*scopes: str) -> Any:
    """Refuse with 403 unless the token carries every one of `scopes`."""
    needed = frozenset(scopes)

    async def check_scopes(principal: CurrentPrincipal) -> Principal:
        missing = needed - principal.scopes
        if missing:
            security_event("scope_denied", subject=principal.subject, missing=sorted(missing))
            raise HTTPException(403)
        return principal

    check_scopes.required_scopes = needed  # type: ignore[attr-defined]  # read by the route-policy test
    return Depends(check_scopes)


def require_org_relation(relation: Relation) -> Any:
    """Refuse with 403 unless the caller holds `relation` (or higher) on the org in the path.
    The answer is the same whether the org exists or not: no existence oracle."""

    async def check_org(org_id: uuid.UUID, principal: CurrentPrincipal, session: SessionDep) -> uuid.UUID:
        held = await relation_of(session, principal.subject, "org", str(org_id))
        if held is None or held.rank < relation.rank:
            security_event("object_denied", subject=principal.subject, resource_type="org", required=relation.value)
            raise HTTPException(403)
        return org_id

    check_org.object_policy = ("org", relation)  # type: ignore[attr-defined]  # read by the route-policy test
    return Depends(check_org)


def no_object_policy() -> Any:
    """Declares that a route acts on no existing object (e.g. creating one)."""

    async def no_object() -> None:
        return None

    no_object.object_policy = None  # type: ignore[attr-defined]
    return Depends(no_object)
