"""The security pipeline in one place, outermost layer first (the seed's applySecurityPipeline).

A request refused by a layer is answered by that layer and never reaches the next one.
Layers 6 (input validation) and 7 (authorization) are FastAPI dependencies declared on each
route (`api/`), because they need the matched route; everything before them is ASGI middleware
that runs before routing, so an anonymous caller is refused before its body is even read.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from starlette.middleware import Middleware
from starlette.types import Scope

from .runtime import Runtime
from .security.audit import AuditContext
from .security.authn import Authenticate, BearerToken, DPoPToken
from .security.dpop import ProofVerifier
from .security.principal import Authenticator, Principal
from .security.ratelimit import RateLimit, client_bucket
from .security.transport import BodyLimit, ClientAddress, RefuseWebSocket, SecurityHeaders, StrictCors, TrustedHosts


def security_pipeline(runtime: Runtime) -> list[Middleware]:
    settings = runtime.settings
    # JWT access tokens as Bearer, and bound to a key as DPoP (RFC 9449): one authenticator each.
    dpop = DPoPToken(runtime.verifier, ProofVerifier(settings), runtime.admission)
    bearer = BearerToken(
        runtime.verifier,
        runtime.admission,
        require_sender_constrained=settings.require_sender_constrained_tokens,
        dpop=dpop,
    )
    # The baked credential options' authenticators (options/), then the bearer token; and the
    # channel credentials (a client certificate) they declare. Authenticate composes them.
    authenticators = [*(a for extension in runtime.extensions for a in extension.authenticators), dpop, bearer]
    channels = [c for extension in runtime.extensions for c in extension.channels]
    return [
        # 1. Transport: headers on every response, even a 500 (see SecuredApp below) ...
        Middleware(SecurityHeaders, hsts=settings.is_production, docs_enabled=settings.effective_docs_enabled),
        # ... and the one client address every later layer uses.
        Middleware(ClientAddress, trusted=settings.trusted_proxy_networks, header=settings.forwarded_header),
        # ... and no WebSocket handshake beyond this point: the service has no WebSocket route.
        Middleware(RefuseWebSocket),
        # 2. Audit context: trace id and a log line for every request, refusals below included.
        Middleware(
            AuditContext,
            trust_trace_context=settings.trace_context_trust,
            log_health_requests=settings.log_health_requests,
        ),
        # ... and, only when configured, the request's server span and metrics (under its trace).
        *observers(runtime),
        # 1. Transport checks that can refuse a request.
        Middleware(TrustedHosts, allowed=settings.effective_trusted_hosts),
        Middleware(StrictCors, allowed_origins=settings.allowed_origins),
        Middleware(BodyLimit, max_bytes=settings.max_body_bytes, read_timeout=settings.body_read_timeout_seconds),
        # 3. Pre-authentication limit per client address (IPv6 by prefix): cheap refusal before any
        # crypto. Layers 3-5 share one Redis round trip: a token verified before is known here
        # already (admission.py).
        Middleware(
            RateLimit,
            admission=runtime.admission,
            policy="ip",
            key=client_bucket(settings.rate_limit_ipv6_prefix),
            lookahead=lookahead(authenticators),
        ),
        # 4. Authentication on /api/, deny by default. Another credential type is one more entry.
        # A refused credential counts towards its address's lockout (read by layer 3).
        Middleware(
            Authenticate,
            authenticators=authenticators,
            channels=channels,
            admission=runtime.admission,
            on_failure=runtime.lockout.failed,
        ),
        # 5. Per-subject limit (per-route limits are declared on routes with `ratelimit.limit`).
        Middleware(RateLimit, admission=runtime.admission, policy="subject"),
        # 6. Input validation and 7. authorization: dependencies on each route, see api/.
    ]


def lookahead(authenticators: Sequence[Authenticator]) -> Callable[[Scope], Principal | None]:
    """Layer 3's lookahead: the caller as the first authenticator with a `known` (no I/O) knows it."""
    known: list[Callable[[Scope], Principal | None]] = [
        know for a in authenticators if callable(know := getattr(a, "known", None))
    ]
    if len(known) == 1:
        return known[0]  # the bearer token alone: no indirection on the hot path

    def first(scope: Scope) -> Principal | None:
        for know in known:
            principal = know(scope)
            if principal is not None:
                return principal
        return None

    return first


def observers(runtime: Runtime) -> list[Middleware]:
    """OpenTelemetry's server span (OTEL_*) and the request metrics (METRICS_PORT): not in the
    pipeline at all when off, so they cost nothing then."""
    layers = []
    if runtime.tracing is not None:
        from .telemetry import ServerSpan

        layers.append(Middleware(ServerSpan, tracing=runtime.tracing))
    if runtime.metrics is not None:
        from .metrics import RequestMetrics

        layers.append(Middleware(RequestMetrics, metrics=runtime.metrics))
    return layers
