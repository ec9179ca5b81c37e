"""The service's HTTP contract as the scan knows it (SPEC §3): where to probe, without importing the app.

The example domain's routes are the service's own (`domain.py`); the rest is the template's.
"""

from __future__ import annotations

import uuid

from .. import domain

LIVE = "/health/live"
READY = "/health/ready"
OPENAPI = "/openapi.json"
API = domain.API
# Where a token with write scopes may create an object.
ORGS = domain.CREATE_PATH
DEPENDENCIES = ("database", "migrations", "redis", "pipeline", "keys")
PROBLEM_MEDIA_TYPE = "application/problem+json"


def protected_path() -> str:
    """A path under the authenticated prefix that names an object nobody holds."""
    return f"{ORGS}/{uuid.uuid4()}"


def unknown_path(prefix: str = "") -> str:
    return f"{prefix}/scan-unknown-{uuid.uuid4().hex[:12]}"
