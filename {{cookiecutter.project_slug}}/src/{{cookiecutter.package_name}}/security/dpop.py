"""DPoP proofs (RFC 9449) at the resource server: `Authorization: DPoP <token>` and one `DPoP` header.

The token is a JWT access token like any other (authn.py verifies it) whose `cnf.jkt` names the
key its holder must prove (binding.py). The proof is a JWT the client signs for each request with
that key; it is checked as RFC 9449 §4.3 and §7.1 say, in this order:

- one `DPoP` header, a compact JWS of at most MAX_PROOF_BYTES;
- its header: `typ` `dpop+jwt`, an `alg` from DPOP_ALGORITHMS (asymmetric only), a `jwk` that is a
  public key (a private member, `d` and the like, refuses it), no `crit`;
- the signature, by that `jwk`;
- `htm` the request's method, `htu` the URL the client used (`request_url`), `iat` within
  DPOP_PROOF_MAX_AGE_SECONDS (and the JWT leeway into the future), a `jti`, `ath` the SHA-256 of the
  token, and `nonce` a current server nonce when DPOP_NONCE_SECRET is set;
- the RFC 7638 thumbprint of the `jwk` equal to the token's `cnf.jkt`.

A proof is accepted once: its `jti` (with the key's thumbprint) is written with SET NX in the same
store round trip as the subject's revocation check and limit (admission.py), for as long as a proof
is fresh, so a proof replayed to any replica is refused.

Whom it believes for `htu`: the request as the server received it (scheme, `Host`, path), and, when
the peer is a trusted proxy (TRUSTED_PROXIES, transport.ClientAddress), the scheme and host that
proxy forwards (`X-Forwarded-Proto`/`X-Forwarded-Host`, or the `proto`/`host` of the last `Forwarded`
element when FORWARDED_HEADER is `Forwarded`).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import math
import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

import jwt
from jwt.api_jwk import PyJWK
from starlette.types import Scope

from ..config import Settings
from .binding import InvalidBinding, dpop_challenge
from .revocation import tag

PROOF_TYPE = "dpop+jwt"
MAX_PROOF_BYTES = 4096
MAX_JTI_LENGTH = 256
KEY_CACHE_SIZE = 1024
# RFC 7638 §3.2: the members of each key type's thumbprint, in lexicographic order.
CURVE_OF = {"ES256": "P-256", "ES384": "P-384", "ES512": "P-521"}
THUMBPRINT_MEMBERS = {"EC": ("crv", "kty", "x", "y"), "RSA": ("e", "kty", "n"), "OKP": ("crv", "kty", "x")}
# RFC 7518 §6.2.2, §6.3.2, RFC 8037 §2 and §6.4.1 (oct): a key with any of these is a private key.
PRIVATE_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})
DEFAULT_PORTS = {"http": 80, "https": 443}
_B64URL = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


class InvalidProof(InvalidBinding):
    """The DPoP proof is missing, malformed, or does not prove what it must (RFC 9449 §7.1)."""

    error = "invalid_dpop_proof"


class NonceRequired(InvalidProof):
    """The proof carries no current server nonce: the client retries with DPoP-Nonce (§8)."""

    error = "use_dpop_nonce"

    def __init__(self, reason: str, nonce: str) -> None:
        super().__init__(reason)
        self.headers = {"DPoP-Nonce": nonce}


def thumbprint(jwk: dict[str, Any]) -> str:
    """The RFC 7638 JWK thumbprint (SHA-256, base64url): the required members only, in order."""
    members = THUMBPRINT_MEMBERS.get(jwk.get("kty"))  # type: ignore[arg-type]
    if members is None or not all(isinstance(jwk.get(name), str) for name in members):
        raise InvalidProof("unsupported_key")
    canonical = json.dumps({name: jwk[name] for name in members}, separators=(",", ":"), ensure_ascii=False)
    return _b64(hashlib.sha256(canonical.encode()).digest())


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64decode(segment: bytes) -> bytes:
    if not _B64URL.issuperset(segment) or len(segment) % 4 == 1:
        raise InvalidProof("malformed_proof")
    try:
        return base64.urlsafe_b64decode(segment + b"=" * (-len(segment) % 4))
    except (binascii.Error, ValueError):
        raise InvalidProof("malformed_proof") from None


def _json_object(segment: bytes) -> dict[str, Any]:
    try:
        value = json.loads(_b64decode(segment))
    except (ValueError, UnicodeDecodeError):
        raise InvalidProof("malformed_proof") from None
    if not isinstance(value, dict):
        raise InvalidProof("malformed_proof")
    return value


# --- The headers ------------------------------------------------------------------------------


def dpop_token(headers: Iterable[tuple[bytes, bytes]]) -> bytes | None:
    """The token of `Authorization: DPoP <token>`; None when the scheme is another one. Several
    Authorization headers are refused before this is asked (authn.authorization_scheme)."""
    for key, value in headers:
        if key == b"authorization":
            scheme, _, token = value.partition(b" ")
            if scheme.lower() == b"dpop":
                return token.lstrip(b" ")
            return None
    return None


def proof_header(headers: Iterable[tuple[bytes, bytes]]) -> bytes:
    """The one `DPoP` header's value (§4.3 check 1: not several, not none)."""
    found: bytes | None = None
    for key, value in headers:
        if key == b"dpop":
            if found is not None:
                raise InvalidProof("several_proofs")
            found = value
    if not found:
        raise InvalidProof("proof_missing")
    return found


