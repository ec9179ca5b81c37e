"""Your service's own settings (owner code): the template's `Settings` (`config.py`), extended.

Add a field below; it is read from its environment variable (the field name in upper case) and
validated at start like every setting, and `runtime.settings` carries it. The template never edits
this file, so a template update cannot meet your settings. For example:

    projects_per_org: int = Field(100, ge=1, le=10_000)  # PROJECTS_PER_ORG
"""

from __future__ import annotations

from .config import Settings


class ServiceSettings(Settings):
    """The template's settings and yours; what `startup.load_settings` reads."""
