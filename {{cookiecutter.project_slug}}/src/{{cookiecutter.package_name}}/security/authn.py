"""Layer 4, authentication: a JWT bearer token on every /api/ request, deny by default.

It runs as middleware in front of routing (the seed's `app.use('/api/', validateJwt)`), so an
anonymous request is answered 401 before its body is read or validated.

Each credential type is an `Authenticator`; `BearerToken` (JWT in `Authorization: Bearer`) is
the one the service ships; the baked credential options (`options/`) add theirs (`pipeline.py`),
and a channel credential (the `mtls` option's client certificate) is a `ChannelAuthenticator`.
Every credential a request presents is verified, and they combine into one principal by the
rules of security/composition.py.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import jwt
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from ..config import Settings
from ..store.core import StoreBusy
from .binding import (
    DPOP_SCHEME,
    JKT,
    PROOF_STATE,
    InvalidBinding,
    SenderConstraintRequired,
    binding_of,
    confirm_certificate,
)
from .claims import AccessTokenRules, user_authentication
from .composition import compose
from .dpop import InvalidProof, ProofVerifier, dpop_token, proof_header, replay_key, unverified_jti
from .errors import ProblemDetail, ProblemResponse, problem, store_busy
from .events import security_event
from .keys import KeySource
from .lockout import LockedOut, locked_out
from .principal import (
    Authenticator,
    ChannelAuthenticator,
    InvalidCredentials,
    Principal,
    app_path,
    issuer_namespace,
    under_api,
)
from .revocation import MAX_ID_LENGTH, RevocationStoreUnavailable

if TYPE_CHECKING:
    from .admission import Admission

MAX_TOKEN_BYTES = 8192
MAX_KID_LENGTH = 256
REQUIRED_CLAIMS = ["iss", "aud", "sub", "exp", "iat"]
VERIFIED_CACHE_SIZE = 10_000
PROOF_DETAIL = "The DPoP proof is not valid."
T = TypeVar("T")


# --- JWT verification -----------------------------------------------------------------------


class VerifiedTokens:
    """A bounded LRU of tokens that passed verification, each dropped at its `exp` at the latest
    and whenever the trusted key set changes. Only successes are kept."""

    def __init__(self, size: int = VERIFIED_CACHE_SIZE) -> None:
        self.size = size
        self._entries: OrderedDict[bytes, tuple[Principal, int]] = OrderedDict()

    def get(self, digest: bytes, generation: int) -> Principal | None:
        entry = self._entries.get(digest)
        if entry is None:
            return None
        principal, key_generation = entry
        if key_generation != generation or principal.expires_at <= time.time():
            del self._entries[digest]
            return None
        self._entries.move_to_end(digest)
        return principal

    def put(self, digest: bytes, principal: Principal, generation: int) -> None:
        self._entries[digest] = (principal, generation)
        self._entries.move_to_end(digest)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)


class TokenVerifier:
    """Signature and claims with PyJWT, against keys only the configured key source supplies."""

    def __init__(self, settings: Settings, keys: KeySource, *, cache_size: int = VERIFIED_CACHE_SIZE) -> None:
        self.keys = keys
        self.algorithms = frozenset(settings.jwt_algorithms)
        self.issuer = settings.jwt_issuer
        # A token's principal is `jwt:<issuer key>:<sub>` (principal.py): the prefix is fixed per
        # process, so naming the principal costs one concatenation, once per verified token.
        self.namespace = issuer_namespace(settings.jwt_issuer)
        self.max_subject = MAX_ID_LENGTH - len(self.namespace)
        self.audience = settings.jwt_audience
        self.leeway = settings.jwt_leeway_seconds
        self.max_lifetime = settings.jwt_max_token_lifetime_seconds
        self.cache = VerifiedTokens(cache_size)
        self.rules = AccessTokenRules(settings)  # typ, ID tokens, authorization_details (claims.py)

    def has_keys(self) -> bool:
        return self.keys.has_keys()

    def cached(self, token: bytes) -> Principal | None:
        """The principal of a token that verified before, with no cryptography; else None."""
        if len(token) > MAX_TOKEN_BYTES:
            return None
        return self.cache.get(hashlib.sha256(token).digest(), self.keys.generation)

    async def verify(self, token: bytes) -> Principal:
        if len(token) > MAX_TOKEN_BYTES:
            raise InvalidCredentials("token_too_large")
        digest = hashlib.sha256(token).digest()
        principal = self.cache.get(digest, self.keys.generation)
        if principal is not None:
            return principal
        generation = self.keys.generation
        principal = await self._verify(token)
        self.cache.put(digest, principal, generation)
        return principal

    async def _verify(self, token: bytes) -> Principal:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise InvalidCredentials("malformed") from None
        alg, kid = header.get("alg"), header.get("kid")
        if not isinstance(alg, str) or alg not in self.algorithms:
            raise InvalidCredentials("algorithm_not_allowed")
        if "crit" in header:
            raise InvalidCredentials("unsupported_critical_header")
        self.rules.check_header(header)
        if kid is not None and (not isinstance(kid, str) or len(kid) > MAX_KID_LENGTH):
            raise InvalidCredentials("malformed_kid")
        # jku, x5u, jwk and x5c are deliberately never read: only the key source is trusted.
        trusted = await self.keys.find(kid)
        if trusted is None:
            raise InvalidCredentials("unknown_key")
        if alg not in trusted.algorithms:
            raise InvalidCredentials("algorithm_not_allowed_for_key")
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                trusted.key,
                algorithms=[alg],
                issuer=self.issuer,
                audience=self.audience,
                leeway=self.leeway,
                options={"require": REQUIRED_CLAIMS, "verify_signature": True, "strict_aud": False},
            )
        except jwt.MissingRequiredClaimError as exc:
            raise InvalidCredentials(f"missing_{exc.claim}") from None
        except jwt.PyJWTError as exc:
            raise InvalidCredentials(type(exc).__name__) from None
        return self._principal(claims)

    def _principal(self, claims: dict[str, Any]) -> Principal:
        subject, exp, iat = claims["sub"], claims["exp"], claims["iat"]
        if not isinstance(subject, str) or not subject or len(subject) > self.max_subject:
            raise InvalidCredentials("bad_subject")
        # PyJWT accepts anything int() accepts, "1700000000" and true included; a JWT NumericDate is a number.
        if not all(_is_number(claims[name]) for name in ("exp", "iat", "nbf") if name in claims):
            raise InvalidCredentials("non_numeric_date")
        if exp - iat > self.max_lifetime:
            raise InvalidCredentials("lifetime_over_maximum")
        jti = claims.get("jti")
        if jti is not None and (not isinstance(jti, str) or not jti or len(jti) > MAX_ID_LENGTH):
            raise InvalidCredentials("bad_jti")
        details = self.rules.check_claims(claims)
        user = user_authentication(claims)
        return Principal(
            self.namespace + subject,
            _scopes(claims),
            jti,
            int(iat),
            int(exp),
            BearerToken.challenge,
            binding_of(claims) if "cnf" in claims else None,
            auth_time=user.auth_time,
            acr=user.acr,
            amr=user.amr,
            authorization_details=details,
        )


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _scopes(claims: dict[str, Any]) -> frozenset[str]:
    scope = claims.get("scope", claims.get("scp", ""))
    if isinstance(scope, str):
        return frozenset(scope.split())
    if isinstance(scope, list):
        return frozenset(s for s in scope if isinstance(s, str))
    return frozenset()


# --- Bearer tokens --------------------------------------------------------------------------


# A compact JWS is three base64url segments without padding (RFC 7515 §2, §7.1). The last
# character of a segment of length 4n+2 or 4n+3 carries 4 or 2 unused bits that must be zero:
# `AQgw` and `AEIMQUYcgkosw048` are the characters for which they are. PyJWT's decoder accepts
# padding, stray characters and nonzero unused bits, so one signed token would have many spellings,
# each verified and cached on its own; only the one canonical spelling is accepted.
_BASE64URL_AND_DOT = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_."
_CANONICAL_LAST = {2: b"AQgw", 3: b"AEIMQUYcgkosw048"}


def _canonical_jws(token: bytes) -> bool:
    if token.translate(None, _BASE64URL_AND_DOT) or token.count(b".") != 2:
        return False
    for part in token.split(b"."):
        rest = len(part) % 4
        if rest == 1 or (rest and part[-1:] not in _CANONICAL_LAST[rest]):
            return False
    return True


def bearer_token(headers: Iterable[tuple[bytes, bytes]]) -> bytes | None:
    """The token of `Authorization: Bearer <token>` (never a query string or cookie).

    None when there is no bearer credential; b"" for one that is present but unusable
    (several Authorization headers, whatever their schemes, an empty token, or one that is not a
    canonical compact JWS). The scheme and the token are separated by one or more spaces (1*SP,
    RFC 6750 §2.1, RFC 9110 §11.4); any other whitespace makes the token non-canonical.
    """
    found: bytes | None = None
    seen = False
    for key, value in headers:
        if key == b"authorization":
            if seen:
                return b""
            seen = True
            scheme, _, token = value.partition(b" ")
            if scheme.lower() == b"bearer":
                found = token.lstrip(b" ")
    # An oversized token is left to the verifier, which refuses it for its size without reading it.
    if found and len(found) <= MAX_TOKEN_BYTES and not _canonical_jws(found):
        return b""
    return found


# RFC 9110 §11.4: `credentials = auth-scheme [ 1*SP ( token68 / #auth-param ) ]`, the scheme a
# token (§5.6.2). Only SP separates it from what follows: `Bearer<TAB>x` is one malformed scheme.
_TCHAR = frozenset(b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")


def authorization_scheme(headers: Iterable[tuple[bytes, bytes]]) -> bytes | None:
    """The scheme (lowercase) of the request's Authorization header; None when it sends none.

    Raises InvalidCredentials when the header is there but names no scheme layer 4 can judge:
    sent more than once, empty, or a scheme that is not an RFC 9110 token (only SP may follow it).
    Whether the scheme is one the service accepts is the caller's question (`Authenticate`).
    """
    scheme: bytes | None = None
    for key, value in headers:
        if key == b"authorization":
            if scheme is not None:
                raise InvalidCredentials("several_authorization_headers")
            name = value.partition(b" ")[0]
            if not name:
                raise InvalidCredentials("empty_authorization")
            if not _TCHAR.issuperset(name):
                raise InvalidCredentials("malformed_authorization")
            scheme = name.lower()
    return scheme


class BearerToken:
    """JWT access tokens: verified (or found in the verified cache), then checked for revocation."""

    challenge = "Bearer"

    def __init__(
        self,
        verifier: TokenVerifier,
        admission: Admission,
        *,
        require_sender_constrained: bool = False,
        dpop: DPoPToken | None = None,
    ) -> None:
        self.verifier = verifier
        self.admission = admission
        self.require_sender_constrained = require_sender_constrained  # REQUIRE_SENDER_CONSTRAINED_TOKENS
        self.dpop = dpop

    def known(self, scope: Scope) -> Principal | None:
        """The caller, when its token is one this process verified before (the address limit uses
        it to ask the revocation lookup in its own round trip); no cryptography, no I/O. A request
        with no Bearer token may carry a DPoP one (`DPoPToken.lookahead`)."""
        token = bearer_token(scope["headers"])
        if token:
            return self.verifier.cached(token)
        return self.dpop.lookahead(scope) if token is None and self.dpop is not None else None

    async def authenticate(self, scope: Scope) -> Principal | None:
        token = bearer_token(scope["headers"])
        if token is None:
            return None
        if not token:
            raise InvalidCredentials("malformed")
        principal = await self.verifier.verify(token)
        if principal.binding is not None or self.require_sender_constrained:
            self._constrained(scope, principal.binding, principal)
        return await self.admission.admit(scope, principal)

    @staticmethod
    def _constrained(scope: Scope, binding: tuple[str, str] | None, principal: Principal) -> None:
        """A bound token as Bearer: a certificate-bound one with its certificate only (RFC 8705), a
        DPoP-bound one never (RFC 9449 §7.1); a plain one not where sender constraint is required.
        The subject is not named: a stolen token must not lock its owner out."""
        if binding is None:
            raise SenderConstraintRequired("sender_constrained_token_required")
        if binding[0] == JKT:
            raise InvalidBinding("dpop_bound_token_as_bearer")
        confirm_certificate(scope, principal)


class DPoPToken:
    """JWT access tokens bound to a key (`cnf.jkt`) in `Authorization: DPoP`, each request with a proof
    of that key (security/dpop.py); then checked for revocation, and the proof spent, in one round
    trip (admission.py). The principal is the token's, as with Bearer."""

    challenge = DPOP_SCHEME

    def __init__(self, verifier: TokenVerifier, proofs: ProofVerifier, admission: Admission) -> None:
        self.verifier = verifier
        self.proofs = proofs
        self.admission = admission
        self.challenge_parameters = proofs.challenge.partition(" ")[2]  # algs="..."

    def lookahead(self, scope: Scope) -> Principal | None:
        """As BearerToken.known, and the proof's jti for layer 3 to spend in its round trip. Asked by
        BearerToken.known when the request has no Bearer token (not `known`: layer 3's lookahead
        then stays the bearer token's own, with no indirection for a plain bearer request)."""
        token = dpop_token(scope["headers"])
        principal = self.verifier.cached(token) if token else None
        if principal is None or principal.binding is None or principal.binding[0] != JKT:
            return None
        try:
            jti = unverified_jti(proof_header(scope["headers"]))
        except InvalidCredentials:
            return None
        if jti is not None:
            key = replay_key(principal.subject, principal.binding[1], jti)
            scope.setdefault("state", {})[PROOF_STATE] = key
        return principal

    async def authenticate(self, scope: Scope) -> Principal | None:
        token = dpop_token(scope["headers"])
        if token is None:
            return None
        if not token or (len(token) <= MAX_TOKEN_BYTES and not _canonical_jws(token)):
            raise InvalidCredentials("malformed")
        proof = proof_header(scope["headers"])
        principal = await self.verifier.verify(token)
        if principal.binding is None or principal.binding[0] != JKT:
            raise InvalidCredentials("token_not_dpop_bound")
        checked = self.proofs.verify(scope, proof, token, principal.binding[1])
        spent = replay_key(principal.subject, checked.jkt, checked.jti)
        return await self.admission.admit(scope, principal, proof=spent)


