"""Sender-constrained tokens: what binds an access token to a key its holder must prove it holds.

An issuer binds a token with its `cnf` (confirmation) claim (RFC 7800):

- `cnf.jkt`: the RFC 7638 thumbprint of a public key (DPoP, RFC 9449). The token is served only with
  `Authorization: DPoP <token>` and a proof signed by that key (security/dpop.py).
- `cnf.x5t#S256`: the SHA-256 thumbprint of a client certificate (RFC 8705). The token is served only
  on a request whose client certificate, verified by the `mtls` option (the handshake's, or one a
  proxy the service may believe forwarded), has that thumbprint.

A token with no `cnf` is a plain bearer token: whoever holds it may use it, unless
REQUIRE_SENDER_CONSTRAINED_TOKENS refuses those on /api/, or a route declares
`require_sender_constrained()`.

Whom it believes: the issuer, about which key the token is bound to (the token's signature); the
`mtls` option, about the certificate of the request (`CERTIFICATE_THUMBPRINT` in the scope state,
written only by that option after it verified the certificate).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

from fastapi import Request
from starlette.exceptions import HTTPException

from ..resources import runtime_of
from .errors import ProblemDetail
from .events import security_event
from .principal import InvalidCredentials, Principal

JKT: Literal["jkt"] = "jkt"
X5T: Literal["x5t#S256"] = "x5t#S256"
# Scope state: the base64url SHA-256 of the DER of the request's verified client certificate.
CERTIFICATE_THUMBPRINT = "certificate_thumbprint"
MAX_THUMBPRINT_LENGTH = 64  # a base64url SHA-256 is 43 characters
DPOP_SCHEME = "DPoP"
# Scope state: the store key that spends the request's DPoP proof, when layer 3 asks for it (admission.py).
PROOF_STATE = "dpop_proof"


class InvalidBinding(InvalidCredentials):
    """A bound token presented without what binds it: answered with the DPoP challenge."""

    scheme = DPOP_SCHEME


def binding_of(claims: dict[str, Any]) -> tuple[str, str] | None:
    """The token's binding, (`jkt` or `x5t#S256`, thumbprint), from its `cnf` claim; None without
    one. A `cnf` the service cannot confirm (another method, both, a malformed one) is refused: a
    token meant to be constrained is never served as a plain bearer token."""
    cnf = claims.get("cnf")
    if cnf is None:
        return None
    if not isinstance(cnf, dict):
        raise InvalidCredentials("malformed_cnf")
    methods = [(name, cnf[name]) for name in (JKT, X5T) if name in cnf]
    if len(methods) != 1:
        raise InvalidCredentials("unsupported_cnf")
    method, thumbprint = methods[0]
    if not isinstance(thumbprint, str) or not thumbprint or len(thumbprint) > MAX_THUMBPRINT_LENGTH:
        raise InvalidCredentials("malformed_cnf")
    return method, thumbprint


def confirm_certificate(scope: Any, principal: Principal) -> None:
    """A certificate-bound token (`cnf.x5t#S256`) only with that client certificate (RFC 8705 §3)."""
    assert principal.binding is not None
    presented = scope.get("state", {}).get(CERTIFICATE_THUMBPRINT)
    if presented is None:
        raise InvalidCredentials("certificate_bound_token_without_certificate", subject=principal.subject)
    if presented != principal.binding[1]:
        raise InvalidCredentials("certificate_thumbprint_mismatch", subject=principal.subject)


class SenderConstraintRequired(InvalidBinding):
    """A plain bearer token where a sender-constrained one is required."""


def dpop_challenge(algorithms: Iterable[str], error: str | None = None) -> str:
    """The `WWW-Authenticate` challenge of the DPoP scheme (RFC 9449 §7.1), with its `algs`."""
    value = f'{DPOP_SCHEME} algs="{" ".join(algorithms)}"'
    return f'{value}, error="{error}"' if error else value


def require_sender_constrained() -> Any:
    """Route dependency: this route serves sender-constrained tokens only (DPoP or certificate-bound),
    whatever REQUIRE_SENDER_CONSTRAINED_TOKENS says (README "Authentication"). Other credential types
    (an API key, a workload alone) are not tokens and are not judged here."""

    async def check_sender_constrained(request: Request) -> None:
        principal = request.scope.get("state", {}).get("principal")
        if isinstance(principal, Principal) and principal.credential == "Bearer" and principal.binding is None:
            security_event("authentication_failed", reason="sender_constrained_token_required")
            algorithms = runtime_of(request).settings.dpop_algorithms
            raise HTTPException(
                401,
                ProblemDetail("This route requires a sender-constrained token (DPoP or certificate-bound)."),
                headers={"WWW-Authenticate": dpop_challenge(algorithms, "invalid_token")},
            )

    return check_sender_constrained
