"""Authentication: every forged, broken or missing token is answered 401 with a problem document,
and a valid token is only accepted from the Authorization header, never from the query string.

The forgeries are derived from the operator's token without any key: its claims re-sent unsigned
(`alg: none`), signed with a guessable HMAC secret, with a flipped signature or altered claims.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from typing import Any

import httpx

from . import paths
from .probe import Scan
from .report import CheckResult, verdict

NAME = "authn"
QUERY_PARAMETERS = ("access_token", "token")


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def split_token(token: str) -> tuple[dict[str, Any], dict[str, Any], str]:
    """Header, claims and signature of a JWS compact token, read without verifying anything."""
    header, claims, signature = token.split(".")
    return json.loads(b64url_decode(header)), json.loads(b64url_decode(claims)), signature


def encode(header: dict[str, Any], claims: dict[str, Any], signature: str) -> str:
    segments = [b64url(json.dumps(part, separators=(",", ":")).encode()) for part in (header, claims)]
    return ".".join([*segments, signature])


def forgeries(token: str) -> dict[str, str]:
    """Named tokens that a correct verifier refuses, derived from a valid one."""
    header, claims, signature = split_token(token)
    now = int(time.time())
    unsigned = encode({"alg": "none", "typ": "JWT"}, claims, "")
    hs_header = {"alg": "HS256", "typ": "JWT"}
    hs_input = ".".join(encode(hs_header, claims, "").split(".")[:2])
    hs_signature = b64url(hmac.new(b"secret", hs_input.encode(), hashlib.sha256).digest())
    flipped = signature[:-4] + ("AAAA" if not signature.endswith("AAAA") else "BBBB")
    return {
        "alg none": unsigned,
        "alg none (uppercase)": encode({"alg": "NONE", "typ": "JWT"}, claims, ""),
        "HS256 with a guessable secret": f"{hs_input}.{hs_signature}",
        "tampered signature": ".".join([*token.split(".")[:2], flipped]),
        "tampered claims": encode(header, {**claims, "sub": f"{claims.get('sub', '')}-admin"}, signature),
        "expired": encode(header, {**claims, "iat": now - 7200, "exp": now - 3600}, signature),
        "garbage": "not-a-token",
        "three garbage segments": "a.b.c",
    }


def is_problem(response: httpx.Response, status: int) -> bool:
    if not response.headers.get("content-type", "").startswith(paths.PROBLEM_MEDIA_TYPE):
        return False
    try:
        body = response.json()
    except ValueError:
        return False
    return isinstance(body, dict) and body.get("status") == status and "title" in body and "detail" in body


def check(scan: Scan) -> CheckResult:
    path = paths.protected_path()
    problems: list[str] = []
    cases: dict[str, int] = {}

    def expect_401(
        name: str, token: str | None = None, params: dict[str, str] | None = None, authorization: str | None = None
    ) -> None:
        headers = {"Authorization": authorization} if authorization else None
        response = scan.probe.request("GET", path, token=token, params=params, headers=headers)
        cases[name] = response.status_code
        if response.status_code != 401:
            problems.append(f"{name}: answered {response.status_code}, not 401")
        elif not is_problem(response, 401):
            problems.append(f"{name}: the 401 is not a problem document")
        elif not any(
            challenge.strip().startswith("bearer")
            for challenge in response.headers.get("www-authenticate", "").lower().split(",")
        ):  # a baked credential option's challenge (e.g. ApiKey) may come first
            problems.append(f"{name}: the 401 has no WWW-Authenticate: Bearer")

    baseline = scan.probe.request("GET", path, token=scan.token)
    cases["valid token"] = baseline.status_code
    if baseline.status_code == 401:
        return verdict(NAME, ["the --token given is refused (401); the other cases prove nothing"], "", cases=cases)
    try:
        forged = forgeries(scan.token)
    except ValueError:
        return verdict(NAME, ["the --token given is not a JWS compact token"], "", cases=cases)

    expect_401("no token")
    expect_401("empty bearer", authorization="Bearer")
    expect_401("basic credentials", authorization="Basic " + b64url(b"scan:probe"))
    for name, token in forged.items():
        expect_401(name, token=token)
    for parameter in QUERY_PARAMETERS:
        expect_401(f"token in ?{parameter}=", params={parameter: scan.token})
    success = f"{len(cases) - 1} missing, forged or misplaced tokens refused with 401 problem documents"
    return verdict(NAME, problems, success, cases=cases)
