"""The service's HTTP contract as the scan knows it (SPEC §3): where to probe, without importing the app.

A team that replaces the example domain edits this module and `bola.SEEDS`.
"""

from __future__ import annotations

import uuid

LIVE = "/health/live"
READY = "/health/ready"
OPENAPI = "/openapi.json"
API = "/api/v1"
ORGS = f"{API}/orgs"
# Route templates of the example domain, in OpenAPI notation.
ORG = ORGS + "/{org_id}"
GRANT = ORG + "/grants/{subject}"
USERS = ORG + "/users"
USER = USERS + "/{user_id}"
DEPENDENCIES = ("database", "migrations", "redis", "pipeline", "keys")
PROBLEM_MEDIA_TYPE = "application/problem+json"


def protected_path() -> str:
    """A path under the authenticated prefix that names an object nobody holds."""
    return f"{ORGS}/{uuid.uuid4()}"


def unknown_path(prefix: str = "") -> str:
    return f"{prefix}/scan-unknown-{uuid.uuid4().hex[:12]}"
