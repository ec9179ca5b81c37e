"""Request and response bodies. Unknown fields are rejected (no mass assignment) and every
string and collection is bounded."""

from __future__ import annotations

import uuid
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Generic, TypeVar

from pydantic import BaseModel, ConfigDict, EmailStr, Field, StringConstraints

from ..models import Relation

Name = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=100)]
MetadataKey = Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")]
MetadataValue = Annotated[str, StringConstraints(max_length=256)]


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
    metadata: dict[MetadataKey, MetadataValue] | None = Field(default=None, max_length=20)


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
