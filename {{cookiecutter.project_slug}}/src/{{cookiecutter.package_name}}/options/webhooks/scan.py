"""Signed webhooks: an unsigned, a forged, a stale, a future and a replayed webhook are each
answered 401 with a problem document.

With `--webhook-partner` and its secret (`SCAN_WEBHOOK_SECRET`, or `--webhook-secret`), the scan
sends one correctly signed message (type `scan.probe`, recorded by the instance like any other),
which must be accepted, then the same message again, which must be refused as a replay, and
correctly signed messages with timestamps two hours off, which must be refused as stale or future.
Without a secret only the unsigned and forged cases can be proved, and the check is skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import httpx

from ...scan.authn import is_problem
from ...scan.probe import Scan
from ...scan.report import CheckResult, Status, verdict
from .outbound import generate_secret, new_message_id, sign

NAME = "webhooks"
DEFAULT_PATH = "/api/v1/webhooks"
DEFAULT_PARTNER = "scan"
# Further off than the largest WEBHOOK_TOLERANCE_SECONDS the service accepts (3600).
OFF_BY_SECONDS = 7200


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--webhook-partner",
        default=os.environ.get("SCAN_WEBHOOK_PARTNER"),
        help="a partner in WEBHOOK_SECRETS (or SCAN_WEBHOOK_PARTNER)",
    )
    parser.add_argument(
        "--webhook-secret",
        default=os.environ.get("SCAN_WEBHOOK_SECRET"),
        help="that partner's whsec_ secret, to sign the replay and stale cases (prefer SCAN_WEBHOOK_SECRET)",
    )
    parser.add_argument("--webhook-path", default=DEFAULT_PATH, help=f"the webhook route's prefix ({DEFAULT_PATH})")


def check(scan: Scan) -> CheckResult:
    arguments = scan.arguments
    partner = getattr(arguments, "webhook_partner", None) or DEFAULT_PARTNER
    secret = getattr(arguments, "webhook_secret", None)
    path = f"{(getattr(arguments, 'webhook_path', None) or DEFAULT_PATH).rstrip('/')}/{partner}"
    body = json.dumps({"type": "scan.probe", "data": {}}).encode()
    problems: list[str] = []
    cases: dict[str, int] = {}

    def post(name: str, headers: dict[str, str]) -> httpx.Response:
        response = scan.probe.request(
            "POST", path, content=body, headers={**headers, "Content-Type": "application/json"}
        )
        cases[name] = response.status_code
        return response

    def expect_401(name: str, headers: dict[str, str]) -> None:
        response = post(name, headers)
        if response.status_code != 401:
            problems.append(f"{name}: answered {response.status_code}, not 401")
        elif not is_problem(response, 401):
            problems.append(f"{name}: the 401 is not a problem document")

    now = int(time.time())
    expect_401("unsigned", {})
    expect_401("forged signature", sign(generate_secret(), new_message_id(), now, body))
    if not secret:
        if problems:
            return verdict(NAME, problems, "", cases=cases)
        return CheckResult(
            NAME,
            Status.SKIP,
            "unsigned and forged webhooks refused; give --webhook-partner and SCAN_WEBHOOK_SECRET "
            "to prove replays and stale timestamps are refused",
            {"cases": cases},
        )
    try:
        signed = sign(secret, new_message_id(), now, body)
    except ValueError:
        return verdict(NAME, ["the webhook secret given is not a whsec_ secret"], "", cases=cases)
    accepted = post("correctly signed", signed)
    if not 200 <= accepted.status_code < 300:
        problems.append(
            f"a correctly signed webhook for {partner!r} is answered {accepted.status_code}; "
            "the replay case proves nothing"
        )
        return verdict(NAME, problems, "", cases=cases)
    expect_401("replayed", signed)
    expect_401("stale", sign(secret, new_message_id(), now - OFF_BY_SECONDS, body))
    expect_401("future", sign(secret, new_message_id(), now + OFF_BY_SECONDS, body))
    success = "unsigned, forged, replayed, stale and future webhooks refused with 401 problem documents"
    return verdict(NAME, problems, success, cases=cases)
