"""Deprecated aliases of current routes, kept until their sunset (see security/deprecation.py).

Each keeps the exact policy of its successor: same scopes, same object check.
"""

from __future__ import annotations

from datetime import UTC, datetime

from fastapi import APIRouter

from ..security.deprecation import Deprecation
from ..security.errors import PROBLEM_RESPONSES
from . import orgs
from .deps import ReadableOrg
from .schemas import ORG_VIEWS, OrgOut

router = APIRouter(prefix="/api/v0", tags=["legacy"], responses=PROBLEM_RESPONSES)

GET_ORG_V0 = Deprecation(
    since=datetime(2026, 7, 1, tzinfo=UTC),
    sunset=datetime(2027, 7, 1, tzinfo=UTC),
    successor="/api/v1/orgs/{org_id}",
)


@router.get("/orgs/{org_id}", response_model=ORG_VIEWS.response_model, **GET_ORG_V0.route())
async def get_org_v0(org: ReadableOrg) -> OrgOut:
    """The first version of `GET /api/v1/orgs/{org_id}`, with the same views by relation."""
    return await orgs.get_org(org)
