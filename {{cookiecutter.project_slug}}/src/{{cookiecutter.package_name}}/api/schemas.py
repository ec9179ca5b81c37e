"""Request and response bodies of the example API, on the template's input-validation rules
(`security/validation.py`: `Strict` models reject unknown fields, free text is `Text`); every
string and collection is bounded."""

from __future__ import annotations

import uuid
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Generic, TypeVar

from pydantic import (
    BaseModel,
    EmailStr,
    Field,
    StringConstraints,
)

from ..security.fields import ViewsByRelation
from ..security.validation import Strict, Text
from ..tables import Relation

# Unicode general categories refused in free text: Cc controls (C0, DEL and C1 such as U+0085 NEL
# or U+009B CSI), Cf format characters (U+200B zero-width space, U+202E right-to-left override,
# U+FEFF byte order mark), Zl and Zp (U+2028, U+2029 line and paragraph separators), and Cs, lone
# surrogates, which JSON can carry but UTF-8 cannot store.
Name = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=100), Text]
MetadataKey = Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")]
MetadataValue = Annotated[str, StringConstraints(max_length=256), Text]
Metadata = Annotated[dict[MetadataKey, MetadataValue], Field(max_length=20)]


class Role(StrEnum):
    viewer = "viewer"
    editor = "editor"
    admin = "admin"


class OrgCreate(Strict):
    name: Name


class OrgOut(BaseModel):
    id: uuid.UUID
    name: str
    created_at: datetime


class OrgAdminOut(OrgOut):
    """An org as its admins and owners see it: who created it too (a principal id, which a viewer
    has no need to know)."""

    created_by: str


# Field-level authorization (security/fields.py): viewers and editors see OrgOut, admins and owners
# OrgAdminOut.
ORG_VIEWS: ViewsByRelation[OrgOut] = ViewsByRelation({Relation.viewer: OrgOut, Relation.admin: OrgAdminOut})


class GrantPut(Strict):
    relation: Relation


class GrantOut(BaseModel):
    org_id: uuid.UUID
    subject: str
    relation: Relation


class UserCreate(Strict):
    """The seed's CreateUser body."""

    email: EmailStr = Field(max_length=254)
    role: Role = Role.viewer
    metadata: Metadata | None = None


class UserOut(BaseModel):
    id: uuid.UUID
    org_id: uuid.UUID
    email: str
    role: Role
    metadata: dict[str, str]
    created_at: datetime


T = TypeVar("T")

# The deepest page a list serves (ASVS 5.0 V15.1.3): the database reads and skips `offset` rows
# for each page, so an unbounded offset is work a caller chooses. Beyond it: 400.
MAX_OFFSET = 10_000


class Page(BaseModel, Generic[T]):
    items: list[T]
    next_offset: int | None
