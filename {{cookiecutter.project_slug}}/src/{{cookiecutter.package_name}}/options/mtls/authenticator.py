"""Layer 4, the `mtls` option: the calling workload, named by its verified client certificate.

The certificate comes from one of two places:

- the TLS connection itself, when the service terminates TLS and verified the certificate at the
  handshake (`serve` with MTLS_SERVER_CERT, MTLS_SERVER_KEY and MTLS_CLIENT_CA): it is in the ASGI
  TLS extension, `scope["extensions"]["tls"]["client_cert_chain"]` (options/mtls/tls_peer.py);
- a header written by a proxy that terminated the client's TLS and verified its certificate
  (MTLS_PROXY_HEADER: nginx's `$ssl_client_escaped_cert` in `X-Client-Cert`, or Envoy's
  `X-Forwarded-Client-Cert`), believed only on a connection from a forwarding proxy (below).
  Either header on any other connection is a forgery: refused, whatever it holds. With
  MTLS_PROXY_CLIENT_CA, a forwarded certificate must also be issued by a CA of that bundle.

Whom it believes (ForwardingProxies, the one rule): a forwarded certificate is a copy of a public
document, never proof that the sender holds its key, so it means something only from a peer the
service tells apart from every other peer: on a TLS connection, a peer whose own handshake
certificate names an identity of MTLS_PROXY_IDENTITIES (a proxy that authenticated itself); on a
plain connection, a peer at one of MTLS_PROXY_ADDRESSES, each one address (a sidecar or a proxy on
loopback), never a range. TRUSTED_PROXIES (the client's address) plays no part. When the service
terminates TLS, the handshake's certificate is the identity, and a header replaces it only on a
proxy's connection. What the deployer makes true: nothing but the proxy can connect from its
address (loopback inside the pod, or a fixed address no other host can take), or the proxy's key
is the proxy's alone.

The workload identity is the certificate's SPIFFE ID (its `spiffe://` URI SAN), else its subject
DN (RFC 4514). Only identities in MTLS_IDENTITIES are accepted, each with its own scopes. The
certificate is a channel credential: layer 4 combines it with the caller's own credential, if any
(security/composition.py): a caller's token or API key is the principal, with the scopes both
allow; without one the workload is the principal, except in mode `mtls+jwt`, which requires one.

Refusals are 401 problems; the audit event names the reason and the identity (a keyed pseudonym in
the log, as every subject is), never the certificate.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal, NoReturn
from urllib.parse import unquote

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from starlette.types import Scope

from ...security.binding import CERTIFICATE_THUMBPRINT
from ...security.events import security_event
from ...security.principal import InvalidCredentials, Principal
from ...security.transport import IPAddress, socket_peer

Mode = Literal["mtls", "mtls+jwt"]
NGINX_HEADER = "X-Client-Cert"
ENVOY_HEADER = "X-Forwarded-Client-Cert"
FORWARDING_HEADERS = frozenset({NGINX_HEADER.lower().encode(), ENVOY_HEADER.lower().encode()})
SPIFFE_SCHEME = "spiffe://"
MAX_HEADER_BYTES = 16384
MAX_IDENTITY_LENGTH = 2048
# An Envoy-forwarded identity without a certificate (`URI=` only) carries no validity period: the
# principal it becomes is dated now, valid this long (it only bounds what is cached about it).
URI_ONLY_SECONDS = 60


@dataclass(frozen=True, slots=True)
class Workload:
    """Who a certificate names, and when the certificate is valid (epoch seconds)."""

    identity: str
    not_before: int
    not_after: int
    # base64url SHA-256 of the certificate's DER: a certificate-bound token's `cnf.x5t#S256` (RFC
    # 8705). None when only a URI was forwarded (no certificate to bind a token to).
    thumbprint: str | None = None


def workload_of(certificate: x509.Certificate) -> Workload:
    """The SPIFFE ID of the certificate (exactly one `spiffe://` URI SAN), else its subject DN."""
    try:
        sans = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = sans.get_values_for_type(x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        uris = []
    spiffe = [uri for uri in uris if uri.startswith(SPIFFE_SCHEME)]
    if len(spiffe) > 1:
        raise InvalidCredentials("several_spiffe_ids")  # an SVID has exactly one
    identity = spiffe[0] if spiffe else certificate.subject.rfc4514_string()
    if not identity or len(identity) > MAX_IDENTITY_LENGTH:
        raise InvalidCredentials("no_identity")
    return Workload(
        identity,
        int(certificate.not_valid_before_utc.timestamp()),
        int(certificate.not_valid_after_utc.timestamp()),
        base64.urlsafe_b64encode(certificate.fingerprint(hashes.SHA256())).rstrip(b"=").decode("ascii"),
    )


@lru_cache(maxsize=1024)
def workload_of_pem(pem: str) -> Workload:
    """Parsed once per certificate: a connection's requests, and a proxy's repeat callers, all carry
    the same one. Only verified certificates get here (the handshake's, or a trusted proxy's)."""
    try:
        certificate = x509.load_pem_x509_certificate(pem.encode("latin-1"))
    except ValueError:
        raise InvalidCredentials("malformed_certificate") from None
    return workload_of(certificate)


def envoy_elements(value: str) -> list[dict[str, str]]:
    """The elements of an X-Forwarded-Client-Cert header: `,`-separated, each `;`-separated
    `Key=value` pairs, values optionally in double quotes (which may hold `,`, `;` and `\\"`)."""
    elements: list[dict[str, str]] = []
    pairs: dict[str, str] = {}
    key, buffer, quoted, escaped, in_value = "", [], False, False, False
    for char in value + ",":
        if quoted:
            if escaped:
                buffer.append(char)
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                quoted = False
            else:
                buffer.append(char)
        elif char == '"' and in_value:
            quoted = True
        elif char == "=" and not in_value:
            key, buffer, in_value = "".join(buffer).strip().lower(), [], True
        elif char in ";,":
            if in_value and key:
                pairs[key] = "".join(buffer).strip()
            key, buffer, in_value = "", [], False
            if char == ",":
                elements.append(pairs)
                pairs = {}
        else:
            buffer.append(char)
    if quoted:
        raise InvalidCredentials("malformed_certificate_header")
    return elements


class ForwardedIssuers:
    """MTLS_PROXY_CLIENT_CA: the CA bundle a certificate forwarded by a trusted proxy must be issued
    by, checked again here (defence in depth: a proxy that forwards what it did not verify, or
    verifies against another CA, is not believed). The check is the issuer's signature on the
    certificate, by a CA certificate of the bundle whose subject is the certificate's issuer (put
    the issuing intermediate in the bundle); once per certificate (cached)."""

    def __init__(self, bundle: bytes) -> None:
        self.cas = [ca for ca in x509.load_pem_x509_certificates(bundle) if _is_ca(ca)]
        if not self.cas:
            raise ValueError("no CA certificate in the bundle")
        self.issued = lru_cache(maxsize=1024)(self._issued)

    def _issued(self, pem: str) -> bool:
        try:
            certificate = x509.load_pem_x509_certificate(pem.encode("latin-1"))
        except ValueError:
            return False
        for ca in self.cas:
            if ca.subject != certificate.issuer:
                continue
            try:
                certificate.verify_directly_issued_by(ca)
            except (ValueError, TypeError, InvalidSignature):
                continue
            return True
        return False


def _is_ca(certificate: x509.Certificate) -> bool:
    try:
        return bool(certificate.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


class ForwardingProxies:
    """Who may forward a client certificate: on a TLS connection, a peer whose handshake identity
    is one of `identities` (MTLS_PROXY_IDENTITIES); on a plain one, a peer at one of `addresses`
    (MTLS_PROXY_ADDRESSES, single addresses). Nobody else, whatever TRUSTED_PROXIES says."""

    def __init__(self, *, addresses: Iterable[IPAddress] = (), identities: Iterable[str] = ()) -> None:
        self.addresses = frozenset(addresses)
        self.identities = frozenset(identities)

    def forwarded_by_proxy(self, scope: Scope, handshake: Workload | None) -> bool:
        """Is the peer of this request's connection a forwarding proxy? `handshake`: the identity
        the peer proved at the TLS handshake, None on a plain connection."""
        if handshake is not None:
            return handshake.identity in self.identities
        return bool(self.addresses) and socket_peer(scope) in self.addresses


class ClientCertificate:
    """The `mtls` option's credential: a channel credential (security/principal.py). It always
    answers (the workload, or InvalidCredentials), so no request under /api/ gets past layer 4
    without an allowed certificate; layer 4 combines the workload with the caller's own credential
    (security/composition.py). In mode `mtls+jwt` the workload alone is never the principal."""

    challenge = "mTLS"

    def __init__(
        self,
        *,
        identities: Mapping[str, Iterable[str]],
        mode: Mode,
        proxy_header: str,
        proxies: ForwardingProxies | None = None,
        forwarded_issuers: ForwardedIssuers | None = None,
    ) -> None:
        self.identities = {identity: frozenset(scopes) for identity, scopes in identities.items()}
        self.mode = mode
        self.caller_required = mode == "mtls+jwt"
        self.proxy_header = proxy_header.lower().encode("latin-1")
        self.envoy = self.proxy_header == ENVOY_HEADER.lower().encode()
        self.proxies = proxies or ForwardingProxies()
        self.forwarded_issuers = forwarded_issuers

    async def identify(self, scope: Scope) -> Principal:
        workload = self._workload(scope)
        now = time.time()
        if workload.not_after < now:
            self._refuse("certificate_expired", workload)
        if workload.not_before > now + 60:  # a minute of clock skew
            self._refuse("certificate_not_yet_valid", workload)
        scopes = self.identities.get(workload.identity)
        if scopes is None:
            self._refuse("identity_not_allowed", workload)
        if workload.thumbprint is not None:
            # For a certificate-bound token of the caller (security/binding.py).
            scope.setdefault("state", {})[CERTIFICATE_THUMBPRINT] = workload.thumbprint
        return Principal(
            workload.identity, scopes, None, workload.not_before, workload.not_after, credential=self.challenge
        )

    def _refuse(self, reason: str, workload: Workload | None = None) -> NoReturn:
        # The identity goes in as `subject`, which the log formatter pseudonymises; never the certificate.
        if workload is None:
            security_event("client_certificate_refused", reason=reason, mode=self.mode)
        else:
            security_event("client_certificate_refused", reason=reason, mode=self.mode, subject=workload.identity)
        raise InvalidCredentials(reason)

    def _workload(self, scope: Scope) -> Workload:
        forwarded: list[bytes] = []
        other = False
        for name, value in scope["headers"]:
            if name in FORWARDING_HEADERS:
                if name == self.proxy_header:
                    forwarded.append(value)
                else:
                    other = True
        tls = (scope.get("extensions") or {}).get("tls") or {}
        chain = tls.get("client_cert_chain") or ()
        handshake = workload_of_pem(chain[0]) if chain else None
        if not self.proxies.forwarded_by_proxy(scope, handshake):
            if forwarded or other:
                # Only a forwarding proxy writes these; from anyone else they are forged, and on a TLS
                # connection the handshake's certificate is the identity: no header replaces it.
                self._refuse("forwarded_certificate_from_untrusted_peer")
            if handshake is None:
                self._refuse("no_client_certificate")
            return handshake
        # A proxy's connection: the certificate it forwards is the client's; its own never is.
        if not forwarded:
            self._refuse("no_client_certificate")
        if len(forwarded) > 1:
            self._refuse("several_certificate_headers")
        return self._forwarded(forwarded[0])

    def _forwarded_pem(self, pem: str) -> Workload:
        if self.forwarded_issuers is not None and not self.forwarded_issuers.issued(pem):
            self._refuse("forwarded_certificate_not_issued_by_ca")
        return workload_of_pem(pem)

    def _forwarded(self, value: bytes) -> Workload:
        if len(value) > MAX_HEADER_BYTES:
            self._refuse("certificate_header_too_large")
        text = value.decode("latin-1")
        if not self.envoy:
            return self._forwarded_pem(unquote(text))  # nginx: $ssl_client_escaped_cert, URL-encoded PEM
        elements = envoy_elements(text)
        if not elements:
            self._refuse("malformed_certificate_header")
        # Each proxy appends its element: the last one is the certificate the trusted proxy verified.
        element = elements[-1]
        if element.get("cert"):
            return self._forwarded_pem(unquote(element["cert"]))
        if self.forwarded_issuers is not None:
            self._refuse("forwarded_certificate_not_checkable")  # URI= only: no certificate to check
        uri = element.get("uri", "")
        if uri.startswith(SPIFFE_SCHEME) and len(uri) <= MAX_IDENTITY_LENGTH:
            now = int(time.time())
            return Workload(uri, now, now + URI_ONLY_SECONDS)
        self._refuse("no_certificate_in_header")
