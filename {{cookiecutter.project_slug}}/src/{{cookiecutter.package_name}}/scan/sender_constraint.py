"""Sender-constrained tokens: where the deployment requires them (REQUIRE_SENDER_CONSTRAINED_TOKENS),
a plain bearer token, valid in every other way, is refused with 401 and the DPoP challenge.

The operator gives such a token with `--plain-token` (a token of the same issuer without `cnf`);
without one the check is skipped: a deployment that serves plain bearer tokens by choice passes.
"""

from __future__ import annotations

import os

from . import paths
from .authn import is_problem
from .probe import Scan
from .report import CheckResult, Status, verdict

NAME = "sender-constraint"
PLAIN_TOKEN_VARIABLE = "SCAN_PLAIN_TOKEN"  # noqa: S105  # a variable name, not a token


def check(scan: Scan) -> CheckResult:
    token = getattr(scan.arguments, "plain_token", None) or os.environ.get(PLAIN_TOKEN_VARIABLE)
    if not token:
        return CheckResult(NAME, Status.SKIP, "give --plain-token where sender-constrained tokens are required")
    response = scan.probe.request("GET", paths.protected_path(), token=token)
    challenges = response.headers.get("www-authenticate", "").lower()
    problems = []
    if response.status_code != 401:
        problems.append(f"a plain bearer token was answered {response.status_code}, not 401")
    elif not is_problem(response, 401):
        problems.append("the 401 is not a problem document")
    elif "dpop" not in challenges:
        problems.append("the 401 has no WWW-Authenticate: DPoP challenge")
    return verdict(NAME, problems, "a plain bearer token is refused with 401 and the DPoP challenge")