def replay_key(subject: str, jkt: str, jti: str) -> str:
    """The store key that spends one proof: in the subject's hash slot (admission.py's script keys
    must share one), named by a digest so neither the key nor the jti is written in the clear."""
    digest = hashlib.sha256(f"{jkt}.{jti}".encode()).hexdigest()[:32]
    return f"dpop:{tag(subject)}:{digest}"


def unverified_jti(proof: bytes) -> str | None:
    """The proof's `jti` before the proof is checked: layer 3 spends it in its round trip (a proof that
    then fails spends only its own jti, which only its holder knew). None when there is none."""
    parts = proof.split(b".")
    if len(parts) != 3 or len(proof) > MAX_PROOF_BYTES:
        return None
    try:
        jti = _json_object(parts[1]).get("jti")
    except InvalidProof:
        return None
    return jti if isinstance(jti, str) and 0 < len(jti) <= MAX_JTI_LENGTH else None


# --- The URL the client used ----------------------------------------------------------------


def _last(values: list[bytes]) -> str | None:
    """The last item of a comma-separated header (the hop nearest the service wrote it)."""
    if not values:
        return None
    item = values[-1].decode("latin-1").rsplit(",", 1)[-1].strip()
    return item or None


def request_url(scope: Scope, forwarded_header: str) -> tuple[str, str, str]:
    """(scheme, host[:port], path) of the URL the client used, normalised as `normal_url` does."""
    headers = scope["headers"]
    scheme: str | None = scope.get("scheme", "http")
    host = next((v.decode("latin-1") for k, v in headers if k == b"host"), None)
    if scope.get("state", {}).get("via_trusted_proxy"):
        if forwarded_header == "Forwarded":
            element = _last([v for k, v in headers if k == b"forwarded"])
            params = dict(
                (name.strip().lower(), value.strip().strip('"'))
                for name, _, value in (pair.partition("=") for pair in (element or "").split(";"))
            )
            scheme, host = params.get("proto") or scheme, params.get("host") or host
        else:
            scheme = _last([v for k, v in headers if k == b"x-forwarded-proto"]) or scheme
            host = _last([v for k, v in headers if k == b"x-forwarded-host"]) or host
    raw = scope.get("raw_path")
    path = raw.decode("latin-1") if raw else scope.get("path", "/")
    return _normal(str(scheme), host or "", path)


def _normal(scheme: str, host: str, path: str) -> tuple[str, str, str]:
    """RFC 3986 §6.2.2-6.2.3 as RFC 9449 §4.3 asks: scheme and host in lower case, the scheme's
    default port dropped, percent-encoding decoded, an empty path `/`."""
    scheme, host = scheme.lower(), host.lower()
    name, colon, port = host.rpartition(":")
    if colon and port.isdigit() and DEFAULT_PORTS.get(scheme) == int(port):
        host = name  # `[::1]:443` -> `[::1]`; `[::1]` alone has no port (`1]` is not digits)
    return scheme, host, unquote(path) or "/"


def normal_url(htu: str) -> tuple[str, str, str] | None:
    """A proof's `htu` as `request_url` normalises the request (query and fragment ignored)."""
    try:
        parts = urlsplit(htu)
    except ValueError:
        return None
    if not parts.scheme or not parts.netloc or "@" in parts.netloc:
        return None
    return _normal(parts.scheme, parts.netloc, parts.path)


# --- Server nonces ----------------------------------------------------------------------------


