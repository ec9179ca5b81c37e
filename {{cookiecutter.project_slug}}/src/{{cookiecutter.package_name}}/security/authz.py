"""Layer 7, authorization: the token's scopes, then the caller's relation to the object, asked of
the permissions table. Deny by default; ownership is never inferred from a path parameter.

Each route declares its policy in one line of its signature: a dependency made by
`require_org_relation` (or `no_object_policy` for a route that acts on no existing object),
which itself depends on the `require_scopes` check. The chain fixes the order: scopes first,
then the object. `route_policies` walks every /api/ route and reports one that declares no
policy; the test suite fails on such a route.

What a refused caller learns, in order of the checks:
1. Authentication is middleware in front of routing, so only a verified token reaches a route.
2. FastAPI reads the body and answers 400 for bytes that are not JSON at all. This happens
   before any dependency and tells the caller only that its own bytes are not JSON.
3. The scope check, then the object check. A caller refused here gets the same 403 whatever the
   body, query or object id: the permissions table is asked, never the object's table, so the
   answer does not depend on whether the object exists (no existence oracle).
4. Only then are the body, query and remaining path parameters validated against the route's
   models (400 with field errors), and a missing object the caller may see answered 404.
Validating after authorizing is the safer order: a caller without permission cannot use the
service to learn its validation rules (field names, lengths, allowed values), and a body is
never parsed into a model for a caller who may not act. The org id is the one input checked
before the object check, because the check needs it; a malformed id is 400 for everyone and
names no object.

Revocation takes effect on the next request: nothing is cached, each check is one statement on the
unique (resource_type, resource_id, subject) index, run on the database driver without an ORM
session (`db.Statements`); a route that reads the object itself gets the check and the read in that one
statement (`read_org`). A cache added here must be invalidated on every write, across replicas
(Redis), before it may be used.
"""

import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, TypeVar, cast

import fastapi.routing
from fastapi import Depends, HTTPException, Request
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute
from sqlalchemy import CursorResult, Select, String, bindparam, delete, func, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.routing import BaseRoute

from ..db import Statements
from ..models import Org, Permission, Relation
from .events import security_event
from .principal import API_PREFIX, Principal, current_principal

ORG = "org"
# Subjects that may be named in a grant (path parameter and CLI): what identity providers put in `sub`.
SUBJECT_PATTERN = r"^[A-Za-z0-9_.:@|-]{1,255}$"
_RULE = "__authz_rule__"
# Recent FastAPI keeps included routers nested in app.routes and walks them with this; older
# versions flatten app.routes themselves.
_iter_route_contexts = getattr(fastapi.routing, "iter_route_contexts", None)
F = TypeVar("F")


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


def _declare(check: F, rule: ScopeRule | ObjectRule) -> F:
    setattr(check, _RULE, rule)
    return check


def require_scopes(*scopes: str) -> Any:
    """Refuse with 403 unless the token carries every one of `scopes`."""
    if not scopes:
        raise ValueError("require_scopes needs at least one scope")
    needed = frozenset(scopes)

    async def check_scopes(request: Request) -> Principal:
        # The principal straight from the request (as `current_principal` reads it): one
        # dependency fewer for FastAPI to resolve on every request.
        principal = await current_principal(request)
        missing = needed - principal.scopes
        if missing:
            security_event("scope_denied", subject=principal.subject, missing=sorted(missing))
            raise HTTPException(403)
        return principal

    return Depends(_declare(check_scopes, ScopeRule(needed)))


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


def _org_read_query(relation: Relation) -> Select[uuid.UUID, str, datetime]:
    """The caller's grant joined to the org it names: no row, no grant (403); a row of NULLs, a
    grant that outlived its org (404); else the org."""
    return (
        select(Org.id, Org.name, Org.created_at)
        .select_from(Permission)
        .outerjoin(Org, Org.id == bindparam("org_id", None, type_=Org.id.type))
        .where(*_grant(ORG, relation))
    )


async def holds(session: AsyncSession, subject: str, resource_type: str, resource_id: str, relation: Relation) -> bool:
    """The permission check through an ORM session (one query on the unique index), for code that
    holds a session anyway; the routes' checks ask `Statements` instead (no session, one round trip)."""
    query = _holds_query(resource_type, relation)
    return await session.scalar(query, {"subject": subject, "resource_id": resource_id}) is not None


def _reads(request: Request) -> Statements:
    statements: Statements = request.app.state.runtime.statements
    return statements


def _deny(principal: Principal, org_id: uuid.UUID, relation: Relation) -> HTTPException:
    security_event(
        "object_denied",
        subject=principal.subject,
        resource_type=ORG,
        resource_id=str(org_id),
        required=relation.value,
    )
    return HTTPException(403)


