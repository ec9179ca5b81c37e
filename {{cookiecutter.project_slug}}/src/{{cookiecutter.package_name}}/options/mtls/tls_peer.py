"""The verified client certificate of a TLS connection, in the ASGI scope (the `mtls` option, when
the service terminates TLS itself).

uvicorn verifies a client certificate at the handshake (`ssl_cert_reqs=CERT_REQUIRED` with
`ssl_ca_certs`), but does not tell the application which one it was: its scope has no ASGI TLS
extension. These are uvicorn's own HTTP protocol classes, selected with `Config(http=...)`, with one
addition: on a TLS connection, each request's scope carries `extensions["tls"]` (the ASGI TLS
extension) with the peer certificate as PEM, read once when the connection is made. The security
pipeline reads it in options/mtls/authenticator.py. Nothing else about uvicorn changes.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


def tls_extension(transport: asyncio.BaseTransport) -> dict[str, Any] | None:
    """The ASGI TLS extension of a connection; None for a connection without TLS."""
    ssl_object = transport.get_extra_info("ssl_object")
    if ssl_object is None:
        return None
    der = ssl_object.getpeercert(binary_form=True)
    return {
        "server_cert": None,
        "client_cert_chain": [ssl.DER_cert_to_PEM_cert(der)] if der else [],
        "client_cert_name": None,
        "client_cert_error": None,
        "tls_version": None,
        "cipher_suite": None,
    }


def with_tls(app: ASGIApp, tls: dict[str, Any]) -> ASGIApp:
    """`app`, with `tls` as the TLS extension of every scope."""

    async def app_with_tls(scope: Scope, receive: Receive, send: Send) -> None:
        extensions = scope.get("extensions")
        scope["extensions"] = {**(extensions or {}), "tls": tls}
        await app(scope, receive, send)

    return app_with_tls


class H11TlsProtocol(H11Protocol):
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        tls = tls_extension(transport)
        if tls is not None:
            self.app = with_tls(self.app, tls)


class HttpToolsTlsProtocol(HttpToolsProtocol):
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        tls = tls_extension(transport)
        if tls is not None:
            self.app = with_tls(self.app, tls)


# What uvicorn's `auto` chooses: httptools (installed with uvicorn[standard]), with the extension.
PROTOCOL = HttpToolsTlsProtocol
