"""Rate limiting: API responses carry the IETF RateLimit-Policy / RateLimit fields; with --allow-burst
a bounded burst of unauthenticated requests reaches 429 with Retry-After.

The burst spends the scanner's own address quota for the rest of the window, so it runs last and
only when the operator asks for it. It never sends more than MAX_BURST requests.
"""

from __future__ import annotations

import re

import httpx

from . import paths
from .authn import is_problem
from .probe import Scan
from .report import CheckResult, verdict

NAME = "ratelimit"
MAX_BURST = 250
_REMAINING = re.compile(r"""(?:^|;)\s*r=(\d+)""")


def remaining(response: httpx.Response) -> int | None:
    """The smallest `r=` (remaining quota) of the response's RateLimit fields."""
    values = [int(m.group(1)) for field in response.headers.get_list("ratelimit") for m in _REMAINING.finditer(field)]
    return min(values) if values else None


def check(scan: Scan) -> CheckResult:
    problems: list[str] = []
    details: dict[str, object] = {}
    for label, token in (("authenticated", scan.token), ("anonymous", None)):
        response = scan.probe.request("GET", paths.protected_path(), token=token)
        details[label] = {
            "status": response.status_code,
            "ratelimit-policy": response.headers.get_list("ratelimit-policy"),
            "ratelimit": response.headers.get_list("ratelimit"),
        }
        if not response.headers.get("ratelimit-policy") or remaining(response) is None:
            problems.append(f"no RateLimit-Policy/RateLimit fields on an {label} API response")
    if problems or not scan.allow_burst:
        burst = "" if problems else "; burst not tried (pass --allow-burst)"
        return verdict(NAME, problems, f"RateLimit fields on API responses{burst}", **details)
    problems += _burst(scan, details)
    return verdict(
        NAME,
        problems,
        f"RateLimit fields present; 429 with Retry-After after {details['burst_sent']} requests",
        **details,
    )


def _burst(scan: Scan, details: dict[str, object]) -> list[str]:
    """Unauthenticated requests (refused before any token check) until 429, at most MAX_BURST."""
    path = paths.protected_path()
    first = scan.probe.request("GET", path)
    left = remaining(first)
    details["burst_sent"] = 1
    if left is None:
        return ["no RateLimit field to size the burst"]
    if left + 1 > MAX_BURST or left + 1 > scan.probe.remaining:
        return [f"the address quota has {left} requests left, more than a bounded burst ({MAX_BURST}) may send"]
    response = first
    for sent in range(2, left + 3):
        if response.status_code == 429:
            break
        response = scan.probe.request("GET", path)
        details["burst_sent"] = sent
    if response.status_code != 429:
        return [f"no 429 after {details['burst_sent']} requests although the quota said {left} were left"]
    problems = []
    retry_after = response.headers.get("retry-after", "")
    if not retry_after.isdigit() or int(retry_after) < 1:
        problems.append(f"the 429 has no usable Retry-After ({retry_after!r})")
    if not is_problem(response, 429):
        problems.append("the 429 is not a problem document")
    if not response.headers.get("ratelimit"):
        problems.append("the 429 has no RateLimit field")
    details["retry_after"] = retry_after
    return problems
