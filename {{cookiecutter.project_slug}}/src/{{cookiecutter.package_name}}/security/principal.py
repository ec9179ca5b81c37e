"""Who is calling, and the contract every credential type meets: the types the layers share.

Transport, rate limits, authentication and authorization all read the caller from here, below
each of them, so no layer imports another for a type.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, Protocol

from fastapi import Depends, Request
from starlette.types import Receive, Scope

API_PREFIX = "/api/"

# --- Principal ids: one namespace per credential type (ASVS V10.3.3) ---------------------------
#
# A principal's `subject` is its id everywhere the service keys something by caller: grants, the
# subject rate limit, the subject lockout, revocation, the audit log's pseudonym. Each credential
# type writes ids of its own shape, and no two shapes can meet:
#
# - a JWT: `jwt:<issuer key>:<sub>`, the issuer key the first 16 hex digits of SHA-256(JWT_ISSUER),
#   so the same `sub` from another issuer is another principal, and no `sub` whatever its text
#   (`apikey:...`, `spiffe://...`) can leave the `jwt:` namespace;
# - an API key: `apikey:<id>`; a webhook partner: `webhook:<partner>` (their options);
# - a workload: its SPIFFE ID (`spiffe://...`) or its certificate's subject DN (`CN=...`, RFC 4514:
#   an attribute type, which holds no `:`, then `=`).
JWT_NAMESPACE = "jwt:"
API_KEY_NAMESPACE = "apikey:"  # pragma: allowlist secret (a prefix, not a key)
WEBHOOK_NAMESPACE = "webhook:"
SPIFFE_NAMESPACE = "spiffe://"
NAMESPACES = (JWT_NAMESPACE, API_KEY_NAMESPACE, WEBHOOK_NAMESPACE, SPIFFE_NAMESPACE)
ISSUER_KEY_HEX = 16
_DISTINGUISHED_NAME = re.compile(r"(?:[A-Za-z][A-Za-z0-9-]*|[0-9]+(?:\.[0-9]+)+)=")


def issuer_namespace(issuer: str) -> str:
    """The prefix of the principal ids of tokens from `issuer` (exactly as JWT_ISSUER reads)."""
    return f"{JWT_NAMESPACE}{hashlib.sha256(issuer.encode()).hexdigest()[:ISSUER_KEY_HEX]}:"


def is_principal_id(name: str) -> bool:
    """Whether `name` is already a principal id of some credential type (not a bare JWT `sub`)."""
    return name.startswith(NAMESPACES) or _DISTINGUISHED_NAME.match(name) is not None


def principal_id(name: str, namespace: str) -> str:
    """The principal an operator or an owner names (a grant, a lockout to lift): a principal id as
    it is, else the `sub` of a token of the configured issuer (`namespace`: `issuer_namespace`).
    A token whose `sub` itself looks like an id is named by its whole id, `jwt:<issuer key>:<sub>`."""
    return name if is_principal_id(name) else namespace + name


def under_api(path: str) -> bool:
    """Whether `path` is in the authenticated part of the service: `/api` itself and everything
    under `/api/`. The one definition layer 4 (authn.py) authenticates by and the route-policy walk
    (route_policy.py) judges routes by, so no path is inside for one and outside for the other."""
    return path.startswith(API_PREFIX) or path == API_PREFIX[:-1]


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling, as proven by the credential."""

    subject: str  # the principal id, in its credential type's namespace (see above): never a bare `sub`
    scopes: frozenset[str]
    token_id: str | None
    issued_at: int
    expires_at: int
    # The `challenge` of the credential that named the caller (`Bearer`, `ApiKey`, `mTLS`, ...):
    # a route that accepts one kind of credential only checks it (the key-management API).
    credential: str = ""
    # What the token is bound to (its `cnf`, security/binding.py): (`jkt` or `x5t#S256`, thumbprint);
    # None for a plain bearer token and for the other credential types.
    binding: tuple[str, str] | None = None
    # How and when the user authenticated, as a JWT says (OIDC `auth_time`, `acr`, `amr`;
    # security/claims.py reads them): what a step-up rule reads (authz.StepUp, RFC 9470). None and
    # empty for a token without them, and for every credential that names no user's authentication
    # (an API key, a webhook signature, a workload's certificate).
    auth_time: int | None = None
    acr: str | None = None
    amr: tuple[str, ...] = ()
    # RFC 9396 `authorization_details` of the types JWT_AUTHORIZATION_DETAILS_TYPES lists (a token
    # with any other is refused, claims.py): for the policy that reads them.
    authorization_details: tuple[Mapping[str, Any], ...] = field(default=(), compare=False)


