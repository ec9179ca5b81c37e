"""CORS: disallowed and look-alike origins are never granted, no wildcard, never `*` with credentials.

Each origin is tried twice: a simple request (is it reflected?) and a preflight asking to send an
Authorization header (is the cross-origin call allowed at all?).
"""

from __future__ import annotations

from urllib.parse import urlsplit

import httpx

from . import paths
from .probe import Scan
from .report import CheckResult, verdict

NAME = "cors"
DISALLOWED = ("https://evil.example", "null")


def look_alikes(origin: str) -> list[str]:
    """Origins a sloppy allowlist (prefix, suffix or substring match, scheme- or port-blind) lets through."""
    parts = urlsplit(origin)
    scheme, host = parts.scheme, parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    other_scheme = "http" if scheme == "https" else "https"
    other_port = ":8443" if port != ":8443" else ":9443"
    return [
        f"{scheme}://{host}.evil.example{port}",
        f"{scheme}://evil{host}{port}",
        f"{scheme}://evil.{host}{port}",
        f"{other_scheme}://{host}{port}",
        f"{scheme}://{host}{other_port}",
    ]


def check(scan: Scan) -> CheckResult:
    target = urlsplit(scan.probe.base_url)
    candidates = [*DISALLOWED, *look_alikes(scan.origin or f"{target.scheme}://{target.netloc}")]
    problems: list[str] = []
    tried: dict[str, dict[str, object]] = {}
    for origin in candidates:
        simple = scan.probe.request("GET", paths.LIVE, headers={"Origin": origin})
        preflight = scan.probe.request(
            "OPTIONS",
            paths.ORGS,
            headers={
                "Origin": origin,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization, content-type",
            },
        )
        tried[origin] = {"simple": _grant(simple), "preflight": _grant(preflight), "status": preflight.status_code}
        problems += _refusal_problems(origin, simple, "simple request")
        problems += _refusal_problems(origin, preflight, "preflight")
        if preflight.is_success and "access-control-allow-origin" in preflight.headers:
            problems.append(f"{origin!r}: preflight allows a cross-origin call with a token")
    if scan.origin:
        problems += _allowed_problems(scan)
    allowed = f"; {scan.origin} allowed" if scan.origin else ""
    success = f"{len(candidates)} disallowed or look-alike origins refused, no wildcard{allowed}"
    return verdict(NAME, _unique(problems), success, origins=tried)


def _grant(response: httpx.Response) -> dict[str, str | None]:
    return {
        "allow_origin": response.headers.get("access-control-allow-origin"),
        "allow_credentials": response.headers.get("access-control-allow-credentials"),
    }


def _refusal_problems(origin: str, response: httpx.Response, kind: str) -> list[str]:
    granted = response.headers.get("access-control-allow-origin")
    credentials = response.headers.get("access-control-allow-credentials", "").lower() == "true"
    if granted is None:
        return []
    if granted.strip() == "*":
        problem = f"wildcard Access-Control-Allow-Origin on a {kind}: any site may read the API"
        return [problem + (" with credentials" if credentials else "")]
    if granted == origin:
        return [f"{origin!r} reflected on a {kind}" + (" with credentials" if credentials else "")]
    return []


def _allowed_problems(scan: Scan) -> list[str]:
    assert scan.origin is not None
    response = scan.probe.request("GET", paths.LIVE, headers={"Origin": scan.origin})
    granted = response.headers.get("access-control-allow-origin")
    problems = []
    if granted != scan.origin:
        problems.append(f"the allowed origin {scan.origin!r} is not granted (got {granted!r})")
    if "origin" not in response.headers.get("vary", "").lower():
        problems.append("a granted origin comes without Vary: Origin (caches may serve it to other origins)")
    return problems


def _unique(problems: list[str]) -> list[str]:
    return list(dict.fromkeys(problems))