class Nonces:
    """Stateless server nonces (§8): an HMAC of the current period under DPOP_NONCE_SECRET, so every
    replica issues and accepts the same ones. A nonce is good for its period and the next."""

    def __init__(self, secret: bytes, period: int) -> None:
        self.secret, self.period = secret, period

    def _nonce(self, slot: int) -> str:
        mac = hmac.new(self.secret, str(slot).encode(), hashlib.sha256).digest()[:16]
        return f"{slot}.{_b64(mac)}"

    def current(self) -> str:
        return self._nonce(int(time.time()) // self.period)

    def accepts(self, nonce: object) -> bool:
        if not isinstance(nonce, str) or len(nonce) > 64:
            return False
        slot = int(time.time()) // self.period
        return any(hmac.compare_digest(nonce, self._nonce(s)) for s in (slot, slot - 1))


# --- The proof --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Proof:
    """A proof that verified: its key's thumbprint and its `jti`."""

    jkt: str
    jti: str


class ProofVerifier:
    """Checks one request's proof against the token it accompanies (no I/O: replay is admission's)."""

    def __init__(self, settings: Settings) -> None:
        self.algorithms = frozenset(settings.dpop_algorithms)
        self.challenge = dpop_challenge(settings.dpop_algorithms)
        self.max_age = settings.dpop_proof_max_age_seconds
        self.leeway = settings.jwt_leeway_seconds
        self.forwarded_header = settings.forwarded_header
        secret = settings.dpop_nonce_secret
        self.nonces = Nonces(secret.get_secret_value().encode(), self.max_age) if secret is not None else None
        self._keys: OrderedDict[str, tuple[PyJWK, str]] = OrderedDict()

    @property
    def window_ms(self) -> int:
        """How long a proof's jti is remembered: as long as its `iat` may be accepted."""
        return (self.max_age + 2 * self.leeway) * 1000

    def verify(self, scope: Scope, proof: bytes, token: bytes, jkt: str) -> Proof:
        if len(proof) > MAX_PROOF_BYTES:
            raise InvalidProof("proof_too_large")
        parts = proof.split(b".")
        if len(parts) != 3:
            raise InvalidProof("malformed_proof")
        header = _json_object(parts[0])
        typ, alg, jwk = header.get("typ"), header.get("alg"), header.get("jwk")
        if not isinstance(typ, str) or typ.lower() != PROOF_TYPE:
            raise InvalidProof("wrong_type")
        if not isinstance(alg, str) or alg not in self.algorithms:
            raise InvalidProof("algorithm_not_allowed")
        if "crit" in header:
            raise InvalidProof("unsupported_critical_header")
        if not isinstance(jwk, dict):
            raise InvalidProof("no_public_key")
        if PRIVATE_MEMBERS.intersection(jwk):
            raise InvalidProof("private_key_in_proof")
        key, key_thumbprint = self._key(jwk, alg)
        # The signature over the two segments as sent, by the algorithm the key was parsed for (no
        # second parse of the header and payload, as PyJWS.decode would do).
        try:
            valid = key.Algorithm.verify(parts[0] + b"." + parts[1], key.key, _b64decode(parts[2]))
        except (jwt.PyJWTError, ValueError, TypeError):
            valid = False
        if not valid:
            raise InvalidProof("bad_signature")
        claims = _json_object(parts[1])
        self._claims(scope, claims, token)
        if not hmac.compare_digest(key_thumbprint, jkt):
            raise InvalidProof("key_not_bound_to_token")
        return Proof(jkt, claims["jti"])

    def _key(self, jwk: dict[str, Any], alg: str) -> tuple[PyJWK, str]:
        """The parsed key and its RFC 7638 thumbprint. A client signs with one key for many
        requests: both are kept (bounded), by the key's JSON as sent."""
        name = json.dumps(jwk, sort_keys=True) + alg
        known = self._keys.get(name)
        if known is not None:
            self._keys.move_to_end(name)
            return known
        # RFC 7518 §3.4: each ECDSA algorithm names its curve; PyJWT would verify an ES256 signature
        # made with a P-384 key.
        if alg in CURVE_OF and jwk.get("crv") != CURVE_OF[alg]:
            raise InvalidProof("unusable_key")
        try:
            key = PyJWK(jwk, algorithm=alg)
        except (jwt.PyJWTError, ValueError, TypeError, KeyError):
            raise InvalidProof("unusable_key") from None
        known = self._keys[name] = (key, thumbprint(jwk))
        if len(self._keys) > KEY_CACHE_SIZE:
            self._keys.popitem(last=False)
        return known

    def _claims(self, scope: Scope, claims: dict[str, Any], token: bytes) -> None:
        jti, htm, htu, iat = claims.get("jti"), claims.get("htm"), claims.get("htu"), claims.get("iat")
        if not isinstance(jti, str) or not jti or len(jti) > MAX_JTI_LENGTH:
            raise InvalidProof("bad_jti")
        if htm != scope.get("method"):
            raise InvalidProof("htm_mismatch")
        if not isinstance(htu, str) or normal_url(htu) != request_url(scope, self.forwarded_header):
            raise InvalidProof("htu_mismatch")
        if not isinstance(iat, int | float) or isinstance(iat, bool) or not math.isfinite(iat):
            raise InvalidProof("bad_iat")
        now = time.time()
        if iat > now + self.leeway or iat < now - self.max_age - self.leeway:
            raise InvalidProof("iat_outside_window")
        ath = _b64(hashlib.sha256(token).digest())
        if not isinstance(claims.get("ath"), str) or not hmac.compare_digest(claims["ath"], ath):
            raise InvalidProof("ath_mismatch")
        if self.nonces is not None and not self.nonces.accepts(claims.get("nonce")):
            raise NonceRequired("nonce_required", self.nonces.current())
