"""What a JWT must be, beyond its signature, issuer, audience and times (which `TokenVerifier` in
authn.py checks), to be accepted as an access token here; and what it says of its user's
authentication.

Whom it believes: the issuer, for what it signed. What it refuses, so that a genuine token of the
issuer is not mistaken for another kind (ASVS 5.0 V9.2.2, V10.3.2):

- a `typ` other than `JWT` / `at+jwt` (RFC 7515 §4.1.9 lets `application/` be omitted); with
  JWT_REQUIRE_TYP anything but `at+jwt` (RFC 9068 §2.1), a missing `typ` included;
- an OpenID Connect ID token, even one whose `aud` is JWT_AUDIENCE: it has the shape of an access
  token (iss, aud, sub, exp), but carries `nonce` or `at_hash` / `c_hash` (OIDC Core §2, §3.3.2.11),
  which no access token does. An ID token says who logged in to a client, never what it may do here;
- `authorization_details` (RFC 9396) of a type no policy of the service reads: a token that asks
  for a fine-grained authorization the service would ignore is refused rather than over-served.
  JWT_AUTHORIZATION_DETAILS_TYPES lists the types a policy of yours reads (none by default); the
  principal carries those (`Principal.authorization_details`).

And what it reads for step-up (RFC 9470, authz.StepUp): `auth_time` (a NumericDate), `acr` (a
string) and `amr` (an array of strings), each as OIDC Core §2 defines it. A token whose value is
of another shape is refused, never read as absent.

Each refusal is `InvalidCredentials(reason)`: a 401 problem with `invalid_token`, and an
`authentication_failed` event with the reason. Only claims are read: no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..config import Settings
from .principal import InvalidCredentials

# RFC 7515 §4.1.9: "application/" may be omitted from `typ`; RFC 9068 names at+jwt.
ACCEPTED_TYPES = frozenset({"jwt", "at+jwt", "application/jwt", "application/at+jwt"})
ACCESS_TOKEN_TYPES = frozenset({"at+jwt", "application/at+jwt"})
# Claims only an OIDC ID token carries (OIDC Core §2, §3.3.2.11): their presence names one.
ID_TOKEN_CLAIMS = ("nonce", "at_hash", "c_hash")
MAX_AUTHORIZATION_DETAILS = 16
MAX_AMR = 16
MAX_CLAIM_TEXT = 255


@dataclass(frozen=True, slots=True)
class UserAuthentication:
    """How and when the user authenticated, as the token says (OIDC `auth_time`, `acr`, `amr`)."""

    auth_time: int | None
    acr: str | None
    amr: tuple[str, ...]


class AccessTokenRules:
    """The checks above, configured once from the settings; called for each token verified (the
    verified-token cache keeps what passed, so a token is judged once)."""

    def __init__(self, settings: Settings) -> None:
        self.require_typ = settings.jwt_require_typ
        self.detail_types = frozenset(settings.jwt_authorization_details_types)

    def check_header(self, header: Mapping[str, Any]) -> None:
        """Before the signature: the token's `typ`."""
        typ = header.get("typ")
        if typ is None:
            if self.require_typ:
                raise InvalidCredentials("typ_required")
            return
        if not isinstance(typ, str) or typ.lower() not in ACCEPTED_TYPES:
            raise InvalidCredentials("wrong_type")
        if self.require_typ and typ.lower() not in ACCESS_TOKEN_TYPES:
            raise InvalidCredentials("typ_not_at_jwt")

    def check_claims(self, claims: Mapping[str, Any]) -> tuple[Mapping[str, Any], ...]:
        """After the signature: refuse an ID token and unread authorization_details; the details
        a policy reads, for the principal."""
        if any(name in claims for name in ID_TOKEN_CLAIMS):
            raise InvalidCredentials("id_token")
        return self._authorization_details(claims.get("authorization_details"))

    def _authorization_details(self, details: object) -> tuple[Mapping[str, Any], ...]:
        if details is None:
            return ()
        if not isinstance(details, list) or not details or len(details) > MAX_AUTHORIZATION_DETAILS:
            raise InvalidCredentials("bad_authorization_details")
        for detail in details:
            if not isinstance(detail, Mapping) or not isinstance(detail.get("type"), str):
                raise InvalidCredentials("bad_authorization_details")
            if detail["type"] not in self.detail_types:
                raise InvalidCredentials("authorization_details_not_read")
        return tuple(details)


def user_authentication(claims: Mapping[str, Any]) -> UserAuthentication:
    """`auth_time`, `acr` and `amr` of a verified token; InvalidCredentials when one is there but
    not of its OIDC shape (a string `auth_time` is not "no auth_time": it is a token to refuse)."""
    auth_time = claims.get("auth_time")
    if auth_time is not None and (not isinstance(auth_time, int | float) or isinstance(auth_time, bool)):
        raise InvalidCredentials("bad_auth_time")
    acr = claims.get("acr")
    if acr is not None and (not isinstance(acr, str) or not acr or len(acr) > MAX_CLAIM_TEXT):
        raise InvalidCredentials("bad_acr")
    amr = claims.get("amr", [])
    if not isinstance(amr, list) or len(amr) > MAX_AMR or not all(isinstance(m, str) for m in amr):
        raise InvalidCredentials("bad_amr")
    return UserAuthentication(None if auth_time is None else int(auth_time), acr, tuple(amr))
