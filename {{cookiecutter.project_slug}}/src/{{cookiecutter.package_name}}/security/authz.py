"""Layer 7, authorization: the token's scopes, then the caller's relation to the object, asked of
the permissions table. Deny by default; ownership is never inferred from a path parameter.

Each route declares its policy in one line of its signature: a dependency made by
`require_relation` (or `no_object_policy` for a route that acts on no existing object),
which itself depends on the `require_scopes` check. The chain fixes the order: scopes first,
then the object. `route_policy.route_policies` walks every /api/ route and reports one that
declares no policy; the test suite fails on such a route.

This is the public policy API: the service's own routes (`api/deps.py`) and the options'
routes declare their policies with it, and a new kind of check is one more function that
marks itself with `declare` so the route-policy walk sees it.

What a refused caller learns, in order of the checks:
1. Authentication is middleware in front of routing, so only a verified token reaches a route.
2. FastAPI reads the body and answers 400 for bytes that are not JSON at all. This happens
   before any dependency and tells the caller only that its own bytes are not JSON.
3. The scope check, then (on a route that declares a step-up, `StepUp`) the check of how and when
   the user authenticated (401 `insufficient_user_authentication`, RFC 9470: it reads the token
   only), then the object check. A caller refused here gets the same 403 whatever the
   body, query or object id: the permissions table is asked, never the object's table, so the
   answer does not depend on whether the object exists (no existence oracle).
4. Only then are the body, query and remaining path parameters validated against the route's
   models (400 with field errors), and a missing object the caller may see answered 404.
Validating after authorizing is the safer order: a caller without permission cannot use the
service to learn its validation rules (field names, lengths, allowed values), and a body is
never parsed into a model for a caller who may not act. The object's id (the path parameter the
check names) is the one input checked before the object check, because the check needs it; a
malformed id is 400 for everyone and names no object.

Revocation takes effect on the next request: nothing is cached, each check is one statement on the
unique (resource_type, resource_id, subject) index, run on the database driver without an ORM
session (`db.Statements`); a route that reads the object itself gets the check and the read in that one
statement (`read_with_relation`). A cache added here must be invalidated on every write, across replicas
(Redis), before it may be used.
"""

# No `from __future__ import annotations`: FastAPI reads the dependencies' annotations, which
# name the scope check made in each factory.
import inspect
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Protocol, TypeVar

from fastapi import Depends, HTTPException, Request
from sqlalchemy import ColumnElement, Select, String, bindparam, cast, func, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import InstrumentedAttribute

from ..config import Settings
from ..resources import runtime_of
from ..tables import Permission, Relation
from .errors import ProblemDetail
from .events import security_event
from .principal import JWT_NAMESPACE, Principal, current_principal

RULE_ATTRIBUTE = "__authz_rule__"
F = TypeVar("F")
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class ScopeRule:
    """Left on the scope check: the scopes a token must carry."""

    scopes: frozenset[str]


@dataclass(frozen=True, slots=True)
class ObjectRule:
    """Left on the object check: the relation required on the object. `resource_type` None
    declares that the route acts on no existing object (creating one, for example)."""

    resource_type: str | None
    relation: Relation | None


@dataclass(frozen=True, slots=True)
class StepUp:
    """Step-up (RFC 9470), left on the step-up check: how the user must have authenticated for the
    route. `max_age`: at most this many seconds ago (the token's `auth_time`; a token without one
    does not satisfy it); `acr_values`: with one of these `acr`s. `configured`: what
    STEP_UP_MAX_AGE_SECONDS and STEP_UP_ACR_VALUES say at run time (nothing when both are unset).

    Only a JWT names a user's authentication: any other credential (an API key, a webhook
    signature, a workload's certificate) is refused on such a route unless `other_credentials`."""

    max_age: int | None = None
    acr_values: tuple[str, ...] = ()
    configured: bool = False
    other_credentials: bool = False

    def __post_init__(self) -> None:
        if not self.configured and self.max_age is None and not self.acr_values:
            raise ValueError("StepUp needs max_age, acr_values or configured=True")
        if self.max_age is not None and self.max_age < 1:
            raise ValueError("StepUp max_age is at least one second")
        if any(not value or not value.isprintable() or set(value) & set(' "\\') for value in self.acr_values):
            raise ValueError("StepUp acr_values are printable, without spaces, quotes or backslashes")

    def required(self, settings: Settings) -> tuple[int | None, tuple[str, ...]]:
        if self.configured:
            return settings.step_up_max_age_seconds, tuple(settings.step_up_acr_values)
        return self.max_age, self.acr_values


