"""The owner-only API for API keys: a token's subject issues, lists, rotates and revokes its own keys.

Only a bearer token's subject can call these routes: an API key cannot, whatever its scopes (it never
carries `api-keys:*` anyway), since a leaked key must not be able to mint its own successor or rotate
its holder out; nor can a workload's certificate alone (with one, the token's scopes are narrowed
to the workload's, security/composition.py). Another owner's key
is answered 403, exactly as a key that does not exist (no existence oracle).
"""

# No `from __future__ import annotations`: the dependencies below close over local policies,
# which FastAPI must see as objects, not strings.
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Path, Request, status
from pydantic import BaseModel, Field, StringConstraints
from sqlalchemy import select

from ...db import SessionDep
from ...resources import runtime_of
from ...security import quotas
from ...security.authn import BearerToken
from ...security.authz import (
    TABLE_ENGINE,
    ObjectRule,
    action_of,
    decision_event,
    declare,
    no_object_policy,
    require_scopes,
)
from ...security.errors import PROBLEM_RESPONSES, ProblemDetail
from ...security.events import security_event
from ...security.principal import Principal
from ...security.ratelimit import limit
from ...security.revocation import Revocations
from ...security.validation import Strict, Text
from ...store.core import NotReplicated, StoreBusy, StoreUnavailable
from ...tables import Relation
from . import store
from .authenticator import SUBJECT_PREFIX
from .models import ApiKey
from .running import ApiKeysExtension
from .settings import ApiKeySettings

KEY = "api_key"
READ, WRITE = "api-keys:read", "api-keys:write"
KeyId = Annotated[str, Path(pattern=r"^[0-9a-f]{16}$")]
Scope = Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9:._-]+$")]
Network = Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=r"^[0-9A-Fa-f:./]+$")]


def _refuse_api_keys(principal: Principal) -> None:
    """A token's subject only: an API key, a workload's certificate alone or a webhook never manage keys."""
    if principal.credential != BearerToken.challenge or principal.subject.startswith(SUBJECT_PREFIX):
        security_event("scope_denied", subject=principal.subject, reason="api_key_cannot_manage_keys")
        raise HTTPException(403, ProblemDetail("API keys are managed with a token, not with an API key."))


def _not_written(action: str, exc: Exception) -> HTTPException:
    """Redis could not take a revocation (down, or no replica acknowledged it in time): nothing was
    changed, and the answer says so (503)."""
    reason = "not_replicated" if isinstance(exc, NotReplicated) else "unavailable"
    security_event("dependency_unavailable", dependency="redis", layer="api_keys", action=action, reason=reason)
    return HTTPException(
        503,
        ProblemDetail(f"The key was not {action}: the revocation store is unavailable. Retry later."),
        headers={"Retry-After": "1"},
    )


def key_manager(*, scopes: list[str]) -> Any:
    """`no_object_policy(scopes)`, for a token only."""
    policy = no_object_policy(scopes=scopes)

    async def token_only(principal: Annotated[Principal, policy]) -> Principal:
        _refuse_api_keys(principal)
        return principal

    return Depends(token_only)


def owned_key(*, scopes: list[str]) -> Any:
    """The key in the path, when the caller's token carries `scopes` and its subject owns the key;
    403 otherwise, whether the key exists or not."""
    scoped = require_scopes(*scopes, resource_type=KEY, param="key_id")
    action = action_of(scopes)

    async def check_key_owner(
        key_id: KeyId, principal: Annotated[Principal, scoped], session: SessionDep, request: Request
    ) -> store.KeyInfo:
        _refuse_api_keys(principal)
        key = await store.get_key(session, key_id, owner=principal.subject)
        decision_event(
            principal,
            allowed=key is not None,
            log_allows=runtime_of(request).settings.audit_authz_allows,
            engine=TABLE_ENGINE,
            action=action,
            resource_type=KEY,
            resource_id=key_id,
            required="owner",
            policy=f"{KEY}:owner",
        )
        if key is None:
            security_event(
                "object_denied",
                subject=principal.subject,
                resource_type=KEY,
                resource_id=key_id,
                required="owner",
                action=action,
            )
            raise HTTPException(403)
        return key

    return Depends(declare(check_key_owner, ObjectRule(KEY, Relation.owner)))


CanIssueKeys = Annotated[Principal, key_manager(scopes=[WRITE])]
CanListKeys = Annotated[Principal, key_manager(scopes=[READ])]
ReadableKey = Annotated[store.KeyInfo, owned_key(scopes=[READ])]
WritableKey = Annotated[store.KeyInfo, owned_key(scopes=[WRITE])]


class KeyCreate(Strict):
    name: Annotated[str, StringConstraints(strip_whitespace=True, max_length=100), Text] = ""
    scopes: list[Scope] = Field(min_length=1, max_length=store.MAX_SCOPES)
    allowed_networks: list[Network] = Field(default_factory=list, max_length=store.MAX_NETWORKS)
    expires_in_seconds: int | None = Field(None, ge=60)


class KeyRotate(Strict):
    overlap_seconds: int = Field(0, ge=0, le=store.MAX_OVERLAP_SECONDS)


