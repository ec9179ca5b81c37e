"""Layer 1, transport: security headers, trusted hosts, the client address, strict CORS and the
request body limit. Each is a small pure ASGI middleware with one job."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..config import IPNetwork, Settings
from .errors import problem
from .events import security_event

API_CSP = "default-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
# Swagger UI and ReDoc load their bundle from jsDelivr and run one inline bootstrap script.
DOCS_CSP = (
    "default-src 'none'; script-src 'self' https://cdn.jsdelivr.net 'unsafe-inline'; "
    "style-src 'self' https://cdn.jsdelivr.net 'unsafe-inline'; img-src 'self' data: https://fastapi.tiangolo.com; "
    "connect-src 'self'; worker-src blob:; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
)
DOCS_PATHS = frozenset({"/docs", "/docs/oauth2-redirect", "/redoc"})
HSTS = "max-age=63072000; includeSubDomains"
PERMISSIONS_POLICY = (
    "accelerometer=(), autoplay=(), camera=(), display-capture=(), geolocation=(), gyroscope=(), "
    "magnetometer=(), microphone=(), midi=(), payment=(), usb=(), interest-cohort=()"
)
_BANNERS = (b"server", b"x-powered-by")


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
        self.api_headers = [
            (k.lower().encode(), v.encode())
            for k, v in {
                **common,
                "Cross-Origin-Embedder-Policy": "require-corp",
                "Content-Security-Policy": API_CSP,
            }.items()
        ]
        self.docs_headers = [
            (k.lower().encode(), v.encode())
            for k, v in {
                **common,
                "Cross-Origin-Embedder-Policy": "unsafe-none",
                "Content-Security-Policy": DOCS_CSP,
            }.items()
        ]
        self.names = {name for name, _ in self.api_headers} | set(_BANNERS)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        extra = self.docs_headers if self.docs_enabled and scope["path"] in DOCS_PATHS else self.api_headers

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                kept = [(k, v) for k, v in message.get("headers", []) if k.lower() not in self.names]
                message["headers"] = kept + extra
            await send(message)

        await self.app(scope, receive, send_with_headers)


class TrustedHosts:
    """Answers 400 to a Host header that is not in TRUSTED_HOSTS (exact, or `*.example.com`)."""

    def __init__(self, app: ASGIApp, *, allowed: Iterable[str]) -> None:
        self.app = app
        allowed = [host.lower() for host in allowed]
        self.any = "*" in allowed
        self.exact = frozenset(host for host in allowed if not host.startswith("*."))
        self.suffixes = tuple(host[1:] for host in allowed if host.startswith("*."))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or self.any:
            await self.app(scope, receive, send)
            return
        host = _hostname(Headers(scope=scope).get("host", ""))
        if host in self.exact or (self.suffixes and host.endswith(self.suffixes)):
            await self.app(scope, receive, send)
            return
        security_event("host_refused", host=host[:255])
        await problem(400, "The Host header is not allowed.", name="host-not-allowed")(scope, receive, send)


def _hostname(host_header: str) -> str:
    host = host_header.strip().lower()
    if host.startswith("["):  # [::1]:8000
        return host[: host.find("]") + 1] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


class ClientAddress:
    """Decides the client address once, for every later layer: the socket peer, unless the peer
    is in TRUSTED_PROXIES, then the nearest untrusted hop of X-Forwarded-For (walked from the
    right). The result replaces scope["client"]."""

    def __init__(self, app: ASGIApp, *, trusted: tuple[IPNetwork, ...]) -> None:
        self.app = app
        self.trusted = trusted

    def _is_trusted(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in network for network in self.trusted)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket") and self.trusted:
            client = scope.get("client")
            if client and self._is_trusted(client[0]):
                forwarded = _forwarded_chain(scope["headers"])
                scope["client"] = (self._client_from(client[0], forwarded), 0)
        await self.app(scope, receive, send)

    def _client_from(self, peer: str, chain: list[str]) -> str:
        address = peer
        for hop in reversed(chain):
            try:
                hop = str(ipaddress.ip_address(hop))
            except ValueError:
                return address  # a malformed hop: believe nothing further left
            address = hop
            if not self._is_trusted(hop):
                return hop
        return address


def _forwarded_chain(headers: list[tuple[bytes, bytes]]) -> list[str]:
    """Addresses of X-Forwarded-For (all occurrences), else of RFC 7239 Forwarded `for=`."""
    xff = [v.decode("latin-1") for k, v in headers if k == b"x-forwarded-for"]
    if xff:
        return [part.strip() for value in xff for part in value.split(",")]
    chain = []
    for key, value in headers:
        if key != b"forwarded":
            continue
        for element in value.decode("latin-1").split(","):
            for pair in element.split(";"):
                name, _, val = pair.strip().partition("=")
                if name.lower() == "for":
                    val = val.strip('"')
                    if val.startswith("["):
                        val = val[1 : val.find("]")]
                    elif val.count(":") == 1:
                        val = val.split(":")[0]
                    chain.append(val)
    return chain


class StrictCors:
    """CORS with an exact-match allowlist. A disallowed origin is never reflected; its preflight
    gets 403. Credentials are allowed only with explicit origins, never with `*`."""

    METHODS = "GET, POST, PUT, DELETE"
    HEADERS = frozenset({"content-type", "authorization"})

    def __init__(self, app: ASGIApp, *, allowed_origins: Iterable[str]) -> None:
        self.app = app
        origins = list(allowed_origins)
        self.wildcard = "*" in origins
        self.origins = frozenset(origin for origin in origins if origin != "*")

    def _allowed(self, origin: str) -> bool:
        return origin in self.origins or (self.wildcard and origin != "null")

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
        if not allowed:
            security_event("cors_refused", origin=origin[:255])
        await self.app(scope, receive, self._simple_sender(send, origin, allowed))

    async def _preflight(
        self, scope: Scope, receive: Receive, send: Send, origin: str, allowed: bool, headers: Headers
    ) -> None:
        method = headers["access-control-request-method"].upper()
        requested = {
            h.strip().lower() for h in headers.get("access-control-request-headers", "").split(",") if h.strip()
        }
        if not allowed or method not in self.METHODS or not requested <= self.HEADERS:
            security_event("cors_refused", origin=origin[:255], method=method[:16], preflight=True)
            await problem(
                403, "This cross-origin request is not allowed.", name="cors-refused", headers={"Vary": "Origin"}
            )(scope, receive, send)
            return
        response_headers = {
            **self._allow_origin(origin),
            "Access-Control-Allow-Methods": self.METHODS,
            "Access-Control-Allow-Headers": "Content-Type, Authorization",
            "Access-Control-Max-Age": "86400",
            "Vary": "Origin",
        }
        await send(
            {
                "type": "http.response.start",
                "status": 204,
                "headers": [(k.lower().encode(), v.encode()) for k, v in response_headers.items()],
            }
        )
        await send({"type": "http.response.body", "body": b""})

    def _allow_origin(self, origin: str) -> dict[str, str]:
        if origin in self.origins:
            return {"Access-Control-Allow-Origin": origin, "Access-Control-Allow-Credentials": "true"}
        return {"Access-Control-Allow-Origin": "*"}

    def _simple_sender(self, send: Send, origin: str, allowed: bool) -> Send:
        async def send_with_cors(message: Message) -> None:
            if message["type"] == "http.response.start":
                response_headers = MutableHeaders(scope=message)
                response_headers.add_vary_header("Origin")
                if allowed:
                    for key, value in self._allow_origin(origin).items():
                        response_headers[key] = value
            await send(message)

        return send_with_cors


class BodyTooLarge(HTTPException):
    def __init__(self) -> None:
        super().__init__(status_code=413)


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
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            await self._refuse(scope, receive, send, declared=True)
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    security_event("body_too_large", limit=self.max_bytes, declared=False)
                    raise BodyTooLarge
            return message

        await self.app(scope, limited_receive, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, *, declared: bool) -> None:
        security_event("body_too_large", limit=self.max_bytes, declared=declared)
        await problem(413, f"The request body is larger than {self.max_bytes} bytes.", name="body-too-large")(
            scope, receive, send
        )


def transport_settings(settings: Settings) -> dict[str, object]:
    return {"hsts": settings.is_production, "docs_enabled": settings.effective_docs_enabled}
