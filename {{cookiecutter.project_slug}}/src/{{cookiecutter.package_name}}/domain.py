"""The service's own domain as the template's tools read it: the grant commands (`cli.py`), the
scan's object-level (BOLA) checks (`scan/`) and the bench. Owner code: a team that replaces the
example domain (orgs and their users) changes this module, `models.py` and `api/`, and no
template file. Plain data, so the scan can read it without importing the app."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

API = "/api/v1"
# The object type that grants name (the permissions table's resource_type) ...
ORG = "org"
# ... and the example API's routes, in OpenAPI notation.
ORGS = f"{API}/orgs"
ORG_PATH = ORGS + "/{org_id}"
GRANT_PATH = ORG_PATH + "/grants/{subject}"
USERS_PATH = ORG_PATH + "/users"
USER_PATH = USERS_PATH + "/{user_id}"


@dataclass(frozen=True)
class GrantTarget:
    """What `grant` and `revoke-grant` act on: `--<noun> ID` names one object of `resource_type`."""

    resource_type: str
    noun: str
    parse_id: Callable[[str], Any]
    table: str  # the model in models.py whose row must exist before a grant


GRANT_TARGET = GrantTarget(resource_type=ORG, noun="org", parse_id=uuid.UUID, table="Org")


@dataclass(frozen=True)
class Seed:
    """How the scan's first token creates an object (POST to `path`) whose id fills the path
    parameter `parameter`."""

    parameter: str
    path: str
    body: Callable[[], dict[str, Any]]


# In order: each seed's collection may use the ids made before it.
SCAN_SEEDS = (
    Seed("org_id", ORGS, lambda: {"name": f"security-scan {uuid.uuid4().hex[:8]}"}),
    Seed("user_id", USERS_PATH, lambda: {"email": f"scan-{uuid.uuid4().hex[:8]}@example.com"}),
)
# Undone with the first token once the check is over (the org stays: the example API cannot delete one).
SCAN_CLEANUP = (("DELETE", USER_PATH),)
# The routes that take an object id, probed when no OpenAPI document is available.
SCAN_OPERATIONS: tuple[tuple[str, str, dict[str, Any] | None], ...] = (
    ("GET", ORG_PATH, None),
    ("PUT", GRANT_PATH, {"relation": "owner"}),
    ("DELETE", GRANT_PATH, None),
    ("GET", USERS_PATH, None),
    ("POST", USERS_PATH, {"email": "scan-probe@example.com", "role": "admin"}),
    ("GET", USER_PATH, None),
    ("DELETE", USER_PATH, None),
)
# A collection where a token with write scopes may create an object (the scan's CORS and error probes).
CREATE_PATH = ORGS