# What the service's sensitive routes require, set by the deployer (README "Step-up").
CONFIGURED_STEP_UP = StepUp(configured=True)
STEP_UP_PROBLEM = "insufficient-user-authentication"
STEP_UP_DETAIL = ProblemDetail(
    "This operation needs a more recent or stronger authentication: sign in again as WWW-Authenticate says."
)


class StepUpRequired(HTTPException):
    """401 with RFC 9470's challenge: authenticate again, as `max_age` / `acr_values` say."""

    problem_name = STEP_UP_PROBLEM


TABLE_ENGINE = "permissions"


def decision_event(
    principal: Principal,
    *,
    allowed: bool,
    log_allows: bool,
    engine: str,
    action: str,
    resource_type: str | None,
    resource_id: object = None,
    required: str | None = None,
    relation: str | None = None,
    policy: str,
    outcome: str | None = None,
    plan: bool = False,
) -> None:
    """One authorization decision as an `authz_decision` event (ASVS 5.0 V16.3.2), the same event
    and fields for either engine: the object (`resource_type`, `resource_id`; none for a list's
    plan), the `action` (the route's scopes), the relation the route `required` and the one the
    caller holds (`relation`, where the engine read it), the `outcome` and the `policy` that
    decided. Denials always (WARNING); allows only when `log_allows` (AUDIT_AUTHZ_ALLOWS, INFO).
    A log line and nothing else: no I/O of its own on the request path."""
    if allowed and not log_allows:
        return
    security_event(
        "authz_decision",
        logging.INFO if allowed else logging.WARNING,
        subject=principal.subject,
        engine=engine,
        action=action,
        resource_type=resource_type,
        resource_id=None if resource_id is None else str(resource_id),
        required=required,
        relation=relation,
        outcome=outcome or ("allow" if allowed else "deny"),
        policy=policy,
        plan=plan,
    )


def _log_allows(request: Request) -> bool:
    return runtime_of(request).settings.audit_authz_allows


def declare(check: F, rule: ScopeRule | ObjectRule | StepUp) -> F:
    """Mark `check` (a dependency) as declaring `rule`, for the route-policy walk."""
    setattr(check, RULE_ATTRIBUTE, rule)
    return check


def require_scopes(*scopes: str, resource_type: str | None = None, param: str | None = None) -> Any:
    """Refuse with 403 unless the token carries every one of `scopes`. `resource_type` and `param`
    (the path parameter naming the object) name the object in the denial's events."""
    if not scopes:
        raise ValueError("require_scopes needs at least one scope")
    needed = frozenset(scopes)
    action = action_of(scopes)

    async def check_scopes(request: Request) -> Principal:
        # The principal straight from the request (as `current_principal` reads it): one
        # dependency fewer for FastAPI to resolve on every request.
        principal = await current_principal(request)
        missing = needed - principal.scopes
        if missing:
            # The object as the path names it, unvalidated: a string in a log field, masked like any.
            resource_id = request.path_params.get(param) if param else None
            security_event(
                "scope_denied",
                subject=principal.subject,
                missing=sorted(missing),
                action=action,
                resource_type=resource_type,
                resource_id=resource_id,
            )
            decision_event(
                principal,
                allowed=False,
                log_allows=False,
                engine="scopes",
                action=action,
                resource_type=resource_type,
                resource_id=resource_id,
                policy="scopes",
            )
            raise HTTPException(403)
        return principal

    return Depends(declare(check_scopes, ScopeRule(needed)))


def unmet_step_up(principal: Principal, max_age: int | None, acr_values: Sequence[str], *, now: float) -> str | None:
    """Why the principal's authentication does not satisfy the step-up, or None when it does."""
    if max_age is not None:
        if principal.auth_time is None:
            return "auth_time_missing"
        if now - principal.auth_time > max_age:
            return "authentication_too_old"
    if acr_values and principal.acr not in acr_values:
        return "acr_not_accepted" if principal.acr else "acr_missing"
    return None


