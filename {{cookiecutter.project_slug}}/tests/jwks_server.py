"""A real HTTP JWKS endpoint for the tests: `http.server` in a thread on 127.0.0.1.

It serves `document` (any JSON value, or `status` as an error) on every path not in `documents`
(a document per path, e.g. an OIDC discovery document beside the JWKS), and counts the requests per
path, so a test can prove how often the service fetched keys, and from where. Given an SSL context
it speaks HTTPS.
"""

from __future__ import annotations

import json
import ssl
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa

LOOPBACK = "127.0.0.1"


def public_jwk(public_key: Any, kid: str | None, **fields: Any) -> dict[str, Any]:
    """The public JWK of an RSA/EC/Ed25519 public key, with a `kid` and any extra members."""
    algorithm: Any = jwt.algorithms.OKPAlgorithm
    if isinstance(public_key, rsa.RSAPublicKey):
        algorithm = jwt.algorithms.RSAAlgorithm
    elif isinstance(public_key, ec.EllipticCurvePublicKey):
        algorithm = jwt.algorithms.ECAlgorithm
    jwk: dict[str, Any] = algorithm.to_jwk(public_key, as_dict=True)
    if kid is not None:
        jwk["kid"] = kid
    jwk.update(fields)
    return jwk


class JwksServer:
    def __init__(self) -> None:
        self.document: Any = {"keys": []}
        self.documents: dict[str, Any] = {}
        self.redirects: dict[str, str] = {}  # path -> the Location of a 302 answered there
        self.status = 200
        self.scheme = "http"
        self.requests: Counter[str] = Counter()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return self.url_for("/.well-known/jwks.json")

    def url_for(self, path: str) -> str:
        return f"{self.scheme}://{LOOPBACK}:{self.port}{path}"

    @property
    def fetches(self) -> int:
        return sum(self.requests.values())

    def serve_keys(self, *jwks: dict[str, Any]) -> None:
        self.document = {"keys": list(jwks)}

    def start(self, tls: ssl.SSLContext | None = None) -> None:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                owner.requests[self.path] += 1
                if self.path in owner.redirects:
                    self.send_response(302)
                    self.send_header("Location", owner.redirects[self.path])
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                body = json.dumps(owner.documents.get(self.path, owner.document)).encode()
                self.send_response(owner.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                return

        self._server = ThreadingHTTPServer((LOOPBACK, self.port), Handler)
        self.port = self._server.server_address[1]
        if tls is not None:
            self._server.socket = tls.wrap_socket(self._server.socket, server_side=True)
            self.scheme = "https"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Shut the endpoint down: connections are refused until `start` (same port) again."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join()
            self._thread = None
