"""Grants: the writes to the permissions table, shared by the service's routes and the CLI.

Each keeps the object's invariant that it has an owner, and re-checks the acting owner's grant
inside the write, so a concurrent demotion cannot slip in between the route's check and it.

A grant names a principal id (security/principal.py): `jwt:<issuer key>:<sub>` for a token of one
issuer, `apikey:<id>`, `webhook:<partner>`, a workload's SPIFFE ID. A route or a command that
takes a name reads a bare one as the `sub` of a token of the configured JWT_ISSUER (`GrantSubject`,
`principal_id`), so the grants of one issuer's users are never another issuer's: a change of
JWT_ISSUER is an explicit move (`move_issuer`, the `grants move-issuer` command), not an inheritance.
"""

from __future__ import annotations

from typing import Annotated, Any, cast

from fastapi import Depends, Path, Request
from fastapi.exceptions import RequestValidationError
from sqlalchemy import CursorResult, and_, delete, func, insert, literal, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import aliased

from ..resources import runtime_of
from ..tables import Permission, Relation
from .principal import principal_id

# Subjects that may be named in a grant (path parameter and CLI): what identity providers put in
# `sub`, or a principal id (`jwt:<issuer key>:<sub>`, `apikey:<id>`, `webhook:<partner>`).
SUBJECT_PATTERN = r"^[A-Za-z0-9_.:@|-]{1,255}$"


MAX_SUBJECT_LENGTH = 255  # the permissions table's column


async def grant_subject(request: Request, subject: Annotated[str, Path(pattern=SUBJECT_PATTERN)]) -> str:
    """The principal the `{subject}` of a grant route names (`principal_id`): no I/O. A bare `sub`
    too long to carry its issuer's prefix names no principal the service can have (400)."""
    named = principal_id(subject, runtime_of(request).verifier.namespace)
    if len(named) > MAX_SUBJECT_LENGTH:
        raise RequestValidationError(
            [{"type": "string_too_long", "loc": ("path", "subject"), "msg": "names no principal: too long"}]
        )
    return named


GrantSubject = Annotated[str, Depends(grant_subject)]


class GrantRefused(Exception):
    """A grant change that would break an invariant. The message is safe to show."""


class LastOwner(GrantRefused):
    """The change would leave the object without an owner."""


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
        raise LastOwner(f"{resource_type} {resource_id} must keep at least one owner")


async def move_issuer(session: AsyncSession, old_namespace: str, new_namespace: str) -> int:
    """Give every grant of the old issuer's subjects to the same `sub` of the new issuer (namespaces
    from `principal.issuer_namespace`), in one statement; the number moved. Refuses, changing
    nothing, when a subject holds grants on one object under both. The caller commits."""
    start = len(old_namespace) + 1
    moved_subject = literal(new_namespace) + func.substr(Permission.subject, start)
    of_old = Permission.subject.startswith(old_namespace, autoescape=True)
    both = aliased(Permission)
    clashes = await session.scalar(
        select(func.count())
        .select_from(Permission)
        .join(
            both,
            and_(
                both.resource_type == Permission.resource_type,
                both.resource_id == Permission.resource_id,
                both.subject == moved_subject,
            ),
        )
        .where(of_old)
    )
    if clashes:
        raise GrantRefused(
            f"{clashes} grant(s) of the old issuer's subjects exist for the new issuer's too; "
            "remove one of each pair (revoke-grant) and move again"
        )
    try:
        result = cast(
            CursorResult[Any],
            await session.execute(
                update(Permission)
                .where(of_old)
                .values(subject=moved_subject)
                .execution_options(synchronize_session=False)
            ),
        )
    except IntegrityError:  # a clashing grant was created concurrently
        await session.rollback()
        raise GrantRefused("The grants were changed concurrently; nothing was moved, retry.") from None
    return result.rowcount
