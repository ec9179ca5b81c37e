"""Typed dependencies so route signatures read like their policy."""

from __future__ import annotations

import uuid
from typing import Annotated

from ..models import Relation
from ..security.authz import require_org_relation

OrgViewer = Annotated[uuid.UUID, require_org_relation(Relation.viewer)]
OrgAdmin = Annotated[uuid.UUID, require_org_relation(Relation.admin)]
OrgOwner = Annotated[uuid.UUID, require_org_relation(Relation.owner)]
