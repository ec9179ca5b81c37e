"""Layer 6, input validation: what every request and response body model is built on. Unknown fields
are rejected (`Strict`: no mass assignment), every string is bounded, and every free-text field
is `Text`: normalized to NFC and refusing invisible and control characters (a NUL byte is an error
in PostgreSQL text, newlines in names end up in logs and CSV exports, and bidirectional overrides
or zero-width characters make one name look like another). The models are the routes' own
(`api/schemas.py`); the 400 they produce is `errors.py`'s.
"""

from __future__ import annotations

import unicodedata
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    ValidatorFunctionWrapHandler,
    WrapValidator,
)
from pydantic_core import PydanticCustomError

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


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", str_max_length=1024)
