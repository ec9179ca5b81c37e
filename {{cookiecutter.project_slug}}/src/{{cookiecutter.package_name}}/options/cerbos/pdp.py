"""The policy decision point, asked through Cerbos's official async gRPC client.

Whom it believes: the PDP at CERBOS_ADDRESS, over loopback (a sidecar) or TLS (CERBOS_TLS_CA_FILE);
production refuses plaintext to another host (extension.py). What it sends: the principal as a
keyed pseudonym of its id (the PDP and its logs never see who the caller is), its scopes, its
credential type and, for a workload, its identity; the action (the scope the route declares); the
resource's type, id and the relation the permissions table records for the caller.

Every decision is an audit event (`authz_decision`, as the permissions table's decisions are:
`authz.decision_event`) with its outcome and the policy that decided (`resource.org.vdefault`);
denials always, allows when AUDIT_AUTHZ_ALLOWS. No answer within CERBOS_TIMEOUT_SECONDS, or none at
all: 503 (`DecisionUnavailable`), never an allow. Nothing is cached: a policy change applies to the
next request.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from typing import TypeVar

import grpc
from cerbos.effect.v1 import effect_pb2
from cerbos.engine.v1 import engine_pb2
from cerbos.request.v1 import request_pb2
from cerbos.sdk.grpc.client import AsyncCerbosClient
from cerbos.svc.v1 import svc_pb2_grpc
from google.protobuf import struct_pb2
from sqlalchemy import ColumnElement, true

from ...security import pseudonyms
from ...security.authz import Attributes, DecisionUnavailable, decision_event
from ...security.events import security_event
from ...security.principal import Principal
from .extension import CerbosSettings
from .plan import condition_sql

MTLS_CREDENTIAL = "mTLS"
T = TypeVar("T")
ROLES = ["user"]  # every caller; its relation to an object gives the derived roles (policies/derived_roles)


class Pdp:
    """The `Authorizer` (security/authz.py) of authz_engine=cerbos."""

    def __init__(self, settings: CerbosSettings, *, log_allows: bool = False) -> None:
        self.settings = settings
        self.log_allows = log_allows  # AUDIT_AUTHZ_ALLOWS
        self.timeout = settings.timeout_seconds
        self.client: AsyncCerbosClient | None = None

    def _client(self) -> AsyncCerbosClient:
        # Made in the running loop (gRPC's aio channel belongs to one), on first use or at start.
        if self.client is None:
            # No `timeout_secs`: the SDK writes it into gRPC's service config, whose parser refuses a
            # fraction such as "0.5s" (every call then exceeds its deadline at once). Each call here
            # carries its own deadline instead.
            self.client = AsyncCerbosClient(self.settings.address, tls_verify=self.settings.tls_ca_file or False)
        return self.client

    def _stub(self) -> svc_pb2_grpc.CerbosServiceStub:
        """The SDK client's own stub: its CheckResources asks without `include_meta`, which carries
        the policy that decided (the audit event's `policy`)."""
        return self._client()._client

    @asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        self._client()
        try:
            yield
        finally:
            if self.client is not None:
                await self.client.close()  # type: ignore[no-untyped-call]
                self.client = None

    async def decide(
        self, principal: Principal, action: str, resource_type: str, resource_id: str, attributes: Attributes
    ) -> bool:
        resource = engine_pb2.Resource(
            kind=resource_type, id=resource_id, attr={name: _value(value) for name, value in attributes.items()}
        )
        request = request_pb2.CheckResourcesRequest(
            request_id=uuid.uuid4().hex,
            principal=_principal(principal),
            resources=[request_pb2.CheckResourcesRequest.ResourceEntry(actions=[action], resource=resource)],
            include_meta=True,
        )
        response = await self._ask("check", self._stub().CheckResources(request, timeout=self.timeout))
        result = response.results[0] if response.results else None
        allowed = result is not None and result.actions.get(action) == effect_pb2.EFFECT_ALLOW
        meta = result.meta.actions if result is not None else {}
        policy = meta[action].matched_policy if action in meta else ""
        relation = attributes.get("relation")
        decision_event(
            principal,
            allowed=allowed,
            log_allows=self.log_allows,
            engine="cerbos",
            action=action,
            resource_type=resource_type,
            resource_id=resource_id,
            relation=relation if isinstance(relation, str) else None,
            policy=policy or "none",
        )
        return allowed

    async def plan(self, principal: Principal, action: str, resource_type: str) -> ColumnElement[bool] | None:
        request = request_pb2.PlanResourcesRequest(
            request_id=uuid.uuid4().hex,
            action=action,
            principal=_principal(principal),
            resource=engine_pb2.PlanResourcesInput.Resource(kind=resource_type),
        )
        response = await self._ask("plan", self._stub().PlanResources(request, timeout=self.timeout))
        kind = response.filter.kind
        allowed: ColumnElement[bool] | None = None
        outcome = "deny"  # KIND_ALWAYS_DENIED, and a kind this client does not know
        try:
            if kind == engine_pb2.PlanResourcesFilter.KIND_ALWAYS_ALLOWED:
                allowed, outcome = true(), "allow"
            elif kind == engine_pb2.PlanResourcesFilter.KIND_CONDITIONAL:
                outcome = "refused"  # until it is written as SQL
                allowed, outcome = condition_sql(response.filter.condition), "conditional"
        finally:
            decision_event(
                principal,
                allowed=outcome in ("allow", "conditional"),
                log_allows=self.log_allows,
                engine="cerbos",
                action=action,
                resource_type=resource_type,
                outcome=outcome,
                # The plan names no policy; it is the kind's resource policy, of the default version
                # (the service asks for no other).
                policy=f"resource.{resource_type}.vdefault",
                plan=True,
            )
        return allowed

    async def ready(self) -> bool:
        try:
            info = self._stub().ServerInfo(request_pb2.ServerInfoRequest(), timeout=self.timeout)
            await self._ask("ready", info, log=False)
        except DecisionUnavailable:
            return False
        return True

    async def _ask(self, what: str, call: Awaitable[T], *, log: bool = True) -> T:
        try:
            async with asyncio.timeout(self.timeout):
                return await call
        except (grpc.aio.AioRpcError, TimeoutError, OSError) as exc:
            if log:
                security_event("dependency_unavailable", dependency="pdp", call=what, error=type(exc).__name__)
            raise DecisionUnavailable() from None


def _principal(principal: Principal) -> engine_pb2.Principal:
    """The caller as the PDP sees it: a pseudonym, never the id itself (a policy that must name
    a caller names its pseudonym: `<service> audit-pseudonym`)."""
    attr = {
        "scopes": _value(sorted(principal.scopes)),
        "credential": struct_pb2.Value(string_value=principal.credential),
    }
    if principal.credential == MTLS_CREDENTIAL:  # the workload itself is the principal
        attr["workload"] = struct_pb2.Value(string_value=principal.subject)
    return engine_pb2.Principal(id=pseudonyms.installed()(principal.subject), roles=ROLES, attr=attr)


def _value(value: str | list[str]) -> struct_pb2.Value:
    if isinstance(value, str):
        return struct_pb2.Value(string_value=value)
    return struct_pb2.Value(list_value=struct_pb2.ListValue(values=[_value(item) for item in value]))
