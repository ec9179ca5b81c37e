"""The authorization policy of each route of the example API, one alias per row of the SPEC
table: the scopes the token must carry, then the relation the caller must hold on the org in
the path. A route states its policy by naming one of these in its signature."""

import uuid
from datetime import UTC, datetime
from typing import Annotated

from ..models import Relation
from ..security.authz import OrgRow, no_object_policy, read_org, require_org_relation
from ..security.principal import Principal

CanCreateOrg = Annotated[Principal, no_object_policy(scopes=["orgs:write"])]
# The org itself, read with the permission check in one statement.
ReadableOrg = Annotated[OrgRow, read_org(Relation.viewer, scopes=["orgs:read"])]
CanManageGrants = Annotated[uuid.UUID, require_org_relation(Relation.owner, scopes=["orgs:write"])]
CanReadUsers = Annotated[uuid.UUID, require_org_relation(Relation.viewer, scopes=["users:read"])]
CanWriteUsers = Annotated[uuid.UUID, require_org_relation(Relation.admin, scopes=["users:write"])]


def as_utc(moment: datetime) -> datetime:
    """Timestamps leave the API in UTC. SQLite returns them naive (it stores no offset), so a
    created object and the same object read back would otherwise differ."""
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
