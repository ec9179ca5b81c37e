"""Errors: an unknown route is a 404 problem document, and no error body the scan has seen, here or
in any other check, carries a stack trace, SQL, a file path or a library's own message."""

from __future__ import annotations

import re

from . import paths
from .authn import is_problem
from .probe import Scan
from .report import CheckResult, verdict

NAME = "errors"
LEAKS = {
    "stack trace": re.compile(r"Traceback \(most recent call last\)|File \"[^\"]+\", line \d+"),
    "exception text": re.compile(r"\b[A-Z]\w*(?:Error|Exception): "),
    "library name": re.compile(
        r"\b(?:sqlalchemy|asyncpg|aiosqlite|psycopg2?|sqlite3|starlette|fastapi|pydantic(?:_core)?|uvicorn"
        r"|redis\.exceptions|jwt\.exceptions|errors\.pydantic\.dev)\b",
        re.IGNORECASE,
    ),
    "SQL": re.compile(r"\b(?:SELECT\s.+\sFROM|INSERT\s+INTO|UPDATE\s.+\sSET|DELETE\s+FROM)\b", re.IGNORECASE),
    "file path": re.compile(r"(?:/usr/|/home/|/opt/|/srv/|site-packages|[A-Za-z]:\\\\)|\.py\b"),
}


def leaks(body: str) -> list[str]:
    return [name for name, pattern in LEAKS.items() if pattern.search(body)]


def check(scan: Scan) -> CheckResult:
    problems: list[str] = []
    truncated_json = b'{"name": '
    probes: list[tuple[str, str, str, str | None, bytes | None, int]] = [
        ("unknown route", "GET", paths.unknown_path(), None, None, 404),
        ("unknown API route", "GET", paths.unknown_path(paths.API), scan.token, None, 404),
        ("method not allowed", "DELETE", paths.LIVE, None, None, 405),
        ("malformed id", "GET", f"{paths.ORGS}/not-an-id", scan.token, None, 400),
        ("malformed JSON", "POST", paths.ORGS, scan.token, truncated_json, 400),
    ]
    for label, method, path, token, body, status in probes:
        headers = {"Content-Type": "application/json"} if body is not None else None
        response = scan.probe.request(method, path, token=token, headers=headers, content=body)
        if response.status_code != status:
            problems.append(f"{label}: answered {response.status_code}, not {status}")
        elif not is_problem(response, status):
            problems.append(f"{label}: the {status} is not a problem document")
    for seen in scan.probe.errors_seen:
        found = leaks(seen.body)
        if found:
            problems.append(f"{seen.status} {seen.method} {seen.path}: {', '.join(found)} in the body")
        elif seen.body and seen.method != "HEAD" and not seen.content_type.startswith(paths.PROBLEM_MEDIA_TYPE):
            problems.append(f"{seen.status} {seen.method} {seen.path}: not a problem document ({seen.content_type})")
    examined = len(scan.probe.errors_seen)
    return verdict(NAME, list(dict.fromkeys(problems)), f"{examined} error responses are clean problem documents")
