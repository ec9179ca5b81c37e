"""Layer 4, authentication: a JWT bearer token on every /api/ request, deny by default.

It runs as middleware in front of routing (the seed's `app.use('/api/', validateJwt)`), so an
anonymous request is answered 401 before its body is read or validated.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Annotated, Any

import jwt
from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePublicKey
from cryptography.hazmat.primitives.asymmetric.ed448 import Ed448PublicKey
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from fastapi import Depends, Request
from starlette.types import ASGIApp, Receive, Scope, Send

from ..config import Settings
from .errors import problem
from .events import security_event

API_PREFIX = "/api/"
MAX_TOKEN_BYTES = 8192
REQUIRED_CLAIMS = ["iss", "aud", "sub", "exp", "iat"]
VerificationKey = RSAPublicKey | EllipticCurvePublicKey | Ed25519PublicKey | Ed448PublicKey


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling, as proven by the token."""

    subject: str
    scopes: frozenset[str]
    token_id: str | None
    issued_at: int
    expires_at: int


class InvalidToken(Exception):
    """The token is not acceptable. The message is for the audit log, never the client."""


class TokenVerifier:
    """Verifies signature and claims with PyJWT against keys parsed once at start."""

    def __init__(self, settings: Settings) -> None:
        if not settings.jwt_public_key:
            raise ValueError("JWT_PUBLIC_KEY is required")
        self.key = _verification_key(settings.jwt_public_key)
        self.algorithms = list(settings.jwt_algorithms)
        self.issuer = settings.jwt_issuer
        self.audience = settings.jwt_audience
        self.leeway = settings.jwt_leeway_seconds
        self.max_lifetime = settings.jwt_max_token_lifetime_seconds

    def has_keys(self) -> bool:
        return self.key is not None

    def verify(self, token: str) -> Principal:
        if len(token) > MAX_TOKEN_BYTES:
            raise InvalidToken("token too large")
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                self.key,
                algorithms=self.algorithms,
                issuer=self.issuer,
                audience=self.audience,
                leeway=self.leeway,
                options={"require": REQUIRED_CLAIMS, "strict_aud": False},
            )
        except jwt.PyJWTError as exc:
            raise InvalidToken(type(exc).__name__) from None
        return _principal(claims, self.max_lifetime)


def _verification_key(pem: str) -> VerificationKey:
    key = load_pem_public_key(pem.encode())
    if not isinstance(key, VerificationKey):
        raise ValueError("JWT_PUBLIC_KEY must be an RSA, EC or EdDSA public key")
    return key


def _principal(claims: dict[str, Any], max_lifetime: int) -> Principal:
    subject, exp, iat = claims["sub"], claims["exp"], claims["iat"]
    if not isinstance(subject, str) or not subject or len(subject) > 255:
        raise InvalidToken("bad sub")
    if not isinstance(exp, int | float) or not isinstance(iat, int | float):
        raise InvalidToken("non-numeric exp or iat")
    if exp - iat > max_lifetime:
        raise InvalidToken("lifetime over maximum")
    scope = claims.get("scope", claims.get("scp", ""))
    scopes = (
        scope.split()
        if isinstance(scope, str)
        else [s for s in scope if isinstance(s, str)]
        if isinstance(scope, list)
        else []
    )
    jti = claims.get("jti")
    return Principal(subject, frozenset(scopes), jti if isinstance(jti, str) else None, int(iat), int(exp))


def bearer_token(headers: Iterable[tuple[bytes, bytes]]) -> str | None:
    for key, value in headers:
        if key == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return token.strip() if scheme.lower() == "bearer" else ""
    return None


class Authenticate:
    """Requires a valid bearer token on every path under /api/ except the declared public ones."""

    def __init__(self, app: ASGIApp, *, verifier: TokenVerifier, public_paths: frozenset[str] = frozenset()) -> None:
        self.app = app
        self.verifier = verifier
        self.public_paths = public_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope.get("path", "")
        if scope["type"] != "http" or not path.startswith(API_PREFIX) or path in self.public_paths:
            await self.app(scope, receive, send)
            return
        token = bearer_token(scope["headers"])
        if token is None:
            security_event("authentication_failed", reason="no token")
            await problem(
                401, "A bearer token is required.", name="unauthenticated", headers={"WWW-Authenticate": "Bearer"}
            )(scope, receive, send)
            return
        try:
            principal = self.verifier.verify(token)
        except InvalidToken as exc:
            security_event("authentication_failed", reason=str(exc))
            await problem(
                401,
                "The bearer token is not valid.",
                name="invalid-token",
                headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
            )(scope, receive, send)
            return
        scope.setdefault("state", {})["principal"] = principal
        await self.app(scope, receive, send)


def current_principal(request: Request) -> Principal:
    principal = request.scope.get("state", {}).get("principal")
    if not isinstance(principal, Principal):
        # Only reachable if a route outside /api/ asks for a principal: fail closed.
        raise RuntimeError("route requires authentication but is outside the authenticated prefix")
    return principal


CurrentPrincipal = Annotated[Principal, Depends(current_principal)]
