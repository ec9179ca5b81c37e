"""Layer 1, transport: security headers, trusted hosts, the client address, strict CORS and the
request body limit (size, encoding, read deadline), and the refusal of WebSocket handshakes. Each is
a small pure ASGI middleware with one job."""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import re
from collections.abc import Iterable

from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..config import IPNetwork
from .errors import ProblemDetail, problem
from .events import bind_request, bind_trace, new_trace, security_event, unbind_request, unbind_trace
from .principal import app_path

# A JSON API loads nothing, is framed by nobody and is the target of no form: `'none'` everywhere.
API_CSP = "default-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
# The API page (docs_page.py) loads Swagger UI's script, stylesheet and initializer from the service
# itself, its icons are data: URLs in the stylesheet, and it fetches /openapi.json (and, on "Try it
# out", the API): its own origin only, nothing inline.
DOCS_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
)
DOCS_PATHS = frozenset({"/docs"})
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
        # The API page loads only from its own origin, which require-corp admits.
        self.docs_headers = _encoded(
            {**common, "Cross-Origin-Embedder-Policy": "require-corp", "Content-Security-Policy": DOCS_CSP}
        )
        self.replaced = frozenset({name for name, _ in self.api_headers} | set(_BANNERS))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        extra = self.docs_headers if self.docs_enabled and app_path(scope) in DOCS_PATHS else self.api_headers

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                kept = [(k, v) for k, v in message.get("headers", ()) if k.lower() not in self.replaced]
                message["headers"] = kept + extra
            await send(message)

        await self.app(scope, receive, send_with_headers)


class TrustedHosts:
    """Answers 400 to a Host header that is not in TRUSTED_HOSTS (exact, or `*.example.com`), and to
    one that is not a well-formed `host[:port]` at all (`localhost:80@evil.example`)."""

    CACHE_SIZE = 256

    def __init__(self, app: ASGIApp, *, allowed: Iterable[str]) -> None:
        self.app = app
        hosts = [_configured_host(host) if not host.startswith("*.") else host.lower() for host in allowed]
        self.any = "*" in hosts
        self.exact = frozenset(host for host in hosts if not host.startswith("*."))
        self.suffixes = tuple(host[1:] for host in hosts if host.startswith("*."))
        # Raw Host values already accepted: the usual request skips the parse. Only accepted values
        # are remembered, and only so many, so a client cannot grow it.
        self.accepted: set[bytes] = set()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or self.any:
            await self.app(scope, receive, send)
            return
        raw = next((value for key, value in scope["headers"] if key == b"host"), b"")
        if raw in self.accepted:
            await self.app(scope, receive, send)
            return
        host = _host_of(raw.decode("latin-1"))
        if host is not None and (host in self.exact or (self.suffixes and host.endswith(self.suffixes))):
            if len(self.accepted) < self.CACHE_SIZE:
                self.accepted.add(raw)
            await self.app(scope, receive, send)
            return
        security_event("host_refused", host=raw.decode("latin-1")[:255], malformed=host is None)
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        await problem(400, "The Host header is not allowed.", name="host-not-allowed")(scope, receive, send)


# RFC 9110 `Host = uri-host [ ":" port ]`: a name or IPv4 address, or an IPv6 literal in brackets,
# then an optional port of digits. Nothing else (userinfo, text after the bracket, spaces) is a host.
_HOST = re.compile(r"(?:\[([0-9a-f:.]+)\]|([a-z0-9._-]+))(?::[0-9]{0,5})?")


def _host_of(host_header: str) -> str | None:
    """The host of a Host header, lower case, without port or IPv6 brackets (`[::1]:80` -> `::1`);
    None when the header is not a well-formed host."""
    match = _HOST.fullmatch(host_header.lower())
    if match is None:
        return None
    return match.group(1) or match.group(2)


def _configured_host(name: str) -> str:
    """A TRUSTED_HOSTS entry as `_host_of` returns hosts: `::1`, `[::1]` and `[::1]:80` are `::1`."""
    host = name.strip().lower()
    if host.startswith("["):
        end = host.find("]")
        return host[1:end] if end > 0 else host
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


# Scope state: the socket peer, kept when ClientAddress replaces scope["client"] (see socket_peer).
PROXY_PEER = "proxy_peer"


class ClientAddress:
    """Decides the client address once, for every later layer (rate limits, audit): the socket
    peer, unless the peer is in TRUSTED_PROXIES; then the chain of the one header the proxy writes
    (FORWARDED_HEADER: `X-Forwarded-For` or RFC 7239 `Forwarded`) is walked from the right,
    skipping trusted proxies, and the first untrusted hop is the client. The result replaces
    scope["client"]; `state["via_trusted_proxy"]` records that the peer was a trusted proxy, and
    `state["proxy_peer"]` which one (`socket_peer`).

    The other header is never read: the proxy passes it through from the client unchanged, so it
    says whatever the client wants.

    Whom it believes: every host TRUSTED_PROXIES covers, about the client's address only. A range
    there is safe only where nothing but the proxies can connect from it (the shipped Kubernetes
    NetworkPolicy admits only the ingress controller's pods); the address decides rate limits,
    lockouts and API keys' allowed networks, so a host in the range that is no proxy could choose
    its own. A forwarded client certificate is a stronger claim, never believed on this basis
    (options/mtls/authenticator.py, ForwardingProxies).
    """

    def __init__(self, app: ASGIApp, *, trusted: tuple[IPNetwork, ...], header: str = "X-Forwarded-For") -> None:
        self.app = app
        self.trusted = trusted
        self.header = header.lower().encode("latin-1")
        self.chain = _forwarded_chain if self.header == b"forwarded" else _xff_chain

    def _is_trusted(self, ip: IPAddress) -> bool:
        return any(ip in network for network in self.trusted)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket") and self.trusted:
            client = scope.get("client")
            peer = _ip(client[0]) if client else None
            if peer is not None and self._is_trusted(peer):
                scope["client"] = (self._resolve(peer, scope["headers"]), 0)
                state = scope.setdefault("state", {})
                state["via_trusted_proxy"] = True
                state[PROXY_PEER] = peer
        await self.app(scope, receive, send)

    def _resolve(self, peer: IPAddress, headers: list[tuple[bytes, bytes]]) -> str:
        values = _header_values(headers, self.header)
        return str(self._walk(peer, self.chain(values)) if values else peer)

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


