"""Request and response bodies. Unknown fields are rejected (no mass assignment), every string
and collection is bounded, and text fields refuse control characters (a NUL byte is an error in
PostgreSQL text, and newlines in names end up in logs and CSV exports)."""

from __future__ import annotations

import uuid
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Generic, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, EmailStr, Field, StringConstraints
from pydantic_core import PydanticCustomError

from ..models import Relation

_CONTROL_CHARACTERS = frozenset(chr(code) for code in (*range(0x20), 0x7F))


def _no_control_characters(value: str) -> str:
    if not _CONTROL_CHARACTERS.isdisjoint(value):
        # A fixed message without context: the value is never part of the error.
        raise PydanticCustomError("control_characters", "String should not contain control characters")
    return value


Text = AfterValidator(_no_control_characters)
Name = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=100), Text]
MetadataKey = Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")]
MetadataValue = Annotated[str, StringConstraints(max_length=256), Text]
Metadata = Annotated[dict[MetadataKey, MetadataValue], Field(max_length=20)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", str_max_length=1024)


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


class Page(BaseModel, Generic[T]):
    items: list[T]
    next_offset: int | None