class InvalidCredentials(Exception):
    """A credential was presented and is not acceptable. `reason` is for the audit log only.

    The 401's challenge is the credential's scheme with `error="invalid_token"`; a subclass may name
    another scheme (`scheme`: DPoP's, for a bound token), error code and extra response headers."""

    error = "invalid_token"
    scheme: str | None = None
    headers: dict[str, str] = {}  # noqa: RUF012 (never mutated: a subclass sets its own)

    def __init__(self, reason: str, *, subject: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.subject = subject  # set when the credential verified but is refused (counts for its lockout)


class Authenticator(Protocol):
    """One credential type. `challenge` is its WWW-Authenticate scheme, and the `Authorization`
    scheme it reads when it reads that header: layer 4 refuses any other scheme before asking it."""

    challenge: str

    async def authenticate(self, scope: Scope) -> Principal | None:
        """The principal, or None when the request carries no credential of this type.

        Raises InvalidCredentials when one is present but not acceptable.
        """
        ...


class BodyAuthenticator(Authenticator, Protocol):
    """A credential that signs the request body (a webhook): `Authenticate` calls
    `authenticate_body` instead of `authenticate`, after every header credential. It reads the raw
    body through `receive` (within BodyLimit's cap, whose 413 and 408 it may raise) and returns the
    principal with the receive the application must use from then on, one that replays the body it
    read. It reads nothing of a request that is not of its type (`owns`). Such a credential is
    valid on its own route only, so its scheme is not advertised on every 401."""

    def owns(self, scope: Scope) -> bool:
        """Whether the request is of its type (its route): no I/O."""
        ...

    async def authenticate_body(self, scope: Scope, receive: Receive) -> tuple[Principal | None, Receive]: ...


class ChannelAuthenticator(Protocol):
    """A credential of the connection rather than of the caller: the calling workload's client
    certificate. When configured it is required on every authenticated request, verified before
    any caller credential, and combined with the one the caller presents (security/composition.py):
    the caller is the principal, within the workload's scopes. `caller_required`: the workload
    alone is never the principal (mode `mtls+jwt`)."""

    challenge: str
    caller_required: bool

    async def identify(self, scope: Scope) -> Principal:
        """The workload, not yet admitted (Admission.admit runs once, on the composed principal).
        Raises InvalidCredentials when there is none or it is not acceptable."""
        ...


def app_path(scope: Scope) -> str:
    """The path the application routes on: the request path without the server's `--root-path`
    (uvicorn puts both in `path`). Every prefix check uses it, so a service mounted under a
    prefix is authenticated and limited exactly as one that is not."""
    path: str = scope.get("path", "")
    root = scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root) else path


async def current_principal(request: Request) -> Principal:
    # async, like every dependency and handler here: FastAPI runs sync ones in a thread pool.
    principal = request.scope.get("state", {}).get("principal")
    if not isinstance(principal, Principal):
        # Only reachable if a route outside /api/ asks for a principal: fail closed.
        raise RuntimeError("route requires authentication but is outside the authenticated prefix")
    return principal


CurrentPrincipal = Annotated[Principal, Depends(current_principal)]