def socket_peer(scope: Scope) -> IPAddress | None:
    """The address at the other end of the connection, whatever ClientAddress made of
    scope["client"]: for a check that must know who sent the request's bytes, not whom they are for
    (a forwarded client certificate is believed only from one proxy address). None when unknown."""
    peer: IPAddress | None = scope.get("state", {}).get(PROXY_PEER)
    if peer is not None:
        return peer
    client = scope.get("client")
    return _ip(client[0]) if client else None


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


@functools.lru_cache(maxsize=4096)
def rate_limit_bucket(address: str, v6_prefix: int) -> str:
    """The rate-limit key of a client address: an IPv4 address is its own bucket (/32), an IPv6
    address counts with its whole /`v6_prefix` network (RATE_LIMIT_IPV6_PREFIX, default 64: one
    subscriber's allocation), so rotating addresses inside one's own prefix buys no new quota.
    `2001:db8:1:2:aaaa::1` -> `2001:db8:1:2::/64`. Anything that is not an address is its own key.
    Cached: the limiter asks once per request, mostly for the same few addresses."""
    if ":" not in address:
        return address
    try:
        ip = ipaddress.IPv6Address(address)
    except ValueError:
        return address
    if ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ipaddress.IPv6Network((int(ip) >> (128 - v6_prefix) << (128 - v6_prefix), v6_prefix)))


class RefuseWebSocket:
    """The service has no WebSocket route, so a handshake is refused here, before any later layer
    spends work on it (the token check would otherwise run, unlimited and unlogged): the close
    before accept makes the server answer the handshake with 403. A service that adds a WebSocket
    route removes this layer and makes the address limit and the audit line count handshakes first.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "websocket":
            await self.app(scope, receive, send)
            return
        trace_token = bind_trace(new_trace())
        request_token = bind_request(scope)
        try:
            security_event("websocket_refused")
        finally:
            unbind_request(request_token)
            unbind_trace(trace_token)
        await send({"type": "websocket.close", "code": 1008})


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


class BodyReadTimeout(HTTPException):
    """Raised from `receive` when the body has not arrived within BODY_READ_TIMEOUT_SECONDS: a
    client trickling its body holds a connection and a task for no longer than that."""

    problem_name = "body-read-timeout"

    def __init__(self, seconds: float) -> None:
        detail = ProblemDetail(f"The request body did not arrive within {seconds:g} seconds.")
        super().__init__(status_code=408, detail=detail, headers={"Connection": "close"})


def _too_large(max_bytes: int) -> str:
    return f"The request body is larger than {max_bytes} bytes."


_IDENTITY = (b"", b"identity")


class BodyLimit:
    """Refuses bodies over MAX_BODY_BYTES with 413: at once when Content-Length says so, and while
    streaming otherwise, so a lying or absent Content-Length cannot get more through. A body must
    arrive within BODY_READ_TIMEOUT_SECONDS of the first read (408), and unencoded: the service
    never decompresses, so `Content-Encoding` other than identity is 415 (a gzip body would
    otherwise be validated as the bytes it is, and a decompressing layer added later would undo
    the size limit)."""

    def __init__(self, app: ASGIApp, *, max_bytes: int, read_timeout: float = 30.0) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.read_timeout = read_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = encoding = None
        for key, value in scope["headers"]:
            if key == b"content-length":
                declared = value if declared is None else declared
            elif key == b"content-encoding":
                encoding = value
        if encoding is not None and encoding.strip().lower() not in _IDENTITY:
            security_event("content_encoding_refused", encoding=encoding.decode("latin-1")[:64])
            await problem(415, "Request bodies must not be content-encoded.", name="unsupported-content-encoding")(
                scope, receive, send
            )
            return
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
        deadline: float | None = None
        complete = False

        async def limited_receive() -> Message:
            nonlocal received, deadline, complete
            if complete:  # after the body, receive only waits for a disconnect
                return await receive()
            if deadline is None:
                deadline = asyncio.get_running_loop().time() + self.read_timeout
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                security_event("body_read_timeout", timeout=self.read_timeout, received=received)
                raise BodyReadTimeout(self.read_timeout) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    security_event("body_too_large", limit=self.max_bytes, declared=False)
                    raise BodyTooLarge(self.max_bytes)
                complete = not message.get("more_body", False)
            else:
                complete = True
            return message

        await self.app(scope, limited_receive, send)