def require_org_relation(relation: Relation, *, scopes: Sequence[str]) -> Any:
    """Refuse with 403 unless the token carries `scopes` and the caller holds `relation` (or
    higher) on the org in the path. The same 403 whether the org exists or not."""
    scoped = require_scopes(*scopes)

    async def check_org(org_id: uuid.UUID, principal: Annotated[Principal, scoped], request: Request) -> uuid.UUID:
        reads = _reads(request)
        query = reads.query(("holds", ORG, relation), lambda: _holds_query(ORG, relation))
        if not await reads.fetch(query, subject=principal.subject, resource_id=str(org_id)):
            raise _deny(principal, org_id, relation)
        return org_id

    return Depends(_declare(check_org, ObjectRule(ORG, relation)))


@dataclass(frozen=True, slots=True)
class OrgRow:
    id: uuid.UUID
    name: str
    created_at: datetime


def read_org(relation: Relation, *, scopes: Sequence[str]) -> Any:
    """`require_org_relation`, and the org itself read in the same statement: one round trip for
    the check and the read. 403 without the relation (whether the org exists or not), 404 for a
    grant that outlived its org."""
    scoped = require_scopes(*scopes)

    async def check_and_read_org(
        org_id: uuid.UUID, principal: Annotated[Principal, scoped], request: Request
    ) -> OrgRow:
        reads = _reads(request)
        query = reads.query(("read", ORG, relation), lambda: _org_read_query(relation))
        rows = await reads.fetch(query, subject=principal.subject, resource_id=str(org_id), org_id=org_id)
        if not rows:
            raise _deny(principal, org_id, relation)
        found, name, created_at = rows[0]
        if found is None:
            raise HTTPException(404)
        return OrgRow(found, name, created_at)

    return Depends(_declare(check_and_read_org, ObjectRule(ORG, relation)))


def no_object_policy(*, scopes: Sequence[str]) -> Any:
    """Declares a route that acts on no existing object (e.g. creating one): only `scopes` are
    required. Gives the route the caller's principal."""
    scoped = require_scopes(*scopes)

    async def no_object(principal: Annotated[Principal, scoped]) -> Principal:
        return principal

    return Depends(_declare(no_object, ObjectRule(None, None)))


# Grants: the writes to the permissions table, shared by the API and the CLI.


class GrantRefused(Exception):
    """A grant change that would break an invariant. The message is safe to show."""


class NoLongerOwner(Exception):
    """The caller's owner grant, which the route's check found, was changed or removed before the
    caller's own grant change could be written (a concurrent demotion won)."""


async def set_relation(
    session: AsyncSession,
    resource_type: str,
    resource_id: str,
    subject: str,
    relation: Relation,
    *,
    granted_by: str,
    acting_owner: str | None,
) -> bool:
    """Give `subject` exactly `relation` on the object; True when the grant is new. Refuses to
    leave the object without an owner. `acting_owner` is the subject whose owner grant allows the
    change, re-checked as part of this write (None: an operator, e.g. the CLI). The caller commits."""
    key = _grant_key(resource_type, resource_id, subject)
    await _lock_owners(session, resource_type, resource_id)
    await _still_owner(session, resource_type, resource_id, acting_owner)
    changed = cast(
        CursorResult[Any], await session.execute(update(Permission).where(*key).values(relation=relation.value))
    )
    created = changed.rowcount == 0
    if created:
        try:
            await session.execute(
                insert(Permission).values(
                    subject=subject,
                    resource_type=resource_type,
                    resource_id=resource_id,
                    relation=relation.value,
                    created_by=granted_by,
                )
            )
        except IntegrityError:  # the same grant was created concurrently
            await session.rollback()
            raise GrantRefused("The grant was changed concurrently; retry.") from None
    elif relation != Relation.owner:
        await _keep_an_owner(session, resource_type, resource_id)
    return created


async def revoke(
    session: AsyncSession, resource_type: str, resource_id: str, subject: str, *, acting_owner: str | None
) -> bool:
    """Remove the subject's grant on the object; False when it had none. Refuses to remove the
    last owner. `acting_owner` as for `set_relation`. The caller commits."""
    await _lock_owners(session, resource_type, resource_id)
    await _still_owner(session, resource_type, resource_id, acting_owner)
    removed = cast(
        CursorResult[Any],
        await session.execute(delete(Permission).where(*_grant_key(resource_type, resource_id, subject))),
    )
    if removed.rowcount == 0:
        return False
    await _keep_an_owner(session, resource_type, resource_id)
    return True


def _grant_key(resource_type: str, resource_id: str, subject: str) -> tuple[Any, ...]:
    return (
        Permission.subject == subject,
        Permission.resource_type == resource_type,
        Permission.resource_id == resource_id,
    )