def require_step_up(step_up: StepUp, scoped: Any) -> Any:
    """Refuse with 401 (`insufficient_user_authentication`, RFC 9470) unless the caller's
    authentication satisfies `step_up`. Depends on the scope check `scoped`; reads the token only
    (no I/O), so a refused caller learns nothing of any object."""

    async def check_step_up(principal: Annotated[Principal, scoped], request: Request) -> Principal:
        max_age, acr_values = step_up.required(runtime_of(request).settings)
        if max_age is None and not acr_values:
            return principal  # the configured step-up, with both settings unset
        user = principal.subject.startswith(JWT_NAMESPACE)  # only a JWT names a user's authentication
        if not user and step_up.other_credentials:
            return principal
        reason = unmet_step_up(principal, max_age, acr_values, now=time.time()) if user else "no_user_authentication"
        if reason is None:
            return principal
        security_event(
            "step_up_required",
            subject=principal.subject,
            reason=reason,
            max_age=max_age,
            acr_values=list(acr_values),
        )
        # The scheme the token came with (Bearer, or DPoP); a credential that names no user is told
        # what would do: a user's bearer token.
        scheme = principal.credential if user and principal.credential else "Bearer"
        challenge = f'{scheme} error="insufficient_user_authentication"'
        challenge += ', error_description="A more recent or stronger authentication is required"'
        if max_age is not None:
            challenge += f', max_age="{max_age}"'
        if acr_values:
            challenge += f', acr_values="{" ".join(acr_values)}"'
        raise StepUpRequired(401, STEP_UP_DETAIL, headers={"WWW-Authenticate": challenge})

    return Depends(declare(check_step_up, step_up))


def _guard(
    scopes: Sequence[str], step_up: StepUp | None, resource_type: str | None = None, param: str | None = None
) -> Any:
    """The principal's dependency of an object check: the scope check, then the step-up's."""
    scoped = require_scopes(*scopes, resource_type=resource_type, param=param)
    return scoped if step_up is None else require_step_up(step_up, scoped)


def _holds_query(resource_type: str, relation: Relation) -> Select[Any]:
    """The subject holds `relation` or higher on one object."""
    return select(Permission.id).where(*_grant(resource_type, relation))


def _grant(resource_type: str, relation: Relation) -> tuple[Any, ...]:
    return (
        Permission.subject == bindparam("subject", None, type_=String),
        Permission.resource_type == resource_type,
        Permission.resource_id == bindparam("resource_id", None, type_=String),
        Permission.relation.in_([held.value for held in relation.at_least()]),
    )


async def holds(session: AsyncSession, subject: str, resource_type: str, resource_id: str, relation: Relation) -> bool:
    """The permission check through an ORM session (one query on the unique index), for code that
    holds a session anyway; the routes' checks ask `Statements` instead (no session, one round trip)."""
    query = _holds_query(resource_type, relation)
    return await session.scalar(query, {"subject": subject, "resource_id": resource_id}) is not None


def _read_query(
    resource_type: str, relation: Relation, columns: Sequence[InstrumentedAttribute[Any]], with_relation: bool = False
) -> Select[Any]:
    """The caller's grant joined to the object it names (`columns[0]` is its id): no row, no grant
    (403); a row of NULLs, a grant that outlived its object (404); else the object (and, with
    `with_relation`, last, the relation the grant gives)."""
    id_column = columns[0]
    return (
        select(*columns, *([Permission.relation] if with_relation else []))
        .select_from(Permission)
        .outerjoin(id_column.class_, id_column == bindparam("object_id", None, type_=id_column.type))
        .where(*_grant(resource_type, relation))
    )


def deny(
    principal: Principal, resource_type: str, resource_id: object, relation: Relation, action: str | None = None
) -> HTTPException:
    """The 403 of an object check, logged as `object_denied` (the refusal; the decision itself is
    the `authz_decision` event its engine logged)."""
    security_event(
        "object_denied",
        subject=principal.subject,
        resource_type=resource_type,
        resource_id=str(resource_id),
        required=relation.value,
        action=action,
    )
    return HTTPException(403)


