"""API keys: a forged key (this service's prefix, a random id and secret) and malformed ones are
answered 401 with a problem document and an `ApiKey` challenge, and a refused key is never passed
over in favour of a valid token sent with it."""

from __future__ import annotations

import argparse
import os
import secrets

from ...scan import paths
from ...scan.authn import is_problem
from ...scan.probe import Scan
from ...scan.report import CheckResult, verdict
from .settings import DEFAULT_PREFIX

NAME = "api_keys"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--api-key-prefix",
        default=os.environ.get("SCAN_API_KEY_PREFIX", DEFAULT_PREFIX),
        help=f"the instance's API_KEY_PREFIX (or SCAN_API_KEY_PREFIX; default {DEFAULT_PREFIX})",
    )


def forged_keys(prefix: str) -> dict[str, str]:
    forged = f"{prefix}_{secrets.token_hex(8)}_{secrets.token_hex(32)}"
    return {
        "forged key": forged,
        "forged key, uppercase": forged.upper(),
        "truncated secret": forged[:-8],
        "another service's prefix": f"{prefix}x_{secrets.token_hex(8)}_{secrets.token_hex(32)}",
        "garbage": "not-a-key",
    }


def check(scan: Scan) -> CheckResult:
    path = paths.protected_path()
    prefix: str = getattr(scan.arguments, "api_key_prefix", None) or DEFAULT_PREFIX
    problems: list[str] = []
    cases: dict[str, int] = {}

    def expect_401(name: str, headers: dict[str, str], token: str | None = None) -> None:
        response = scan.probe.request("GET", path, headers=headers, token=token)
        cases[name] = response.status_code
        if response.status_code != 401:
            problems.append(f"{name}: answered {response.status_code}, not 401")
        elif not is_problem(response, 401):
            problems.append(f"{name}: the 401 is not a problem document")
        elif "apikey" not in response.headers.get("www-authenticate", "").lower():
            problems.append(f"{name}: the 401 has no WWW-Authenticate: ApiKey")

    for name, key in forged_keys(prefix).items():
        expect_401(f"{name} in X-API-Key", {"X-API-Key": key})
    forged = forged_keys(prefix)["forged key"]
    expect_401("forged key in Authorization: ApiKey", {"Authorization": f"ApiKey {forged}"})
    expect_401("empty X-API-Key", {"X-API-Key": ""})
    # A refused key must not be skipped for the valid token that comes with it.
    expect_401("forged key next to a valid token", {"X-API-Key": forged}, token=scan.token)
    success = f"{len(cases)} forged or malformed API keys refused with 401 problem documents"
    return verdict(NAME, problems, success, cases=cases)