# --- The layer ------------------------------------------------------------------------------


class _Refused(Exception):
    """Raised inside `Authenticate` to answer 401: `challenge` is the WWW-Authenticate value."""

    def __init__(
        self,
        challenge: str,
        reason: str,
        *,
        detail: str,
        name: str,
        credential: str | None = None,
        subject: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(reason)
        self.challenge, self.reason, self.detail, self.name = challenge, reason, detail, name
        self.credential, self.subject = credential, subject
        self.headers = {"WWW-Authenticate": challenge, **(headers or {})}


class Authenticate:
    """Requires a valid credential on every path under /api/ except the declared public ones, and
    composes the credentials of one request into its principal (security/composition.py)."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        authenticators: Sequence[Authenticator],
        channels: Sequence[ChannelAuthenticator] = (),
        admission: Admission | None = None,
        public_paths: frozenset[str] = frozenset(),
        on_failure: Callable[[Scope, str | None], Awaitable[None]] | None = None,
    ) -> None:
        if not authenticators:
            raise ValueError("at least one authenticator is required")
        if channels and admission is None:
            raise ValueError("a channel credential needs the admission (its workload may be the principal)")
        self.app = app
        self.authenticators = tuple(authenticators)
        self.channels = tuple(channels)
        self.admission = admission
        # Each authenticator with its body reader (BodyAuthenticator), looked up once here; the
        # header credentials first, so a refused one is answered before any body is read.
        steps = [(a, getattr(a, "authenticate_body", None), getattr(a, "owns", None)) for a in self.authenticators]
        self._steps = tuple(sorted(steps, key=lambda step: step[1] is not None))
        self.public_paths = public_paths
        self.on_failure = on_failure  # counts refused credentials towards a lockout (lockout.py)
        # Each scheme's challenge with its parameters (DPoP's `algs`).
        self._challenge = {
            a.challenge: " ".join(filter(None, (a.challenge, getattr(a, "challenge_parameters", ""))))
            for a, _, _ in self._steps
        }
        callers = [self._challenge[a.challenge] for a, reader, _ in self._steps if reader is None]
        self.caller_challenges = ", ".join(callers)
        # The Authorization schemes the service accepts: a header credential's challenge is the
        # scheme it reads (`Bearer`, `ApiKey`). Any other scheme is refused, never passed over.
        self._schemes = {a.challenge.lower().encode(): a for a, reader, _ in self._steps if reader is None}
        self.challenges = ", ".join([*(c.challenge for c in self.channels), self.caller_challenges])

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = app_path(scope)
        if scope["type"] not in ("http", "websocket") or not under_api(path) or path in self.public_paths:
            await self.app(scope, receive, send)
            return
        try:
            principal, receive = await self._principal(scope, receive)
        except _Refused as refused:
            if refused.credential is None:
                security_event("authentication_failed", reason=refused.reason)
            else:
                security_event("authentication_failed", reason=refused.reason, credential=refused.credential)
            # A credential that was presented and refused counts towards its address's lockout; a
            # request with none (an anonymous probe, a health checker on the wrong path) does not.
            if self.on_failure is not None and refused.credential is not None:
                await self.on_failure(scope, refused.subject)
            await self._refuse(
                problem(401, refused.detail, name=refused.name, headers=refused.headers),
                scope,
                receive,
                send,
            )
            return
        except LockedOut as exc:
            await self._refuse(locked_out(exc), scope, receive, send)
            return
        except StoreBusy:
            await self._refuse(store_busy("authn"), scope, receive, send)
            return
        except HTTPException as exc:  # BodyLimit's 413 or 408, met by a body reader
            detail = str(exc.detail) if isinstance(exc.detail, ProblemDetail) else "The request body was refused."
            name = getattr(exc, "problem_name", None)
            await self._refuse(problem(exc.status_code, detail, name=name, headers=exc.headers), scope, receive, send)
            return
        except RevocationStoreUnavailable:
            security_event("dependency_unavailable", dependency="redis", layer="authn")
            await self._refuse(
                problem(
                    503,
                    "The credential store is unavailable; retry later.",
                    name="dependency-unavailable",
                    headers={"Retry-After": "1"},
                ),
                scope,
                receive,
                send,
            )
            return
        scope.setdefault("state", {})["principal"] = principal
        await self.app(scope, receive, send)

    async def _principal(self, scope: Scope, receive: Receive) -> tuple[Principal, Receive]:
        """Every credential presented, verified; then composed (security/composition.py)."""
        workload: Principal | None = None
        channel: ChannelAuthenticator | None = None
        for channel in self.channels:
            workload = await self._verified(channel.challenge, channel.identify(scope))
        authorization = self._authorization(scope)
        found: list[tuple[Principal, bool]] = []  # each caller that verified, and whether it signs the body
        for authenticator, reader, owns in self._steps:
            if reader is None:
                principal = await self._verified(authenticator.challenge, authenticator.authenticate(scope))
                if principal is None and authenticator is authorization:
                    raise self._unusable_authorization("authorization_not_read")  # its scheme's reader passed it over
            else:
                if found and owns is not None and owns(scope):
                    # Refused before its body is read: a signed message's id is not spent on it.
                    raise self._several()
                principal, receive = await self._verified(authenticator.challenge, reader(scope, receive))
            if principal is not None:
                found.append((principal, reader is not None))
        if len(found) > 1:
            raise self._several()
        if found:
            caller, signs_body = found[0]
            return compose(workload, caller, signs_body=signs_body), receive
        if workload is None:
            raise _Refused(
                self.challenges, "no_credentials", detail="Authentication is required.", name="unauthenticated"
            )
        assert channel is not None and self.admission is not None
        if channel.caller_required:
            # The workload verified; what is missing is the caller's own credential: its challenge.
            raise _Refused(
                self.caller_challenges,
                "token_required",
                detail="A token is required as well as the client certificate.",
                name="unauthenticated",
                credential=channel.challenge,
            )
        return await self._verified(channel.challenge, self.admission.admit(scope, workload)), receive

    def _authorization(self, scope: Scope) -> Authenticator | None:
        """The authenticator whose scheme the Authorization header names, None without the header.
        Several Authorization headers, an empty one, a malformed one or a scheme the service does
        not accept (`Basic`, `Digest`) are a credential presented and refused, like a bad token."""
        try:
            scheme = authorization_scheme(scope["headers"])
        except InvalidCredentials as exc:
            raise self._unusable_authorization(exc.reason) from None
        if scheme is None:
            return None
        authenticator = self._schemes.get(scheme)
        if authenticator is None:
            raise self._unusable_authorization("unknown_authorization_scheme")
        return authenticator

    def _unusable_authorization(self, reason: str) -> _Refused:
        # The challenges name the schemes the service accepts: no one scheme's `invalid_token` applies.
        return _Refused(
            self.caller_challenges,
            reason,
            detail="The Authorization header is not usable: send one, with a scheme the service accepts.",
            name="invalid-token",
            credential="Authorization",
        )

    async def _verified(self, challenge: str, verifying: Awaitable[T]) -> T:
        """What the credential's check returns; its InvalidCredentials as a refusal with its challenge."""
        try:
            return await verifying
        except InvalidCredentials as exc:
            # The scheme's challenge (DPoP's with its `algs`), then the error: `Bearer error="..."`,
            # `DPoP algs="ES256 ...", error="..."`. A bound token refused as Bearer names DPoP.
            scheme = exc.scheme or challenge
            full = self._challenge.get(scheme, scheme)
            separator = ", " if full != scheme else " "
            raise _Refused(
                f'{full}{separator}error="{exc.error}"',
                exc.reason,
                detail=PROOF_DETAIL if isinstance(exc, InvalidProof) else "The credential is not valid.",
                name="invalid-token",
                credential=challenge,
                subject=exc.subject,
                headers=exc.headers,
            ) from None

    def _several(self) -> _Refused:
        return _Refused(
            self.caller_challenges,
            "several_credentials",
            detail="Send one credential for the caller, not several.",
            name="invalid-token",
            credential="several",  # presented and refused: counts towards the lockout like a bad one
        )

    @staticmethod
    async def _refuse(response: ProblemResponse, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            # Closing before accept makes the server answer the handshake with 403.
            await send({"type": "websocket.close", "code": 1008})
            return
        await response(scope, receive, send)