def _table_decision(
    request: Request,
    principal: Principal,
    allowed: bool,
    action: str,
    resource_type: str,
    object_id: object,
    relation: Relation,
) -> None:
    """The permissions table's decision (no engine) as an `authz_decision` event."""
    decision_event(
        principal,
        allowed=allowed,
        log_allows=_log_allows(request),
        engine=TABLE_ENGINE,
        action=action,
        resource_type=resource_type,
        resource_id=object_id,
        required=relation.value,
        policy=f"{resource_type}:{relation.value}",
    )


def _with_path_parameter(check: Callable[..., Any], param: str, id_type: type, scoped: Any) -> None:
    """Give `check` the signature FastAPI reads: the object's id as the path parameter `param`,
    the principal after the scope check, and the request."""
    keyword = inspect.Parameter.KEYWORD_ONLY
    check.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [
            inspect.Parameter(param, keyword, annotation=id_type),
            inspect.Parameter("principal", keyword, annotation=Annotated[Principal, scoped]),
            inspect.Parameter("request", keyword, annotation=Request),
        ]
    )


def require_relation(
    resource_type: str,
    relation: Relation,
    *,
    param: str,
    scopes: Sequence[str],
    id_type: type = uuid.UUID,
    step_up: StepUp | None = None,
) -> Any:
    """Refuse with 403 unless the token carries `scopes` and the caller holds `relation` (or
    higher) on the object of `resource_type` whose id is the path parameter `param`. The same 403
    whether the object exists or not. Gives the route the object's id. With `step_up`, the
    caller's authentication must satisfy it too (401 otherwise), checked before the object."""
    scoped = _guard(scopes, step_up, resource_type, param)
    key = ("holds", resource_type, relation)

    def query() -> Select[Any]:
        return _holds_query(resource_type, relation)

    action = action_of(scopes)

    async def check_relation(principal: Principal, request: Request, **path: Any) -> Any:
        object_id = path[param]
        runtime = runtime_of(request)
        reads = runtime.statements
        if runtime.authorizer is not None:  # authz_engine=cerbos: the PDP decides
            rows = await reads.fetch(
                reads.query(("relation", resource_type), lambda: _relation_query(resource_type)),
                subject=principal.subject,
                resource_id=str(object_id),
            )
            held: Attributes = {"relation": rows[0][0] if rows else ""}
            if not await runtime.authorizer.decide(principal, action, resource_type, str(object_id), held):
                raise deny(principal, resource_type, object_id, relation, action)
            return object_id
        allowed = bool(
            await reads.fetch(reads.query(key, query), subject=principal.subject, resource_id=str(object_id))
        )
        _table_decision(request, principal, allowed, action, resource_type, object_id, relation)
        if not allowed:
            raise deny(principal, resource_type, object_id, relation, action)
        return object_id

    _with_path_parameter(check_relation, param, id_type, scoped)
    return Depends(declare(check_relation, ObjectRule(resource_type, relation)))


