"""Operator and developer commands: `secure-api --help`."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from . import extensions
from .config import SERVICE_NAME, ConfigError, Settings, tracing_requested
from .domain import GRANT_TARGET
from .resources import app_runtime
from .security.events import operator, privilege_changed
from .security.logs import configure_command_logging
from .security.principal import issuer_namespace, principal_id
from .security.revocation import MAX_ID_LENGTH, Revocations
from .startup import load_settings
from .store.core import NotReplicated, StoreBusy, StoreUnavailable
from .tables import Relation

Command = Callable[[argparse.Namespace], int]
PRINCIPAL_HELP = (
    "a token's `sub` (of JWT_ISSUER), or a principal id: jwt:<issuer key>:<sub>, apikey:<id>, webhook:<partner>"
)


def generate_keys(args: argparse.Namespace) -> int:
    """Write a development RSA key pair (private.pem, public.pem) into --out."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = out / "private.pem"
    private.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    private.chmod(0o600)
    (out / "public.pem").write_bytes(
        key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    print(f"wrote {private} and {out / 'public.pem'}")
    return 0


def mint_token(args: argparse.Namespace) -> int:
    """Sign a short-lived development token. Refused in production."""
    if os.environ.get("ENVIRONMENT", "development") == "production":
        print("token mint is a development tool and is refused when ENVIRONMENT=production", file=sys.stderr)
        return 2
    key_file = args.private_key or os.environ.get("JWT_PRIVATE_KEY_FILE")
    issuer = args.issuer or os.environ.get("JWT_ISSUER")
    audience = args.audience or os.environ.get("JWT_AUDIENCE")
    missing = [
        name
        for name, value in (
            ("--private-key/JWT_PRIVATE_KEY_FILE", key_file),
            ("--issuer/JWT_ISSUER", issuer),
            ("--audience/JWT_AUDIENCE", audience),
        )
        if not value
    ]
    if missing:
        print(f"missing: {', '.join(missing)}", file=sys.stderr)
        return 2
    maximum = _max_token_lifetime()
    ttl = min(maximum, 900) if args.ttl is None else args.ttl
    if not 0 < ttl <= maximum:
        print(f"--ttl must be between 1 and JWT_MAX_TOKEN_LIFETIME_SECONDS ({maximum})", file=sys.stderr)
        return 2
    now = int(time.time())
    claims = {
        "iss": issuer,
        "aud": audience,
        "sub": args.sub,
        "scope": args.scope,
        "iat": now,
        "exp": now + ttl,
        "jti": uuid.uuid4().hex,
    }
    if args.jkt:
        claims["cnf"] = {"jkt": args.jkt}  # DPoP-bound (README "Authentication")
    # How the user signed in, for a route that requires a step-up (README "Step-up").
    if args.auth_time is not None:
        claims["auth_time"] = now if args.auth_time == "now" else int(args.auth_time)
    if args.acr:
        claims["acr"] = args.acr
    # An access token says so (RFC 9068), so JWT_REQUIRE_TYP accepts it.
    headers = {"typ": "at+jwt", **({"kid": args.kid} if args.kid else {})}
    print(jwt.encode(claims, Path(str(key_file)).read_bytes(), algorithm="RS256", headers=headers))
    return 0


def _max_token_lifetime() -> int:
    """The service's JWT_MAX_TOKEN_LIFETIME_SECONDS: a minted token the service would refuse is no help."""
    default = Settings.model_fields["jwt_max_token_lifetime_seconds"].default
    try:
        return int(os.environ.get("JWT_MAX_TOKEN_LIFETIME_SECONDS", default))
    except ValueError:
        return int(default)


def revoke_token(args: argparse.Namespace) -> int:
    """Refuse one token, by its `sub` and `jti`, on every replica until it expires (--exp, its `exp` claim).
    The `sub` is a claim of a token of JWT_ISSUER: the principal is that issuer's (security/principal.py)."""

    async def revoke(revocations: Revocations, namespace: str) -> str:
        if await revocations.revoke_token(namespace + args.sub, args.jti, args.exp):
            privilege_changed("token_revoked", grantee=namespace + args.sub, jti=args.jti, **operator("token-revoke"))
            return f"token {args.jti} revoked until it expires"
        return f"token {args.jti} has expired already; nothing to revoke"

    return _revoke(revoke)


def revoke_subject(args: argparse.Namespace) -> int:
    """Refuse every token of a subject (of JWT_ISSUER) issued before now, e.g. after a password reset."""

    async def revoke(revocations: Revocations, namespace: str) -> str:
        await revocations.revoke_subject(namespace + args.sub)
        privilege_changed("subject_tokens_revoked", grantee=namespace + args.sub, **operator("token-revoke-subject"))
        return f"tokens of {args.sub} issued until now are revoked"

    return _revoke(revoke)


def _revoke(action: Callable[[Revocations, str], Awaitable[str]]) -> int:
    settings = load_settings()
    configure_command_logging(settings)
    if not settings.redis_url:
        print("REDIS_URL is required: the running service reads revocations from Redis", file=sys.stderr)
        return 2

    from .store import redis_store

    async def run() -> str:
        store = redis_store(settings)
        try:
            return await action(Revocations(settings, store), issuer_namespace(settings.jwt_issuer))
        finally:
            await store.aclose()

    try:
        print(asyncio.run(run()))
    except NotReplicated:
        print(
            f"{SERVICE_NAME}: no Redis replica acknowledged the revocation within REDIS_TIMEOUT_SECONDS "
            "(a failover could lose it); it is not done: retry when the replicas are back",
            file=sys.stderr,
        )
        return 1
    except (StoreUnavailable, StoreBusy) as exc:
        error = type(exc.__cause__ or exc).__name__
        print(f"{SERVICE_NAME}: Redis is unavailable ({error}); nothing was revoked", file=sys.stderr)
        return 1
    return 0


def lift_lockout(args: argparse.Namespace) -> int:
    """Lift the lockout of a client address (an IPv6 one: its whole RATE_LIMIT_IPV6_PREFIX network)
    or of a subject, on every replica within a second; its failures are forgotten too."""
    from .security.lockout import Lockout
    from .security.ratelimit import client_bucket
    from .security.transport import rate_limit_bucket
    from .store import redis_store

    settings = load_settings()  # a settings error is printed by main()
    configure_command_logging(settings)
    if not settings.redis_url:
        print("REDIS_URL is required: the running service reads lockouts from Redis", file=sys.stderr)
        return 2
    kind, name = ("subject", args.sub) if args.sub else ("address", args.address)
    if kind == "subject":
        name = principal_id(name, issuer_namespace(settings.jwt_issuer))
    else:
        name = rate_limit_bucket(name, settings.rate_limit_ipv6_prefix)

    async def lift() -> bool:
        store = redis_store(settings)
        try:
            return await Lockout(settings, store, client_bucket(settings.rate_limit_ipv6_prefix)).lift(name, kind)
        finally:
            await store.aclose()

    try:
        locked = asyncio.run(lift())
    except (StoreUnavailable, StoreBusy) as exc:
        error = type(exc.__cause__ or exc).__name__
        print(f"{SERVICE_NAME}: Redis is unavailable ({error}); nothing was lifted", file=sys.stderr)
        return 1
    lifted = {"grantee": name} if kind == "subject" else {"client": name}
    privilege_changed("lockout_lifted", kind=kind, was_locked=locked, **lifted, **operator("lockout-lift"))
    print(f"{kind} {name}: lockout lifted" if locked else f"{kind} {name} was not locked out; its failures are reset")
    return 0


def serve(args: argparse.Namespace) -> int:
    """Run the service with uvicorn configured for it: no proxy headers (TRUSTED_PROXIES decides
    whom to believe), no Server banner, the service's JSON logging, the server limits, and a drain
    period on SIGTERM (shutdown.py)."""
    import uvicorn

    try:
        settings = load_settings()
        option_server_options = extensions.server_options(settings)  # e.g. TLS, from the baked options
    except ConfigError as exc:
        print(f"{SERVICE_NAME}: refusing to start: {exc}", file=sys.stderr)
        return 1
    if settings.metrics_port is not None and args.workers > 1:
        print(
            f"{SERVICE_NAME}: refusing to start: METRICS_PORT serves one process's metrics; "
            "run one process per container (or per port) instead of --workers",
            file=sys.stderr,
        )
        return 2
    host, port = args.host or settings.host, args.port or settings.port
    from .app import create_app
    from .shutdown import DrainingServer

    try:
        app = create_app(settings)  # built here under --workers too: a route without a policy is refused once
    except ConfigError as exc:
        print(f"{SERVICE_NAME}: refusing to start: {exc}", file=sys.stderr)
        return 1
    if args.workers > 1:
        # uvicorn's supervisor and its plain workers: SIGTERM stops them without the drain period
        # (README: Scaling). One process per container is the Kubernetes way.
        uvicorn.run(
            f"{__package__}.app:create_app", factory=True, host=host, port=port, workers=args.workers,
            **server_options(settings, option_server_options),
        )  # fmt: skip
        return 0

    server = DrainingServer(
        uvicorn.Config(app, host=host, port=port, **server_options(settings, option_server_options)),
        app_runtime(app),
        settings.shutdown_drain_seconds,
    )
    try:
        server.run()  # uvicorn exits 3 itself when the lifespan's startup fails
    except SystemExit:
        refused = getattr(app.state, "startup_refused", None)  # deny by default, on the final route table
        if refused:
            print(f"{SERVICE_NAME}: refusing to start: {refused}", file=sys.stderr)
            return 1
        raise
    return 0 if server.started else 3  # 3: uvicorn's status for a server that never started


def server_options(settings: Settings, extra: dict[str, Any]) -> dict[str, Any]:
    """uvicorn's settings for the service, from SERVER_*, and `extra` from the baked options."""
    return dict(
        proxy_headers=False,
        server_header=False,
        access_log=False,
        log_config=None,
        # uvicorn's own protections (SERVER_*): idle keep-alive connections are closed, connections
        # and tasks are capped (uvicorn answers 503 beyond), the listen backlog is bounded, shutdown
        # waits a bounded time for requests in flight, and a request head larger than the limit is
        # refused (h11). uvicorn has no timeout for reading a request head: the reverse proxy in
        # front provides it (deploy/nginx/).
        timeout_keep_alive=settings.server_timeout_keep_alive_seconds,
        limit_concurrency=settings.server_limit_concurrency,
        backlog=settings.server_backlog,
        timeout_graceful_shutdown=settings.server_timeout_graceful_shutdown_seconds,
        h11_max_incomplete_event_size=settings.server_h11_max_incomplete_event_size,
        **extra,
    )


def check_config(_args: argparse.Namespace) -> int:
    """Validate the environment as the service would at start."""
    from .app import create_app

    try:
        settings = load_settings()
        tracing = tracing_requested()
        # The app as the service builds it (no I/O), so a route without a policy is refused (deny by
        # default); its log lines go to stderr, stdout carries the verdict alone.
        with contextlib.redirect_stdout(sys.stderr):
            app = create_app(settings)
    except ConfigError as exc:
        print(f"{SERVICE_NAME}: refusing to start: {exc}", file=sys.stderr)
        return 1
    if (built := app_runtime(app).tracing) is not None:
        built.provider.shutdown()  # nothing was traced: stops the exporter's thread
    observed = [name for name, on in (("traces", tracing), ("metrics", settings.metrics_port is not None)) if on]
    print(f"configuration ok ({', '.join([settings.environment, *observed])})")
    return 0


def audit_pseudonym(args: argparse.Namespace) -> int:
    """Print the pseudonym under which the audit log names a subject, to search the log for it."""
    from .security.pseudonyms import Pseudonyms

    settings = load_settings()
    key = settings.audit_pseudonym_key_bytes
    if key is None:
        print("AUDIT_PSEUDONYM_KEY is not set: the service used a key of its own process", file=sys.stderr)
        return 2
    print(Pseudonyms(key)(principal_id(args.sub, issuer_namespace(settings.jwt_issuer))))
    return 0


def grant(args: argparse.Namespace) -> int:
    """Give a subject a relation on an object (domain.GRANT_TARGET: an org in the example), e.g. its
    first owner. Takes effect on the next request."""
    return _change_grant(args, args.relation)


def revoke_grant(args: argparse.Namespace) -> int:
    """Remove a subject's grant on an object. Takes effect on the next request; the last owner stays."""
    return _change_grant(args, None)


def _change_grant(args: argparse.Namespace, relation: str | None) -> int:
    from .security import grants

    if not re.fullmatch(grants.SUBJECT_PATTERN, args.sub):
        print(f"--sub must match {grants.SUBJECT_PATTERN}", file=sys.stderr)
        return 2
    settings = load_settings()
    configure_command_logging(settings)
    object_id = getattr(args, GRANT_TARGET.noun)
    subject = principal_id(args.sub, issuer_namespace(settings.jwt_issuer))
    if len(subject) > grants.MAX_SUBJECT_LENGTH:
        print(f"--sub is too long to name a principal of JWT_ISSUER ({subject[:32]}...)", file=sys.stderr)
        return 2
    ok, message = asyncio.run(_apply_grant(settings.database_url, object_id, subject, relation))
    print(message, file=sys.stdout if ok else sys.stderr)
    return 0 if ok else 1


async def _apply_grant(database_url: str, object_id: object, subject: str, relation: str | None) -> tuple[bool, str]:
    from . import models
    from .db import create_engine, create_sessionmaker
    from .security import grants

    target = GRANT_TARGET
    named = f"{target.noun} {object_id}"
    engine = create_engine(database_url)
    try:
        async with create_sessionmaker(engine)() as session:
            if await session.get(getattr(models, target.table), object_id) is None:
                return False, f"no {named}"
            try:
                if relation is None:
                    if not await grants.revoke(
                        session, target.resource_type, str(object_id), subject, acting_owner=None
                    ):
                        return False, f"{subject} holds no grant on {named}"
                    message = f"revoked the grant of {subject} on {named}"
                    action, command, given = "grant_revoked", "revoke-grant", {}
                else:
                    created = await grants.set_relation(
                        session,
                        target.resource_type,
                        str(object_id),
                        subject,
                        Relation(relation),
                        granted_by=f"cli:{SERVICE_NAME}",
                        acting_owner=None,  # an operator with database access, not a caller of the API
                    )
                    message = f"{subject} is now {relation} of {named}"
                    action, command = ("grant_created" if created else "grant_changed"), "grant"
                    given = {"relation": relation}
            except grants.GrantRefused as refused:
                return False, str(refused)
            await session.commit()
            privilege_changed(
                action,
                resource_type=target.resource_type,
                resource_id=str(object_id),
                grantee=subject,
                **given,
                **operator(command),
            )
            return True, message
    finally:
        await engine.dispose()


def move_issuer(args: argparse.Namespace) -> int:
    """Give the grants of one issuer's subjects to the same `sub` of another issuer: the explicit
    step when JWT_ISSUER changes (grants are never inherited by a new issuer's users)."""
    from .db import create_engine, create_sessionmaker
    from .security import grants

    if args.old == args.new:
        print("--from and --to name the same issuer; nothing to move", file=sys.stderr)
        return 2
    settings = load_settings()
    configure_command_logging(settings)
    old, new = issuer_namespace(args.old), issuer_namespace(args.new)

    async def move() -> tuple[int, dict[str, int]]:
        engine = create_engine(
            settings.database_url, statement_timeout_seconds=settings.database_statement_timeout_seconds
        )
        try:
            async with create_sessionmaker(engine)() as session:
                moved = await grants.move_issuer(session, old, new)
                # The options' rows that name the old issuer's principals (API keys' owners), in
                # the same transaction: all of it moves, or nothing.
                options_moved = await extensions.move_issuer(session, old, new)
                await session.commit()
                return moved, options_moved
        finally:
            await engine.dispose()

    try:
        moved, options_moved = asyncio.run(move())
    except grants.GrantRefused as refused:
        print(f"{SERVICE_NAME}: {refused}", file=sys.stderr)
        return 1
    privilege_changed(
        "issuer_moved",
        from_namespace=old,
        to_namespace=new,
        grants=moved,
        **{f"{option}_moved": count for option, count in options_moved.items()},
        **operator("grants-move-issuer"),
    )
    print(f"moved {moved} grant(s) from {old}<sub> ({args.old}) to {new}<sub> ({args.new})")
    for option, count in options_moved.items():
        print(f"moved {count} row(s) of the {option} option with them")
    if args.new != settings.jwt_issuer:
        print(f"note: JWT_ISSUER is {settings.jwt_issuer}, not --to", file=sys.stderr)
    return 0


def _auth_time(value: str) -> str:
    if value != "now" and not value.isdigit():
        raise argparse.ArgumentTypeError("epoch seconds, or now")
    return value


def _claim_text(value: str) -> str:
    if not value or len(value) > MAX_ID_LENGTH:
        raise argparse.ArgumentTypeError(f"must be 1 to {MAX_ID_LENGTH} characters")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=SERVICE_NAME, description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    keys = commands.add_parser("keys", help="signing keys for development").add_subparsers(dest="action", required=True)
    generate = keys.add_parser("generate", help="write an RSA key pair")
    generate.add_argument("--out", default=".keys")
    generate.set_defaults(handler=generate_keys)

    token = commands.add_parser("token", help="tokens").add_subparsers(dest="action", required=True)
    mint = token.add_parser("mint", help="sign a development token (refused in production)")
    mint.add_argument("--sub", required=True)
    mint.add_argument("--scope", default="")
    mint.add_argument("--ttl", type=int, help="seconds; default 900, at most JWT_MAX_TOKEN_LIFETIME_SECONDS")
    mint.add_argument("--kid")
    mint.add_argument("--jkt", help="bind the token to the DPoP key with this RFC 7638 thumbprint (cnf.jkt)")
    mint.add_argument("--auth-time", type=_auth_time, help="when the user signed in: epoch seconds, or now")
    mint.add_argument("--acr", help="how the user signed in (an acr value, for STEP_UP_ACR_VALUES)")
    mint.add_argument("--private-key")
    mint.add_argument("--issuer")
    mint.add_argument("--audience")
    mint.set_defaults(handler=mint_token)
    revoke = token.add_parser("revoke", help="revoke one token by its jti until it expires")
    revoke.add_argument("--sub", required=True, type=_claim_text, help="the token's `sub` claim")
    revoke.add_argument("--jti", required=True, type=_claim_text, help="the token's `jti` claim")
    revoke.add_argument("--exp", required=True, type=int, help="the token's `exp` claim (epoch seconds)")
    revoke.set_defaults(handler=revoke_token)
    revoke_sub = token.add_parser("revoke-subject", help="revoke every token of a subject issued before now")
    revoke_sub.add_argument("--sub", required=True, type=_claim_text, help="the tokens' `sub` claim")
    revoke_sub.set_defaults(handler=revoke_subject)

    lockout = commands.add_parser("lockout", help="lockouts").add_subparsers(dest="action", required=True)
    lift = lockout.add_parser("lift", help="lift the lockout of an address or a subject on every replica")
    lifted = lift.add_mutually_exclusive_group(required=True)
    lifted.add_argument("--address", help="a client address, as the service sees it (TRUSTED_PROXIES)")
    lifted.add_argument("--sub", type=_claim_text, help=PRINCIPAL_HELP)
    lift.set_defaults(handler=lift_lockout)

    run = commands.add_parser("serve", help="run the service")
    run.add_argument("--host")
    run.add_argument("--port", type=int)
    run.add_argument("--workers", type=int, default=1)
    run.set_defaults(handler=serve)

    commands.add_parser("check-config", help="validate the environment").set_defaults(handler=check_config)

    scaffold = commands.add_parser(
        "scaffold", help="write a resource of your own: table, migration, policies, routes, router, BOLA test"
    )
    scaffold.add_argument("kind", choices=["resource"])
    scaffold.add_argument("name", help="singular, snake case: e.g. project")
    scaffold.add_argument("--plural", help="the collection's name (default: NAME + s)")
    scaffold.add_argument("--under", help="the object it belongs to, e.g. org (default: a top-level object type)")
    scaffold.add_argument(
        "--step-up",
        action="store_true",
        help="its writes require the configured step-up (STEP_UP_MAX_AGE_SECONDS, STEP_UP_ACR_VALUES)",
    )
    scaffold.set_defaults(handler=scaffold_resource)

    pseudonym = commands.add_parser("audit-pseudonym", help="the pseudonym the audit log uses for a subject")
    pseudonym.add_argument("--sub", required=True, type=_claim_text, help=PRINCIPAL_HELP)
    pseudonym.set_defaults(handler=audit_pseudonym)

    relations = [relation.value for relation in Relation]
    noun = GRANT_TARGET.noun
    give = commands.add_parser("grant", help=f"give a subject a relation on an {noun} (e.g. its first owner)")
    give.add_argument("--sub", required=True, help=PRINCIPAL_HELP)
    give.add_argument(f"--{noun}", required=True, type=GRANT_TARGET.parse_id, help=f"the {noun} id")
    give.add_argument("--relation", required=True, choices=relations)
    give.set_defaults(handler=grant)
    take = commands.add_parser("revoke-grant", help=f"remove a subject's grant on an {noun}")
    take.add_argument("--sub", required=True, help=PRINCIPAL_HELP)
    take.add_argument(f"--{noun}", required=True, type=GRANT_TARGET.parse_id, help=f"the {noun} id")
    take.set_defaults(handler=revoke_grant)
    grant_commands = commands.add_parser("grants", help="all grants at once").add_subparsers(
        dest="action", required=True
    )
    move = grant_commands.add_parser(
        "move-issuer", help="give one issuer's subjects' grants to the same subjects of another (JWT_ISSUER changed)"
    )
    move.add_argument("--from", dest="old", required=True, type=_claim_text, help="the old JWT_ISSUER, exactly")
    move.add_argument("--to", dest="new", required=True, type=_claim_text, help="the new JWT_ISSUER, exactly")
    move.set_defaults(handler=move_issuer)

    extensions.add_commands(commands)  # the baked credential options' commands
    return parser


def scaffold_resource(args: argparse.Namespace) -> int:
    """Write a resource of the service's own in owner files (scaffold.py); then `make lint test`."""
    from .scaffold import Resource, ScaffoldRefused, scaffold, tidy

    resource = Resource(args.name, args.plural or f"{args.name}s", args.under, step_up=args.step_up)
    try:
        written = scaffold(resource)
    except ScaffoldRefused as refused:
        print(f"{SERVICE_NAME}: scaffold refused: {refused}", file=sys.stderr)
        return 2
    if not tidy(written):
        print("note: ruff did not run cleanly on the written files; run `make lint`", file=sys.stderr)
    for path in written:
        print(f"wrote {path}")
    print("next: alembic upgrade heads; make lint test")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler: Command = args.handler
    try:
        return handler(args)
    except ConfigError as exc:  # every command refuses an invalid or unsafe setting alike, by name
        print(f"{SERVICE_NAME}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
