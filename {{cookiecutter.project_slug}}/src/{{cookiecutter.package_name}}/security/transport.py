"""Layer 1, transport: security headers, trusted hosts, the client address, strict CORS and the
request body limit. Each is a small pure ASGI middleware with one job."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..config import IPNetwork
from .errors import ProblemDetail, problem
from .events import security_event

# A JSON API loads nothing, is framed by nobody and is the target of no form: `'none'` everywhere.
API_CSP = "default-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
# Swagger UI and ReDoc load their bundle from jsDelivr and run one inline bootstrap script.
DOCS_CSP = (
    "default-src 'none'; script-src 'self' https://cdn.jsdelivr.net 'unsafe-inline'; "
    "style-src 'self' https://cdn.jsdelivr.net 'unsafe-inline'; img-src 'self' data: https://fastapi.tiangolo.com; "
    "connect-src 'self'; worker-src blob:; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
)
DOCS_PATHS = frozenset({"/docs", "/docs/oauth2-redirect", "/redoc"})
HSTS = "max-age=63072000; includeSubDomains"  # two years; `preload` is a decision for the domain owner
PERMISSIONS_POLICY = (
    "accelerometer=(), autoplay=(), camera=(), display-capture=(), fullscreen=(), geolocation=(), "
    "gyroscope=(), magnetometer=(), microphone=(), midi=(), payment=(), usb=()"
)
_BANNERS = (b"server", b"x-powered-by")


def _encoded(headers: dict[str, str]) -> list[tuple[bytes, bytes]]:
    return [(name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in headers.items()]


class SecurityHeaders:
    """Adds the security headers to every response, errors and 500s included (it wraps the
    whole application, Starlette's error handler too), and removes server banners."""

    def __init__(self, app: ASGIApp, *, hsts: bool, docs_enabled: bool) -> None:
        self.app = app
        self.docs_enabled = docs_enabled
        common = {
            "X-Content-Type-Options": "nosniff",
            "X-Frame-Options": "DENY",
            "Referrer-Policy": "no-referrer",
            "Cross-Origin-Opener-Policy": "same-origin",
            "Cross-Origin-Resource-Policy": "same-origin",
            "Permissions-Policy": PERMISSIONS_POLICY,
            "Cache-Control": "no-store",
        }
        if hsts:
            common["Strict-Transport-Security"] = HSTS
        self.api_headers = _encoded(
            {**common, "Cross-Origin-Embedder-Policy": "require-corp", "Content-Security-Policy": API_CSP}
        )
        # The docs pages embed a bundle from a CDN, which require-corp would block.
        self.docs_headers = _encoded(
            {**common, "Cross-Origin-Embedder-Policy": "unsafe-none", "Content-Security-Policy": DOCS_CSP}
        )
        self.replaced = frozenset({name for name, _ in self.api_headers} | set(_BANNERS))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        extra = self.docs_headers if self.docs_enabled and scope["path"] in DOCS_PATHS else self.api_headers

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                kept = [(k, v) for k, v in message.get("headers", ()) if k.lower() not in self.replaced]
                message["headers"] = kept + extra
            await send(message)

        await self.app(scope, receive, send_with_headers)


class TrustedHosts:
    """Answers 400 to a Host header that is not in TRUSTED_HOSTS (exact, or `*.example.com`)."""

    def __init__(self, app: ASGIApp, *, allowed: Iterable[str]) -> None:
        self.app = app
        hosts = [_hostname(host) if not host.startswith("*.") else host.lower() for host in allowed]
        self.any = "*" in hosts
        self.exact = frozenset(host for host in hosts if not host.startswith("*."))
        self.suffixes = tuple(host[1:] for host in hosts if host.startswith("*."))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or self.any:
            await self.app(scope, receive, send)
            return
        host = _hostname(Headers(scope=scope).get("host", ""))
        if host in self.exact or (self.suffixes and host.endswith(self.suffixes)):
            await self.app(scope, receive, send)
            return
        security_event("host_refused", host=host[:255])
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        await problem(400, "The Host header is not allowed.", name="host-not-allowed")(scope, receive, send)


def _hostname(host_header: str) -> str:
    """The host of a Host header, lower case, without port or IPv6 brackets: `[::1]:80` -> `::1`."""
    host = host_header.strip().lower()
    if host.startswith("["):
        end = host.find("]")
        return host[1:end] if end > 0 else ""
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def _ip(text: str) -> IPAddress | None:
    """An address from a peer or a forwarding hop: `1.2.3.4`, `1.2.3.4:80`, `[2001:db8::1]:80`,
    `2001:db8::1`. IPv4-mapped IPv6 is unwrapped. None for anything else (`unknown`, `_hidden`)."""
    text = text.strip().strip('"')
    if text.startswith("["):
        text = text[1 : text.find("]")] if "]" in text else ""
    elif text.count(":") == 1:
        text = text.split(":", 1)[0]
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


class ClientAddress:
    """Decides the client address once, for every later layer (rate limits, audit): the socket
    peer, unless the peer is in TRUSTED_PROXIES; then the chain of X-Forwarded-For or Forwarded
    is walked from the right, skipping trusted proxies, and the first untrusted hop is the client.
    The result replaces scope["client"].

    A proxy appends to one of the two headers and passes the other through from the client. When
    both are present and name different clients, one of them is forged and neither is believed.
    """

    def __init__(self, app: ASGIApp, *, trusted: tuple[IPNetwork, ...]) -> None:
        self.app = app
        self.trusted = trusted

    def _is_trusted(self, ip: IPAddress) -> bool:
        return any(ip in network for network in self.trusted)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket") and self.trusted:
            client = scope.get("client")
            peer = _ip(client[0]) if client else None
            if peer is not None and self._is_trusted(peer):
                scope["client"] = (self._resolve(peer, scope["headers"]), 0)
        await self.app(scope, receive, send)

    def _resolve(self, peer: IPAddress, headers: list[tuple[bytes, bytes]]) -> str:
        xff = _header_values(headers, b"x-forwarded-for")
        forwarded = _header_values(headers, b"forwarded")
        by_xff = self._walk(peer, _xff_chain(xff)) if xff else None
        by_forwarded = self._walk(peer, _forwarded_chain(forwarded)) if forwarded else None
        if by_xff is not None and by_forwarded is not None and by_xff != by_forwarded:
            security_event("forwarded_headers_conflict", peer=str(peer))
            return str(peer)
        return str(by_xff or by_forwarded or peer)

    def _walk(self, peer: IPAddress, chain: list[str]) -> IPAddress:
        address = peer
        for hop in reversed(chain):
            ip = _ip(hop)
            if ip is None:
                return address  # a malformed hop: believe nothing further left
            address = ip
            if not self._is_trusted(ip):
                return ip
        return address


def _header_values(headers: list[tuple[bytes, bytes]], name: bytes) -> list[str]:
    return [value.decode("latin-1") for key, value in headers if key == name]


def _xff_chain(values: list[str]) -> list[str]:
    """Addresses of every X-Forwarded-For occurrence, in order (RFC 9110 combines them)."""
    return [part for value in values for part in value.split(",")]


def _forwarded_chain(values: list[str]) -> list[str]:
    """The `for=` of each RFC 7239 Forwarded element, in order; an element without one counts as
    an unknown hop, so the walk stops there."""
    chain = []
    for value in values:
        for element in value.split(","):
            hop = "unknown"
            for pair in element.split(";"):
                name, _, val = pair.strip().partition("=")
                if name.lower() == "for":
                    hop = val
            chain.append(hop)
    return chain


class StrictCors:
    """CORS with an exact-match allowlist. A disallowed origin is never reflected; its preflight
    gets 403. Credentials are allowed only with explicit origins, never with `*`."""

    METHODS = ("GET", "POST", "PUT", "DELETE")
    HEADERS = ("Content-Type", "Authorization")
    # Response fields a browser script may read beyond the CORS-safelisted ones.
    EXPOSED = ("Retry-After", "RateLimit", "RateLimit-Policy", "WWW-Authenticate", "X-Trace-Id")
    MAX_AGE = "86400"

    def __init__(self, app: ASGIApp, *, allowed_origins: Iterable[str]) -> None:
        self.app = app
        # Browsers send scheme and host in lower case; configured values are compared the same way.
        origins = [origin.lower() for origin in allowed_origins]
        self.wildcard = "*" in origins
        self.origins = frozenset(origin for origin in origins if origin != "*")
        self.methods = frozenset(self.METHODS)
        self.headers = frozenset(header.lower() for header in self.HEADERS)
        self.preflight_headers = _encoded(
            {
                "Access-Control-Allow-Methods": ", ".join(self.METHODS),
                "Access-Control-Allow-Headers": ", ".join(self.HEADERS),
                "Access-Control-Max-Age": self.MAX_AGE,
                "Vary": "Origin",
            }
        )
        self.expose = ", ".join(self.EXPOSED)

    def _allowed(self, origin: str) -> bool:
        return origin in self.origins or (self.wildcard and origin != "null")

    def _allow_origin(self, origin: str) -> dict[str, str]:
        if origin in self.origins:
            return {"Access-Control-Allow-Origin": origin, "Access-Control-Allow-Credentials": "true"}
        return {"Access-Control-Allow-Origin": "*"}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        origin = headers.get("origin")
        if origin is None:
            await self.app(scope, receive, send)
            return
        allowed = self._allowed(origin)
        if scope["method"] == "OPTIONS" and "access-control-request-method" in headers:
            await self._preflight(scope, receive, send, origin, allowed, headers)
            return
        await self.app(scope, receive, self._simple_sender(send, origin, allowed))

    async def _preflight(
        self, scope: Scope, receive: Receive, send: Send, origin: str, allowed: bool, headers: Headers
    ) -> None:
        method = headers["access-control-request-method"]
        requested = {
            h.strip().lower() for h in headers.get("access-control-request-headers", "").split(",") if h.strip()
        }
        if not allowed or method not in self.methods or not requested <= self.headers:
            security_event("cors_refused", origin=origin[:255], method=method[:16], preflight=True)
            await problem(
                403, "This cross-origin request is not allowed.", name="cors-refused", headers={"Vary": "Origin"}
            )(scope, receive, send)
            return
        response_headers = _encoded(self._allow_origin(origin)) + self.preflight_headers
        await send({"type": "http.response.start", "status": 204, "headers": response_headers})
        await send({"type": "http.response.body", "body": b""})

    def _simple_sender(self, send: Send, origin: str, allowed: bool) -> Send:
        async def send_with_cors(message: Message) -> None:
            if message["type"] == "http.response.start":
                response_headers = MutableHeaders(scope=message)
                response_headers.add_vary_header("Origin")
                if allowed:
                    for key, value in self._allow_origin(origin).items():
                        response_headers[key] = value
                    response_headers["Access-Control-Expose-Headers"] = self.expose
            await send(message)

        return send_with_cors


class BodyTooLarge(HTTPException):
    """Raised from `receive` once the body outgrows the limit. An HTTPException, so FastAPI's body
    reader lets it through unchanged and the error handler answers the same 413 problem."""

    problem_name = "body-too-large"

    def __init__(self, max_bytes: int) -> None:
        super().__init__(status_code=413, detail=ProblemDetail(_too_large(max_bytes)))


def _too_large(max_bytes: int) -> str:
    return f"The request body is larger than {max_bytes} bytes."


class BodyLimit:
    """Refuses bodies over MAX_BODY_BYTES with 413: at once when Content-Length says so, and while
    streaming otherwise, so a lying or absent Content-Length cannot get more through."""

    def __init__(self, app: ASGIApp, *, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length")
        if declared is not None:
            if not declared.isdigit():
                security_event("bad_content_length")
                await problem(400, "The Content-Length header is not valid.", name="bad-content-length")(
                    scope, receive, send
                )
                return
            if int(declared) > self.max_bytes:
                security_event("body_too_large", limit=self.max_bytes, declared=True)
                await problem(413, _too_large(self.max_bytes), name=BodyTooLarge.problem_name)(scope, receive, send)
                return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    security_event("body_too_large", limit=self.max_bytes, declared=False)
                    raise BodyTooLarge(self.max_bytes)
            return message

        await self.app(scope, limited_receive, send)
