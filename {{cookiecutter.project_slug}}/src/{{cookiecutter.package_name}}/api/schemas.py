"""Request and response bodies. Unknown fields are rejected (no mass assignment), every string
and collection is bounded, and every free-text field is `Text`: normalized to NFC and refusing
invisible and control characters (a NUL byte is an error in PostgreSQL text, newlines in names end
up in logs and CSV exports, and bidirectional overrides or zero-width characters make one name look
like another)."""

from __future__ import annotations

import unicodedata
import uuid
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, Generic, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    EmailStr,
    Field,
    StringConstraints,
    ValidatorFunctionWrapHandler,
    WrapValidator,
)
from pydantic_core import PydanticCustomError

from ..models import Relation

# Unicode general categories refused in free text: Cc controls (C0, DEL and C1 such as U+0085 NEL
# or U+009B CSI), Cf format characters (U+200B zero-width space, U+202E right-to-left override,
# U+FEFF byte order mark), Zl and Zp (U+2028, U+2029 line and paragraph separators), and Cs, lone
# surrogates, which JSON can carry but UTF-8 cannot store.
REFUSED_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp", "Cs"})


def _plain_text(value: Any, handler: ValidatorFunctionWrapHandler) -> str:
    """NFC first, so the length limits count the stored characters; then the field's own
    constraints (the handler); then the categories."""
    if isinstance(value, str) and not value.isascii():
        value = unicodedata.normalize("NFC", value)
    text: str = handler(value)
    # Printable ASCII, the common case, is NFC already and in no refused category.
    if text.isascii() and text.isprintable():
        return text
    if any(unicodedata.category(character) in REFUSED_CATEGORIES for character in text):
        # A fixed message without context: the value is never part of the error.
        raise PydanticCustomError("invisible_characters", "String should not contain control or invisible characters")
    return text


# The one free-text type: put it after a field's StringConstraints, `Annotated[str, StringConstraints(...), Text]`.
Text = WrapValidator(_plain_text)
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