def read_with_relation(
    resource_type: str,
    relation: Relation,
    *,
    param: str,
    scopes: Sequence[str],
    columns: Sequence[InstrumentedAttribute[Any]],
    into: Callable[..., T],
    step_up: StepUp | None = None,
    with_relation: bool = False,
) -> Any:
    """`require_relation`, and the object itself read in the same statement: one round trip for
    the check and the read. `columns` are the object's columns to read, its id first (the column
    the path parameter names); the route gets `into(*columns' values)`, and with `with_relation`
    `into(*values, relation=<the caller's Relation>)` (to choose the fields it sees,
    security/fields.py). 403 without the relation (whether the object exists or not), 404 for a
    grant that outlived its object. `step_up` as for `require_relation`."""
    scoped = _guard(scopes, step_up, resource_type, param)
    id_column = columns[0]
    key = ("read", resource_type, relation, with_relation)

    def query() -> Select[Any]:
        return _read_query(resource_type, relation, columns, with_relation)

    action = action_of(scopes)

    async def check_and_read(principal: Principal, request: Request, **path: Any) -> T:
        object_id = path[param]
        runtime = runtime_of(request)
        reads = runtime.statements
        if runtime.authorizer is not None:  # authz_engine=cerbos: the relation read with the object, the PDP decides
            rows = await reads.fetch(
                reads.query(("relation_read", resource_type), lambda: _relation_read_query(resource_type, columns)),
                subject=principal.subject,
                resource_id=str(object_id),
                object_id=object_id,
            )
            held: Attributes = {"relation": rows[0][0] if rows else ""}
            if not await runtime.authorizer.decide(principal, action, resource_type, str(object_id), held):
                raise deny(principal, resource_type, object_id, relation, action)
            if not rows or rows[0][1] is None:  # no grant to read through, or one that outlived its object
                raise HTTPException(404)
            if with_relation:
                return into(*rows[0][1:], relation=Relation(rows[0][0]))
            return into(*rows[0][1:])
        rows = await reads.fetch(
            reads.query(key, query), subject=principal.subject, resource_id=str(object_id), object_id=object_id
        )
        _table_decision(request, principal, bool(rows), action, resource_type, object_id, relation)
        if not rows:
            raise deny(principal, resource_type, object_id, relation, action)
        if rows[0][0] is None:
            raise HTTPException(404)
        if with_relation:
            return into(*rows[0][:-1], relation=Relation(rows[0][-1]))
        return into(*rows[0])

    _with_path_parameter(check_and_read, param, id_column.type.python_type, scoped)
    return Depends(declare(check_and_read, ObjectRule(resource_type, relation)))


def no_object_policy(*, scopes: Sequence[str], step_up: StepUp | None = None) -> Any:
    """Declares a route that acts on no existing object (e.g. creating one): only `scopes` are
    required (and `step_up`, when given). Gives the route the caller's principal."""
    scoped = _guard(scopes, step_up)
    action = action_of(scopes)

    async def no_object(principal: Annotated[Principal, scoped], request: Request) -> Principal:
        authorizer = runtime_of(request).authorizer
        attributes: Attributes = {"scopes": sorted(scopes)}
        if authorizer is None:  # the scopes were the whole decision
            decision_event(
                principal,
                allowed=True,
                log_allows=_log_allows(request),
                engine=TABLE_ENGINE,
                action=action,
                resource_type=SERVICE,
                resource_id=SERVICE,
                policy="scopes",
            )
        elif not await authorizer.decide(principal, action, SERVICE, SERVICE, attributes):
            security_event(
                "object_denied", subject=principal.subject, resource_type=SERVICE, resource_id=SERVICE, action=action
            )
            raise HTTPException(403)
        return principal

    return Depends(declare(no_object, ObjectRule(None, None)))


# --- The decision asked of a policy engine (authz_engine=cerbos) --------------------------------
#
# With an engine (`Runtime.authorizer`, set by the `cerbos` option), the declarations above keep
# their words and their order (the scopes in-process first: a ceiling no policy can raise), and
# the decision moves: the permissions table still says which relation the caller holds, read in
# the same statement as before, and the engine decides with it. The action is the scope the route
# declares (`users:read`), the resource is the object's type and id with the relation as an
# attribute; a route on no existing object asks about the `service` resource.

SERVICE = "service"
Attributes = dict[str, str | list[str]]


def action_of(scopes: Sequence[str]) -> str:
    """The action a route asks an engine about: the scope it declares (several joined by `+`)."""
    return "+".join(sorted(scopes))


class DecisionUnavailable(HTTPException):
    """The engine did not answer (down, or slower than its timeout): 503, never an allow."""

    problem_name = "dependency-unavailable"

    def __init__(self) -> None:
        super().__init__(503, headers={"Retry-After": "1"})


class PlanRefused(HTTPException):
    """A list's query plan holds a condition this service cannot write as SQL: a refusal, never an
    unfiltered list."""

    problem_name = "plan-refused"

    def __init__(self) -> None:
        super().__init__(403)


