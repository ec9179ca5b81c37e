"""The authorization policy of each route of the example API, one alias per row of the SPEC
table: the scopes the token must carry, then the relation the caller must hold on the org in
the path (the template's policy API, `security/authz.py`). A route states its policy by naming
one of these in its signature."""

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated

from ..domain import ORG
from ..models import Org
from ..security.authz import (
    CONFIGURED_STEP_UP,
    Listing,
    StepUp,
    list_with_relation,
    no_object_policy,
    read_with_relation,
    require_relation,
)
from ..security.principal import Principal
from ..tables import Relation


@dataclass(frozen=True, slots=True)
class OrgRow:
    id: uuid.UUID
    name: str
    created_at: datetime
    created_by: str
    relation: Relation  # the caller's, to choose the fields it sees (schemas.ORG_VIEWS)


def org_relation(relation: Relation, *, scopes: list[str], step_up: StepUp | None = None) -> object:
    """The caller holds `relation` (or higher) on the org in the path (`org_id`)."""
    return require_relation(ORG, relation, param="org_id", scopes=scopes, step_up=step_up)


CanCreateOrg = Annotated[Principal, no_object_policy(scopes=["orgs:write"])]
# The org itself, read with the permission check in one statement.
ReadableOrg = Annotated[
    OrgRow,
    read_with_relation(
        ORG,
        Relation.viewer,
        param="org_id",
        scopes=["orgs:read"],
        columns=(Org.id, Org.name, Org.created_at, Org.created_by),
        into=OrgRow,
        with_relation=True,
    ),
]
# The orgs the caller may read (GET /orgs), filtered in the statement that reads them.
ReadableOrgs = Annotated[
    Listing,
    list_with_relation(ORG, Relation.viewer, scopes=["orgs:read"], columns=(Org.id, Org.name, Org.created_at)),
]
# Changing who may do what is sensitive: the user's authentication must be as recent (and as
# strong) as STEP_UP_MAX_AGE_SECONDS / STEP_UP_ACR_VALUES say (README "Step-up"), when set.
CanManageGrants = Annotated[uuid.UUID, org_relation(Relation.owner, scopes=["orgs:write"], step_up=CONFIGURED_STEP_UP)]
CanReadUsers = Annotated[uuid.UUID, org_relation(Relation.viewer, scopes=["users:read"])]
CanWriteUsers = Annotated[uuid.UUID, org_relation(Relation.admin, scopes=["users:write"])]


def as_utc(moment: datetime) -> datetime:
    """Timestamps leave the API in UTC. SQLite returns them naive (it stores no offset), so a
    created object and the same object read back would otherwise differ."""
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
