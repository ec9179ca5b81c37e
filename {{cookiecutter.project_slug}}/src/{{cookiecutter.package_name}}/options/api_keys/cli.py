"""The operators' `api-key` commands: issue, list, rotate and revoke keys; the scanner rule."""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from ...config import SERVICE_NAME
from ...security.events import operator, privilege_changed
from ...security.logs import configure_command_logging
from ...security.principal import API_KEY_NAMESPACE, issuer_namespace, principal_id
from ...security.revocation import Revocations
from ...startup import load_settings
from ...store.core import MemoryStore, NotReplicated, RemoteStore, StoreBusy, StoreUnavailable
from . import store
from .authenticator import scanner_pattern
from .settings import ApiKeySettings, load_api_key_settings

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncSession


DURATION = re.compile(r"^(\d+)([smhd]?)$")


UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def duration(text: str) -> int:
    """Seconds from `90d`, `12h`, `30m`, `45s` or a plain number of seconds."""
    match = DURATION.fullmatch(text.strip())
    if match is None:
        raise argparse.ArgumentTypeError("use a number with an optional unit s, m, h or d, e.g. 90d")
    return int(match.group(1)) * UNITS[match.group(2)]


def key_id(text: str) -> str:
    if not re.fullmatch(r"[0-9a-f]{16}", text):
        raise argparse.ArgumentTypeError("a key id is 16 lowercase hex characters (the key's middle part)")
    return text


Action = Callable[["AsyncSession", ApiKeySettings, Revocations], Awaitable[tuple[int, str]]]


def _run(action: Action) -> int:
    core = load_settings()
    settings = load_api_key_settings(core)
    configure_command_logging(core)  # the privilege_changed events, on stderr
    if not core.redis_url:
        print(
            "note: REDIS_URL is not set; replicas that reuse a looked-up key (API_KEY_CACHE_SECONDS) learn of "
            "a revocation or rotation only from Redis",
            file=sys.stderr,
        )

    from ...db import create_engine, create_sessionmaker
    from ...store import redis_store

    async def run() -> tuple[int, str]:
        engine = create_engine(core.database_url, statement_timeout_seconds=core.database_statement_timeout_seconds)
        redis: RemoteStore | MemoryStore = redis_store(core) if core.redis_url else MemoryStore()
        try:
            async with create_sessionmaker(engine)() as session:
                return await action(session, settings, Revocations(core, redis))
        finally:
            if isinstance(redis, RemoteStore):
                await redis.aclose()
            await engine.dispose()

    try:
        status, message = asyncio.run(run())
    except store.KeyRefused as refused:
        print(f"{SERVICE_NAME}: {refused}", file=sys.stderr)
        return 2
    except NotReplicated:
        print(
            f"{SERVICE_NAME}: no Redis replica acknowledged the revocation within REDIS_TIMEOUT_SECONDS (a "
            "failover could lose it); nothing was changed: retry when the replicas are back",
            file=sys.stderr,
        )
        return 1
    except (StoreUnavailable, StoreBusy) as exc:
        error = type(exc.__cause__ or exc).__name__
        print(
            f"{SERVICE_NAME}: Redis is unavailable ({error}); nothing was changed (a revocation or rotation "
            "must reach Redis, which every replica reads); retry when Redis is back",
            file=sys.stderr,
        )
        return 1
    print(message, file=sys.stdout if status == 0 else sys.stderr)
    return status


def _owner(name: str) -> str:
    """The principal an --owner names: a token's `sub` of JWT_ISSUER, or a principal id."""
    return principal_id(name, issuer_namespace(load_settings().jwt_issuer))


def _shown(key: store.KeyInfo) -> str:
    networks = ",".join(key.networks) or "any"
    state = "revoked" if key.revoked_at else f"expires {key.expires_at.isoformat(timespec='seconds')}"
    used = key.last_used_at.isoformat(timespec="seconds") if key.last_used_at else "never"
    return (
        f"{key.id}  owner={key.owner}  subject={key.subject}  scopes={' '.join(key.scopes)}  "
        f"networks={networks}  {state}  last-used={used}  name={key.name!r}"
    )


