"""Orgs and the grants that say who may do what to them."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, HTTPException, Path, Response, status
from sqlalchemy import func, select

from ..db import SessionDep
from ..models import Org, Permission, Relation
from ..security.authn import CurrentPrincipal
from ..security.authz import no_object_policy, require_scopes
from ..security.errors import ProblemDetail
from .deps import OrgOwner, OrgViewer
from .schemas import GrantOut, GrantPut, OrgCreate, OrgOut

router = APIRouter(prefix="/orgs", tags=["orgs"])

Subject = Annotated[str, Path(min_length=1, max_length=255, pattern=r"^[A-Za-z0-9_.:@|-]+$")]


def _org_out(org: Org) -> OrgOut:
    return OrgOut(id=org.id, name=org.name, created_at=org.created_at)


@router.post("", status_code=status.HTTP_201_CREATED, dependencies=[require_scopes("orgs:write"), no_object_policy()])
async def create_org(body: OrgCreate, principal: CurrentPrincipal, session: SessionDep) -> OrgOut:
    """Create an org; the caller becomes its owner."""
    org = Org(name=body.name, created_by=principal.subject)
    session.add(org)
    await session.flush()
    session.add(
        Permission(
            subject=principal.subject,
            resource_type="org",
            resource_id=str(org.id),
            relation=Relation.owner,
            created_by=principal.subject,
        )
    )
    await session.commit()
    return _org_out(org)


@router.get("/{org_id}", dependencies=[require_scopes("orgs:read")])
async def get_org(org_id: OrgViewer, session: SessionDep) -> OrgOut:
    org = await session.get(Org, org_id)
    if org is None:  # a grant outlived its org
        raise HTTPException(404)
    return _org_out(org)


@router.put(
    "/{org_id}/grants/{subject}",
    dependencies=[require_scopes("orgs:write")],
    responses={201: {"model": GrantOut, "description": "Grant created"}},
)
async def put_grant(
    org_id: OrgOwner,
    subject: Subject,
    body: GrantPut,
    principal: CurrentPrincipal,
    session: SessionDep,
    response: Response,
) -> GrantOut:
    """Give `subject` a relation on the org (owner only). 201 when new, 200 when changed."""
    grant = await _grant(session, org_id, subject)
    if grant is None:
        session.add(
            Permission(
                subject=subject,
                resource_type="org",
                resource_id=str(org_id),
                relation=body.relation,
                created_by=principal.subject,
            )
        )
        response.status_code = status.HTTP_201_CREATED
    else:
        if grant.relation == Relation.owner and body.relation != Relation.owner:
            await _keep_one_owner(session, org_id)
        grant.relation = body.relation
    await session.commit()
    return GrantOut(org_id=org_id, subject=subject, relation=body.relation)


@router.delete(
    "/{org_id}/grants/{subject}", status_code=status.HTTP_204_NO_CONTENT, dependencies=[require_scopes("orgs:write")]
)
async def delete_grant(org_id: OrgOwner, subject: Subject, session: SessionDep) -> None:
    grant = await _grant(session, org_id, subject)
    if grant is None:
        raise HTTPException(404)
    if grant.relation == Relation.owner:
        await _keep_one_owner(session, org_id)
    await session.delete(grant)
    await session.commit()


async def _grant(session: SessionDep, org_id: object, subject: str) -> Permission | None:
    return await session.scalar(
        select(Permission).where(
            Permission.resource_type == "org", Permission.resource_id == str(org_id), Permission.subject == subject
        )
    )


async def _keep_one_owner(session: SessionDep, org_id: object) -> None:
    owners = await session.scalar(
        select(func.count()).where(
            Permission.resource_type == "org",
            Permission.resource_id == str(org_id),
            Permission.relation == Relation.owner,
        )
    )
    if (owners or 0) <= 1:
        raise HTTPException(409, ProblemDetail("An org must keep at least one owner."))
