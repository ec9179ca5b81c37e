"""What the running option holds, reached by its routes through the runtime (`Runtime.extension`)."""

from __future__ import annotations

from dataclasses import dataclass

from ...extensions import Extension
from .settings import ApiKeySettings


@dataclass(frozen=True, kw_only=True)
class ApiKeysExtension(Extension):
    settings: ApiKeySettings  # what the running authenticator was built with