class Authorizer(Protocol):
    """A policy engine that decides in place of the permissions table's relation check."""

    async def decide(
        self, principal: Principal, action: str, resource_type: str, resource_id: str, attributes: Attributes
    ) -> bool:
        """Whether `principal` may do `action` to the object whose `attributes` are given (its
        `relation` held by the caller, or for `service` the route's `scopes`); raises DecisionUnavailable."""
        ...

    async def plan(self, principal: Principal, action: str, resource_type: str) -> ColumnElement[bool] | None:
        """The SQL condition on the caller's grants (the permissions table's `relation`) under
        which the objects of `resource_type` are allowed; None when none is. Raises
        DecisionUnavailable, or PlanRefused for a plan it cannot translate."""
        ...

    async def ready(self) -> bool:
        """Whether the engine answers now (readiness)."""
        ...


def _relation_query(resource_type: str) -> Select[Any]:
    """The relation the subject holds on one object, whatever it is."""
    return select(Permission.relation).where(
        Permission.subject == bindparam("subject", None, type_=String),
        Permission.resource_type == resource_type,
        Permission.resource_id == bindparam("resource_id", None, type_=String),
    )


def _relation_read_query(resource_type: str, columns: Sequence[InstrumentedAttribute[Any]]) -> Select[Any]:
    """The subject's relation and the object it names, in one statement (as `_read_query`)."""
    id_column = columns[0]
    return (
        select(Permission.relation, *columns)
        .select_from(Permission)
        .outerjoin(id_column.class_, id_column == bindparam("object_id", None, type_=id_column.type))
        .where(
            Permission.subject == bindparam("subject", None, type_=String),
            Permission.resource_type == resource_type,
            Permission.resource_id == bindparam("resource_id", None, type_=String),
        )
    )


# --- Lists: the objects the caller may see, filtered in the statement that reads them ----------


def _same_id(id_column: InstrumentedAttribute[Any]) -> ColumnElement[bool]:
    """The grant names the object: the permissions table keeps ids as text (a UUID with its dashes),
    which SQLite stores as 32 hex digits and PostgreSQL as `uuid`; compared as text without dashes."""
    return func.replace(Permission.resource_id, "-", "") == func.replace(cast(id_column, String), "-", "")


@dataclass(frozen=True, slots=True)
class Listing:
    """The statement a list route reads with: the objects of one type the caller holds a grant
    on, and (table) holds at least the declared relation, or (engine) the engine's plan allows."""

    statement: Select[Any] | None  # None: the policy allows none of them

    def page(self, *, order_by: Sequence[Any], limit: int, offset: int) -> Select[Any] | None:
        return None if self.statement is None else self.statement.order_by(*order_by).limit(limit).offset(offset)


def list_with_relation(
    resource_type: str, relation: Relation, *, scopes: Sequence[str], columns: Sequence[InstrumentedAttribute[Any]]
) -> Any:
    """A list route: the token carries `scopes`, and the route gets a `Listing` of the objects
    (`columns`, id first) on which the caller holds `relation` or higher; with an engine, those its
    query plan (`PlanResources`) allows, the plan written as SQL in the same statement, or a
    refusal (PlanRefused) when it cannot be, never an unfiltered list."""
    scoped = require_scopes(*scopes, resource_type=resource_type)
    action = action_of(scopes)
    id_column = columns[0]

    async def listing(principal: Annotated[Principal, scoped], request: Request) -> Listing:
        authorizer = runtime_of(request).authorizer
        allowed: ColumnElement[bool] | None = Permission.relation.in_([held.value for held in relation.at_least()])
        if authorizer is not None:
            allowed = await authorizer.plan(principal, action, resource_type)
        else:  # the objects the caller holds `relation` on: a condition, like an engine's plan
            decision_event(
                principal,
                allowed=True,
                log_allows=_log_allows(request),
                engine=TABLE_ENGINE,
                action=action,
                resource_type=resource_type,
                required=relation.value,
                policy=f"{resource_type}:{relation.value}",
                outcome="conditional",
                plan=True,
            )
        if allowed is None:
            return Listing(None)
        statement = (
            select(*columns)
            .select_from(Permission)
            .join(id_column.class_, _same_id(id_column))
            .where(Permission.subject == principal.subject, Permission.resource_type == resource_type, allowed)
        )
        return Listing(statement)

    return Depends(declare(listing, ObjectRule(resource_type, relation)))