class KeyOut(BaseModel):
    id: str
    subject: str
    name: str
    scopes: list[str]
    allowed_networks: list[str]
    created_at: datetime
    expires_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None
    previous_secret_expires_at: datetime | None

    @classmethod
    def of(cls, key: store.KeyInfo) -> "KeyOut":
        return cls(
            id=key.id,
            subject=key.subject,
            name=key.name,
            scopes=key.scopes,
            allowed_networks=key.networks,
            created_at=key.created_at,
            expires_at=key.expires_at,
            last_used_at=key.last_used_at,
            revoked_at=key.revoked_at,
            previous_secret_expires_at=key.previous_secret_expires_at,
        )


class IssuedKeyOut(KeyOut):
    key: str = Field(description="The whole key. Shown once: it is not stored and cannot be shown again.")


router = APIRouter(prefix="/api/v1/api-keys", tags=["api-keys"], responses=PROBLEM_RESPONSES)


def _settings(request: Request) -> ApiKeySettings:
    """The settings the running authenticator was built with (extension.py)."""
    return runtime_of(request).extension(ApiKeysExtension).settings


def _revocations(request: Request) -> Revocations:
    return runtime_of(request).revocations


def _issued(issued: store.IssuedKey) -> IssuedKeyOut:
    return IssuedKeyOut(**KeyOut.of(issued.info).model_dump(), key=issued.key)


@router.post("", status_code=status.HTTP_201_CREATED, dependencies=[limit("10/minute", name="api_key_writes")])
async def issue_key(body: KeyCreate, principal: CanIssueKeys, session: SessionDep, request: Request) -> IssuedKeyOut:
    """Issue a key owned by the caller, with some of the caller's own scopes. 409 `quota-exceeded`
    when the caller holds API_KEY_MAX_PER_OWNER live keys (neither revoked nor expired)."""
    beyond = set(body.scopes) - principal.scopes
    if beyond:
        security_event("scope_denied", subject=principal.subject, missing=sorted(beyond), reason="api_key_scopes")
        raise HTTPException(403, ProblemDetail("A key can only carry scopes the caller's token carries."))
    settings = _settings(request)
    await quotas.hold(session, "api_keys_per_owner", principal.subject)
    try:
        issued = await store.issue(
            session,
            settings,
            owner=principal.subject,
            name=body.name,
            scopes=body.scopes,
            networks=body.allowed_networks,
            lifetime_seconds=body.expires_in_seconds,
            created_by=principal.subject,
        )
    except store.KeyRefused as refused:
        raise HTTPException(400, ProblemDetail(str(refused))) from None
    await quotas.enforce(
        session,
        select(ApiKey.id).where(
            ApiKey.owner == principal.subject, ApiKey.revoked_at.is_(None), ApiKey.expires_at > datetime.now(UTC)
        ),
        quota="api_keys_per_owner",
        limit=settings.max_per_owner,
        what="live API keys per owner",
        variable="API_KEY_MAX_PER_OWNER",
        resource_type=KEY,
    )
    await session.commit()
    security_event("api_key_issued", subject=principal.subject, key_id=issued.info.id, scopes=issued.info.scopes)
    return _issued(issued)


@router.get("")
async def list_keys(principal: CanListKeys, session: SessionDep) -> list[KeyOut]:
    """The caller's keys, revoked and expired ones included."""
    return [KeyOut.of(key) for key in await store.list_keys(session, owner=principal.subject)]


@router.get("/{key_id}")
async def get_key(key: ReadableKey) -> KeyOut:
    return KeyOut.of(key)


@router.post("/{key_id}/rotate", dependencies=[limit("10/minute", name="api_key_writes")])
async def rotate_key(key: WritableKey, body: KeyRotate, session: SessionDep, request: Request) -> IssuedKeyOut:
    """A new secret; the current one keeps working for `overlap_seconds`. 409 for a revoked or
    expired key."""
    try:
        issued = await store.rotate(
            session,
            _settings(request),
            _revocations(request),
            key.id,
            overlap_seconds=body.overlap_seconds,
            owner=key.owner,
        )
    except store.KeyRefused as refused:
        raise HTTPException(400, ProblemDetail(str(refused))) from None
    except (StoreUnavailable, StoreBusy) as exc:
        raise _not_written("rotated", exc) from None
    if issued is None:
        raise HTTPException(409, ProblemDetail("The key is revoked or expired."))
    security_event("api_key_rotated", subject=key.owner, key_id=key.id, overlap_seconds=body.overlap_seconds)
    return _issued(issued)


@router.delete("/{key_id}", status_code=status.HTTP_204_NO_CONTENT)
async def revoke_key(key: WritableKey, session: SessionDep, request: Request) -> None:
    """Revoke the key; refused from its next request on every replica. Revoking twice is a no-op.
    503 when Redis cannot take the revocation: then nothing is changed."""
    try:
        revoked = await store.revoke(session, _revocations(request), key.id, owner=key.owner)
    except (StoreUnavailable, StoreBusy) as exc:
        raise _not_written("revoked", exc) from None
    if revoked:
        security_event("api_key_revoked", subject=key.owner, key_id=key.id)
