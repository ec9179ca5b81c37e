"""Check results and the two ways to print them: one line per check, or JSON."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any

MAX_REASONS = 3


class Status(StrEnum):
    PASS = "PASS"  # noqa: S105  # a verdict, not a password
    FAIL = "FAIL"
    SKIP = "SKIP"  # the check could not run with the inputs given (e.g. BOLA without a second token)


@dataclass
class CheckResult:
    name: str
    status: Status
    reason: str
    details: dict[str, Any] = field(default_factory=dict)


def verdict(name: str, problems: Sequence[str], success: str, **details: Any) -> CheckResult:
    """FAIL naming the first problems, or PASS with `success`."""
    if not problems:
        return CheckResult(name, Status.PASS, success, details)
    reason = "; ".join(problems[:MAX_REASONS])
    if len(problems) > MAX_REASONS:
        reason += f" (and {len(problems) - MAX_REASONS} more)"
    return CheckResult(name, Status.FAIL, reason, {**details, "problems": list(problems)})


def failed(results: Sequence[CheckResult]) -> bool:
    return any(result.status is Status.FAIL for result in results)


def render_text(results: Sequence[CheckResult], target: str, requests: int, notes: Sequence[str] = ()) -> str:
    width = max(len(result.name) for result in results)
    lines = [f"security self-scan of {target}"]
    lines += [f"{result.status.value} {result.name:<{width}}  {result.reason}" for result in results]
    lines += [f"note: {note}" for note in notes]
    outcome = "FAILED" if failed(results) else "passed"
    lines.append(f"{outcome}: {sum(r.status is Status.FAIL for r in results)} failing, {requests} requests sent")
    return "\n".join(lines)


def render_json(results: Sequence[CheckResult], target: str, requests: int, notes: Sequence[str] = ()) -> str:
    document = {
        "target": target,
        "passed": not failed(results),
        "requests": requests,
        "checks": [{**asdict(result), "status": result.status.value} for result in results],
        "notes": list(notes),
    }
    return json.dumps(document, indent=2, sort_keys=False, default=str)
