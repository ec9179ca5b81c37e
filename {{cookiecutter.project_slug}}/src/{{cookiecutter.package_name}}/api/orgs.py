"""Orgs and the grants that say who may do what to them."""

from __future__ import annotations

from dataclasses import replace
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, Request, Response, status
from sqlalchemy import select

from ..db import SessionDep
from ..domain import ORG
from ..models import Org
from ..resources import runtime_of
from ..security import grants, quotas
from ..security.errors import ProblemDetail
from ..security.events import privilege_changed, security_event
from ..security.principal import CurrentPrincipal
from ..security.ratelimit import limit
from ..tables import Permission, Relation
from .deps import CanCreateOrg, CanManageGrants, ReadableOrg, ReadableOrgs, as_utc
from .schemas import MAX_OFFSET, ORG_VIEWS, GrantOut, GrantPut, OrgAdminOut, OrgCreate, OrgOut, Page

router = APIRouter(prefix="/orgs", tags=["orgs"])

LAST_OWNER = "An org must keep at least one owner."


@router.post("", status_code=status.HTTP_201_CREATED, responses={409: {"description": "Quota exceeded"}})
async def create_org(body: OrgCreate, principal: CanCreateOrg, session: SessionDep, request: Request) -> OrgAdminOut:
    """Create an org; the caller becomes its owner (and is answered the owner's view). 409
    `quota-exceeded` when the caller has created QUOTA_ORGS_PER_SUBJECT orgs already."""
    await quotas.hold(session, "orgs_per_subject", principal.subject)
    org = Org(name=body.name, created_by=principal.subject)
    session.add(org)
    await session.flush()
    await quotas.enforce(
        session,
        select(Org.id).where(Org.created_by == principal.subject),
        quota="orgs_per_subject",
        limit=runtime_of(request).settings.quota_orgs_per_subject,
        what="orgs per subject",
        variable="QUOTA_ORGS_PER_SUBJECT",
        resource_type=ORG,
    )
    session.add(
        Permission(
            subject=principal.subject,
            resource_type=ORG,
            resource_id=str(org.id),
            relation=Relation.owner,
            created_by=principal.subject,
        )
    )
    await session.commit()
    privilege_changed(
        "grant_created", resource_type=ORG, resource_id=str(org.id), grantee=principal.subject, relation="owner"
    )
    return OrgAdminOut(id=org.id, name=org.name, created_at=as_utc(org.created_at), created_by=org.created_by)


@router.get("/{org_id}", response_model=ORG_VIEWS.response_model)
async def get_org(org: ReadableOrg) -> OrgOut:
    """The org, with the fields the caller's relation may see (ORG_VIEWS)."""
    return ORG_VIEWS.view(replace(org, created_at=as_utc(org.created_at)), org.relation)


@router.put(
    "/{org_id}/grants/{subject}",
    dependencies=[limit("10/minute")],
    responses={201: {"model": GrantOut, "description": "Grant created"}},
)
async def put_grant(
    org_id: CanManageGrants,
    subject: grants.GrantSubject,
    body: GrantPut,
    principal: CurrentPrincipal,
    session: SessionDep,
    response: Response,
) -> GrantOut:
    """Give `subject` exactly this relation on the org (owner only): 201 when new, 200 when
    changed. `subject` is a principal id, or the `sub` of a token of JWT_ISSUER (security/grants.py);
    the answer names the principal id. 409 when it would leave the org without an owner; 403 when the caller was demoted
    while the request ran (the owner check is repeated inside the write)."""
    await _org(session, org_id)
    try:
        created = await grants.set_relation(
            session,
            ORG,
            str(org_id),
            subject,
            body.relation,
            granted_by=principal.subject,
            acting_owner=principal.subject,
        )
    except grants.LastOwner:
        raise HTTPException(409, ProblemDetail(LAST_OWNER)) from None
    except grants.GrantRefused as refused:
        raise HTTPException(409, ProblemDetail(str(refused))) from None
    except grants.NoLongerOwner:
        raise _demoted_meanwhile(principal.subject, org_id) from None
    await session.commit()
    privilege_changed(
        "grant_created" if created else "grant_changed",
        resource_type=ORG,
        resource_id=str(org_id),
        grantee=subject,
        relation=body.relation.value,
    )
    if created:
        response.status_code = status.HTTP_201_CREATED
    return GrantOut(org_id=org_id, subject=subject, relation=body.relation)


@router.delete("/{org_id}/grants/{subject}", status_code=status.HTTP_204_NO_CONTENT)
async def delete_grant(
    org_id: CanManageGrants, subject: grants.GrantSubject, principal: CurrentPrincipal, session: SessionDep
) -> None:
    """Revoke the subject's grant (owner only); effective from its next request. 409 for the last
    owner; 403 when the caller was demoted while the request ran."""
    await _org(session, org_id)
    try:
        revoked = await grants.revoke(session, ORG, str(org_id), subject, acting_owner=principal.subject)
    except grants.LastOwner:
        raise HTTPException(409, ProblemDetail(LAST_OWNER)) from None
    except grants.GrantRefused as refused:
        raise HTTPException(409, ProblemDetail(str(refused))) from None
    except grants.NoLongerOwner:
        raise _demoted_meanwhile(principal.subject, org_id) from None
    if not revoked:
        raise HTTPException(404)
    await session.commit()
    privilege_changed("grant_revoked", resource_type=ORG, resource_id=str(org_id), grantee=subject)


def _demoted_meanwhile(subject: str, org_id: object) -> HTTPException:
    security_event(
        "object_denied",
        subject=subject,
        resource_type=ORG,
        resource_id=str(org_id),
        required="owner",
        reason="demoted_during_request",
    )
    return HTTPException(403)


async def _org(session: SessionDep, org_id: object) -> Org:
    """The org of an authorized caller; 404 when a grant outlived its org."""
    org = await session.get(Org, org_id)
    if org is None:
        raise HTTPException(404)
    return org


MAX_PAGE_SIZE = 100


@router.get("")
async def list_orgs(
    orgs: ReadableOrgs,
    session: SessionDep,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE_SIZE)] = 20,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
) -> Page[OrgOut]:
    """The orgs the caller may read: its grants and the orgs, filtered in one statement."""
    statement = orgs.page(order_by=(Org.created_at, Org.id), limit=limit + 1, offset=offset)
    rows = [] if statement is None else (await session.execute(statement)).all()
    items = [OrgOut(id=row[0], name=row[1], created_at=as_utc(row[2])) for row in rows[:limit]]
    return Page[OrgOut](items=items, next_offset=offset + limit if len(rows) > limit else None)
