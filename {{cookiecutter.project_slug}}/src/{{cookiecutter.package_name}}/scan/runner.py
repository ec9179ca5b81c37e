"""`{{ cookiecutter.package_name }}-scan`: parse the command line, run every check in order, print the report.

Exit status: 0 when no check fails, 1 when one does, 2 when the command line is unusable.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from types import ModuleType

import httpx

from .. import extensions
from . import authn, bola, cors, errors, headers, health, ratelimit, sender_constraint
from .probe import BudgetExhausted, Probe, Scan, target_url
from .report import CheckResult, Status, failed, render_json, render_text

Check = Callable[[Scan], CheckResult]


def option_modules() -> list[ModuleType]:
    """The checks of the baked credential options: `options/<option>/scan.py`. Each has NAME,
    check and optionally add_arguments(parser)."""
    return extensions.parts("scan")


def option_checks() -> tuple[tuple[str, Check], ...]:
    return tuple((module.NAME, module.check) for module in option_modules())


# Order matters: errors reads every error body the earlier checks saw; the burst goes last
# because it spends the scanner's address quota.
CHECKS: tuple[tuple[str, Check], ...] = (
    (headers.NAME, headers.check),
    (cors.NAME, cors.check),
    (authn.NAME, authn.check),
    (sender_constraint.NAME, sender_constraint.check),
    (bola.NAME, bola.check),
    *option_checks(),
    (errors.NAME, errors.check),
    (health.NAME, health.check),
    (ratelimit.NAME, ratelimit.check),
)
MAX_REQUESTS = 400
MAX_SECONDS = 120.0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="{{ cookiecutter.package_name }}-scan",
        description="Probe a running instance over HTTP for the security pipeline's promises.",
    )
    parser.add_argument("--url", required=True, help="base URL of the instance (http:// or https:// only)")
    parser.add_argument("--token", default=os.environ.get("SCAN_TOKEN"), help="a valid token (or SCAN_TOKEN)")
    parser.add_argument(
        "--second-token",
        default=os.environ.get("SCAN_SECOND_TOKEN"),
        help="a valid token of another subject with the same scopes, for BOLA (or SCAN_SECOND_TOKEN)",
    )
    parser.add_argument(
        "--plain-token",
        default=os.environ.get(sender_constraint.PLAIN_TOKEN_VARIABLE),
        help="a valid token without cnf, where sender-constrained tokens are required: it must be refused "
        "(or SCAN_PLAIN_TOKEN)",
    )
    parser.add_argument("--origin", help="an origin in ALLOWED_ORIGINS; its look-alikes must be refused")
    parser.add_argument(
        "--allow-burst", action="store_true", help=f"send up to {ratelimit.MAX_BURST} requests to reach a 429"
    )
    parser.add_argument("--openapi", help="the OpenAPI document as a file, when the instance does not serve it")
    parser.add_argument("--min-score", type=int, default=100, help="lowest Observatory score that passes (100 = A+)")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds per request")
    parser.add_argument("--json", action="store_true", help="print a machine-readable report")
    for module in option_modules():
        adder = getattr(module, "add_arguments", None)
        if adder is not None:
            adder(parser)
    return parser


def run_check(name: str, check: Check, scan: Scan) -> CheckResult:
    try:
        return check(scan)
    except BudgetExhausted as exc:
        return CheckResult(name, Status.FAIL, f"stopped: {exc}")
    except httpx.HTTPError as exc:
        return CheckResult(name, Status.FAIL, f"could not talk to the instance: {type(exc).__name__}")


def scan(arguments: argparse.Namespace) -> tuple[list[CheckResult], list[str], int]:
    """Run every check: the results, notes for the operator and the number of requests sent."""
    probe = Probe(arguments.url, max_requests=MAX_REQUESTS, max_seconds=MAX_SECONDS, timeout_seconds=arguments.timeout)
    context = Scan(
        probe=probe,
        token=arguments.token,
        second_token=arguments.second_token,
        origin=arguments.origin,
        allow_burst=arguments.allow_burst,
        openapi_file=arguments.openapi,
        min_score=arguments.min_score,
        arguments=arguments,
    )
    results, notes = [], []
    try:
        for name, check in CHECKS:
            if name == ratelimit.NAME and probe.rate_limited:
                notes.append(
                    f"{probe.rate_limited} requests were answered 429 before the rate-limit check: an earlier run "
                    "(or its burst) may have spent this address's quota; run again after the window"
                )
            results.append(run_check(name, check, context))
    finally:
        probe.close()
    return results, notes, probe.sent


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    arguments = parser.parse_args(argv)
    try:
        arguments.url = target_url(arguments.url)
        if arguments.origin:
            arguments.origin = target_url(arguments.origin)
    except ValueError as exc:
        parser.error(str(exc))
    if not arguments.token:
        parser.error("--token (or SCAN_TOKEN) is required")
    if arguments.openapi and not os.path.isfile(arguments.openapi):
        parser.error(f"--openapi {arguments.openapi}: no such file")
    results, notes, requests = scan(arguments)
    render = render_json if arguments.json else render_text
    print(render(results, arguments.url, requests, notes))
    return 1 if failed(results) else 0


if __name__ == "__main__":
    sys.exit(main())
