"""Security headers on a success and on error responses, graded with the HTTP Observatory's rules."""

from __future__ import annotations

from . import observatory, paths
from .probe import Scan
from .report import CheckResult, verdict

NAME = "headers"
# Any origin the service does not know; the Observatory's CORS test sends one the same way.
FOREIGN_ORIGIN = "https://observatory-probe.invalid"
BANNERS = ("server", "x-powered-by")


def check(scan: Scan) -> CheckResult:
    probes = [
        ("success", paths.LIVE),
        ("not found", paths.unknown_path()),
        ("unauthenticated", paths.protected_path()),
    ]
    problems: list[str] = []
    graded: dict[str, dict[str, object]] = {}
    lowest: observatory.Grade | None = None
    for label, path in probes:
        response = scan.probe.request("GET", path, headers={"Origin": FOREIGN_ORIGIN})
        result = observatory.grade(response.headers, https=scan.probe.https, request_origin=FOREIGN_ORIGIN)
        where = f"{response.status_code} {label}"
        graded[where] = {
            "score": result.score,
            "grade": result.grade,
            "tests": {t.test: {"result": t.result, "modifier": t.modifier, "pass": t.passed} for t in result.tests},
        }
        if label == "success" and not response.is_success:
            problems.append(f"{path} answered {response.status_code}, not a success")
        failures = ", ".join(f"{t.result} ({t.modifier:+d})" for t in result.failures)
        if failures:
            problems.append(f"{where}: {failures}")
        elif result.score < scan.min_score:
            problems.append(f"{where}: score {result.score} ({result.grade}) is below {scan.min_score}")
        banners = [f"{name}: {response.headers[name]}" for name in BANNERS if name in response.headers]
        if banners:
            graded[where]["banners"] = banners
        if lowest is None or result.score < lowest.score:
            lowest = result
    assert lowest is not None
    hsts = "" if scan.probe.https else "; HSTS not graded over plain http"
    summary = f"Observatory score {lowest.score} ({lowest.grade}) on success, 404 and 401 responses{hsts}"
    if problems:
        problems.insert(0, f"Observatory score {lowest.score} ({lowest.grade})")
    return verdict(NAME, problems, summary, responses=graded, lowest_score=lowest.score, grade=lowest.grade)