def _owners(resource_type: str, resource_id: str) -> tuple[Any, ...]:
    return (
        Permission.resource_type == resource_type,
        Permission.resource_id == resource_id,
        Permission.relation == Relation.owner.value,
    )


async def _lock_owners(session: AsyncSession, resource_type: str, resource_id: str) -> None:
    # PostgreSQL: two owners demoting each other at once are serialized on the owner rows, so
    # the second sees the first's change. SQLite serializes writers itself (no FOR UPDATE there)
    # and the owner count below runs after this transaction's write, under its write lock.
    await session.execute(
        select(Permission.id).where(*_owners(resource_type, resource_id)).order_by(Permission.id).with_for_update()
    )


async def _still_owner(session: AsyncSession, resource_type: str, resource_id: str, subject: str | None) -> None:
    """The route checked the caller's owner grant before this transaction; a concurrent demotion
    may have committed since. This no-op UPDATE of the caller's owner row makes the check part of
    the write: it matches nothing once the row is no longer `owner`, and it holds the row lock
    (PostgreSQL, after the ordered owner lock above) or the database write lock (SQLite, whose
    transaction begins with this write) until commit, so no demotion lands in between."""
    if subject is None:
        return
    touched = cast(
        CursorResult[Any],
        await session.execute(
            update(Permission)
            .where(*_grant_key(resource_type, resource_id, subject), Permission.relation == Relation.owner.value)
            .values(relation=Relation.owner.value)
        ),
    )
    if touched.rowcount == 0:
        await session.rollback()
        raise NoLongerOwner


async def _keep_an_owner(session: AsyncSession, resource_type: str, resource_id: str) -> None:
    owners = await session.scalar(select(func.count()).where(*_owners(resource_type, resource_id)))
    if not owners:
        await session.rollback()
        raise GrantRefused("An org must keep at least one owner.")


# The route-policy walk: every /api/ route declares scopes and an object policy.


@dataclass(frozen=True, slots=True)
class RoutePolicy:
    route: str
    scopes: frozenset[str]
    object_rule: ObjectRule | None
    problems: tuple[str, ...]


def _tree(dependant: Dependant) -> Iterator[Dependant]:
    yield dependant
    for sub in dependant.dependencies:
        yield from _tree(sub)


def _rules(dependant: Dependant) -> Iterator[tuple[Dependant, ScopeRule | ObjectRule]]:
    for node in _tree(dependant):
        rule = getattr(node.call, _RULE, None)
        if isinstance(rule, ScopeRule | ObjectRule):
            yield node, rule


def route_policy(name: str, dependant: Dependant) -> RoutePolicy:
    """The policy a route declares in its dependency tree, with what is wrong with it."""
    rules = list(_rules(dependant))
    scopes: set[str] = set()
    for _, rule in rules:
        if isinstance(rule, ScopeRule):
            scopes |= rule.scopes
    objects = [(node, rule) for node, rule in rules if isinstance(rule, ObjectRule)]
    problems = []
    if not scopes:
        problems.append("declares no scopes (require_scopes)")
    if not objects:
        problems.append("declares no object policy (require_org_relation or no_object_policy)")
    elif len({rule for _, rule in objects}) > 1:
        problems.append("declares more than one object policy")
    for node, _ in objects:
        if not any(isinstance(rule, ScopeRule) for _, rule in _rules(node)):
            problems.append("object check does not depend on a scope check")
    return RoutePolicy(name, frozenset(scopes), objects[0][1] if objects else None, tuple(problems))


def route_policies(routes: Sequence[BaseRoute]) -> list[RoutePolicy]:
    """The policy of every route under /api/, included routers flattened (with the dependencies
    they add). A route under /api/ that cannot declare one (a mount, a plain route) is a problem."""
    policies = []
    for path, methods, route, dependant in _flat_routes(routes):
        if not (path + "/").startswith(API_PREFIX):
            continue
        if isinstance(route, APIRoute) and dependant is not None:
            policies.append(route_policy(f"{','.join(sorted(methods))} {path}", dependant))
        else:
            problem = f"{type(route).__name__} cannot declare a policy"
            policies.append(RoutePolicy(path, frozenset(), None, (problem,)))
    return policies


def _flat_routes(routes: Sequence[BaseRoute]) -> Iterator[tuple[str, set[str], BaseRoute, Dependant | None]]:
    if _iter_route_contexts is None:
        for route in routes:
            yield (
                getattr(route, "path", ""),
                getattr(route, "methods", None) or set(),
                route,
                getattr(route, "dependant", None),
            )
        return
    for context in _iter_route_contexts(routes):
        original = context.original_route
        dependant = context.dependant if isinstance(original, APIRoute) else None
        yield context.path or "", context.methods or set(), original, dependant
