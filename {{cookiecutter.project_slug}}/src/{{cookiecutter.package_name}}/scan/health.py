"""Health: liveness answers, readiness answers 200 and reports every dependency, and neither says
more than `ok` / `fail` / `not_configured` (no connection string, no exception text)."""

from __future__ import annotations

from . import paths
from .errors import leaks
from .probe import Scan
from .report import CheckResult, verdict

NAME = "health"
STATUSES = ("ok", "fail", "not_configured")


def check(scan: Scan) -> CheckResult:
    problems = []
    live = scan.probe.request("GET", paths.LIVE)
    if live.status_code != 200:
        problems.append(f"{paths.LIVE} answered {live.status_code}")
    ready = scan.probe.request("GET", paths.READY)
    try:
        body = ready.json()
    except ValueError:
        body = None
    checks = body.get("checks") if isinstance(body, dict) else None
    if not isinstance(checks, dict):
        return verdict(NAME, [*problems, f"{paths.READY} answered {ready.status_code} without per-check statuses"], "")
    missing = [name for name in paths.DEPENDENCIES if name not in checks]
    failing = [f"{name} {status}" for name, status in checks.items() if status != "ok" and status != "not_configured"]
    if ready.status_code != 200:
        problems.append(f"not ready ({ready.status_code}): {', '.join(failing) or 'no failing check named'}")
    elif failing:
        problems.append(f"ready, but {', '.join(failing)}")
    if missing:
        problems.append(f"readiness does not report {', '.join(missing)}")
    odd = [name for name, status in checks.items() if status not in STATUSES]
    if odd or leaks(ready.text) or "://" in ready.text:
        problems.append("readiness says more than ok/fail/not_configured")
    unset = [name for name, status in checks.items() if status == "not_configured"]
    note = f" ({', '.join(unset)} not configured)" if unset else ""
    return verdict(NAME, problems, f"live, ready, reports {', '.join(checks)}{note}", checks=checks)