def issue_key(args: argparse.Namespace) -> int:
    """Issue a key; the whole key is printed once, on stdout, and never again."""

    async def action(session: AsyncSession, settings: ApiKeySettings, _revocations: Revocations) -> tuple[int, str]:
        issued = await store.issue(
            session,
            settings,
            owner=_owner(args.owner),
            name=args.name,
            scopes=[scope for given in args.scope for scope in given.split()],
            networks=args.allow_network,
            lifetime_seconds=args.expires_in,
            created_by=f"cli:{SERVICE_NAME}",
        )
        await session.commit()
        privilege_changed(
            "api_key_issued",
            grantee=issued.info.subject,
            owner=issued.info.owner,
            key_id=issued.info.id,
            scopes=issued.info.scopes,
            **operator("api-key-issue"),
        )
        print(_shown(issued.info), file=sys.stderr)
        return 0, issued.key

    return _run(action)


def list_keys(args: argparse.Namespace) -> int:
    async def action(session: AsyncSession, _settings: ApiKeySettings, _revocations: Revocations) -> tuple[int, str]:
        keys = await store.list_keys(session, owner=_owner(args.owner) if args.owner else None)
        return 0, "\n".join(_shown(key) for key in keys) or "no keys"

    return _run(action)


def rotate_key(args: argparse.Namespace) -> int:
    """A new secret, printed once; the current one keeps working for --overlap."""

    async def action(session: AsyncSession, settings: ApiKeySettings, revocations: Revocations) -> tuple[int, str]:
        issued = await store.rotate(session, settings, revocations, args.id, overlap_seconds=args.overlap)
        if issued is None:
            return 1, f"no live key {args.id} (unknown, revoked or expired)"
        print(_shown(issued.info), file=sys.stderr)
        return 0, issued.key

    return _run(action)


def revoke_key(args: argparse.Namespace) -> int:
    async def action(session: AsyncSession, _settings: ApiKeySettings, revocations: Revocations) -> tuple[int, str]:
        if await store.revoke(session, revocations, args.id):
            privilege_changed(
                "api_key_revoked", grantee=f"{API_KEY_NAMESPACE}{args.id}", key_id=args.id, **operator("api-key-revoke")
            )
            return 0, f"key {args.id} revoked; refused from its next request"
        return 1, f"no key {args.id} that is not revoked already"

    return _run(action)


def scanner_rule(_args: argparse.Namespace) -> int:
    """The regular expression that finds leaked keys of this service, for gitleaks or detect-secrets."""
    try:
        settings = ApiKeySettings()
    except ValueError as exc:
        print(f"{SERVICE_NAME}: {exc}", file=sys.stderr)
        return 1
    print(scanner_pattern(settings.prefix))
    return 0


def add_commands(commands: argparse._SubParsersAction[Any]) -> None:
    keys = commands.add_parser("api-key", help="scoped API keys for partner callers").add_subparsers(
        dest="action", required=True
    )
    issue = keys.add_parser("issue", help="issue a key (printed once)")
    issue.add_argument("--owner", required=True, help="the token `sub` (of JWT_ISSUER) or principal id owning the key")
    issue.add_argument("--scope", action="append", required=True, help="a scope (repeat, or space-separated)")
    issue.add_argument("--name", default="", help="a label, e.g. the partner's name")
    issue.add_argument("--expires-in", type=duration, help="e.g. 90d; default API_KEY_DEFAULT_LIFETIME_DAYS")
    issue.add_argument("--allow-network", action="append", default=[], help="a CIDR the key may be used from (repeat)")
    issue.set_defaults(handler=issue_key)
    listing = keys.add_parser("list", help="list keys (never their secrets)")
    listing.add_argument("--owner", help="only this owner's keys")
    listing.set_defaults(handler=list_keys)
    rotate = keys.add_parser("rotate", help="give a key a new secret (printed once)")
    rotate.add_argument("id", type=key_id)
    rotate.add_argument("--overlap", type=duration, default=0, help="how long the current secret keeps working")
    rotate.set_defaults(handler=rotate_key)
    revoke = keys.add_parser("revoke", help="revoke a key for good")
    revoke.add_argument("id", type=key_id)
    revoke.set_defaults(handler=revoke_key)
    keys.add_parser("scanner-rule", help="the regex that finds leaked keys").set_defaults(handler=scanner_rule)
