"""`scaffold resource NAME`: a resource of the service's own, in one command, in owner files only.

It writes what the README's "Your own resource" steps do by hand: the table (`models.py`), its
migration (`migrations/versions/`, lint-clean, for SQLite and PostgreSQL alike), its policies
(`api/deps.py`), its routes (`api/<plural>.py`) and their router's registration
(`api/__init__.py`), and a BOLA test of its own (`tests/test_<plural>.py`). A resource `--under`
an object (`org`: `/api/v1/orgs/{org_id}/<plural>`) is guarded by the caller's relation to that
object, of that object's own type; a top-level one is an object type of its own, whose creator
becomes its owner, and can be a parent in turn (`--under project` after `scaffold resource
project`). A resource scaffolded under another has no grants of its own, so nothing can be
scaffolded under it: the command refuses. With `--step-up`, the routes that write (create,
delete) also declare the configured step-up (`authz.CONFIGURED_STEP_UP`: STEP_UP_MAX_AGE_SECONDS,
STEP_UP_ACR_VALUES; README "Step-up"), and its test proves a stale authentication is refused.

It runs in a source checkout (an editable install), refuses to overwrite anything, and changes
no template file.
"""

from __future__ import annotations

import keyword
import re
from dataclasses import dataclass
from pathlib import Path
from string import Template

from alembic.script import ScriptDirectory

from . import extensions
from .migrations import alembic_config

NAME_PATTERN = re.compile(r"^[a-z][a-z0-9_]{1,30}$")
PACKAGE_DIR = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Parent:
    """An object a resource can be scaffolded under: one with grants of its own in the permissions
    table, so the child's routes check the caller's relation to it."""

    name: str  # `org`
    object_type: str  # the constant `api/deps.py` names its object type by: `ORG`
    table: str  # `orgs`; also its collection path (`/orgs`) and its scopes (`orgs:read`, `orgs:write`)

    @property
    def param(self) -> str:
        return f"{self.name}_id"


# The example domain's org; every top-level resource scaffolded before is one too (`parents`).
ORG_PARENT = Parent("org", "ORG", "orgs")
_OBJECT_TYPE = re.compile(r'^([A-Z][A-Z0-9_]*) = "([a-z][a-z0-9_]*)"$', re.MULTILINE)


class ScaffoldRefused(Exception):
    """The resource cannot be written as asked; the message says why and changes nothing."""


@dataclass(frozen=True)
class Resource:
    name: str  # singular, snake case: `project`
    plural: str
    parent: str | None  # `org` or a top-level resource scaffolded before, or None for a top-level resource
    step_up: bool = False  # its writes declare the configured step-up (authz.CONFIGURED_STEP_UP)

    @property
    def cls(self) -> str:
        return "".join(part.capitalize() for part in self.name.split("_"))

    @property
    def label(self) -> str:
        return "".join(part.capitalize() for part in self.plural.split("_"))


def parents(package: Path) -> dict[str, Parent]:
    """The objects a resource can be scaffolded under: the org, and each top-level resource
    scaffolded before (its object type declared in `api/deps.py`, its table in `models.py`)."""
    found = {ORG_PARENT.name: ORG_PARENT}
    models = (package / "models.py").read_text()
    for constant, name in _OBJECT_TYPE.findall((package / "api" / "deps.py").read_text()):
        cls = "".join(part.capitalize() for part in name.split("_"))
        table = re.search(rf'^class {cls}\(Base\):\n(?:.*\n)*?    __tablename__ = "(\w+)"$', models, re.MULTILINE)
        if constant == name.upper() and table and (package / "api" / f"{table.group(1)}.py").is_file():
            found[name] = Parent(name, constant, table.group(1))
    return found


def parent_of(resource: Resource, package: Path) -> Parent | None:
    """The parent named by `--under`, or ScaffoldRefused when it has no grants of its own."""
    if resource.parent is None:
        return None
    known = parents(package)
    parent = known.get(resource.parent)
    if parent is None:
        raise ScaffoldRefused(
            f"--under {resource.parent}: not an object with grants of its own; a resource is scaffolded under "
            f"one of {', '.join(sorted(known))} (the org, or a top-level resource scaffolded before). A resource "
            "scaffolded under another has no grants of its own: put yours under that one's parent, or write "
            'its policy by hand (README "Your own resource, by hand")'
        )
    return parent


def check_name(resource: Resource, package: Path) -> None:
    for name in (resource.name, resource.plural):
        if not NAME_PATTERN.fullmatch(name) or keyword.iskeyword(name):
            raise ScaffoldRefused(f"{name!r}: use a lowercase identifier of 2-31 letters, digits and underscores")
    parent_of(resource, package)
    if resource.name == resource.plural:
        raise ScaffoldRefused("the plural must differ from the name (--plural)")
    routes = package / "api" / f"{resource.plural}.py"
    if routes.exists():
        raise ScaffoldRefused(f"{routes} exists already")
    models = (package / "models.py").read_text()
    if re.search(rf"^class {resource.cls}\b", models, re.MULTILINE) or f'"{resource.plural}"' in models:
        raise ScaffoldRefused(f"models.py has a {resource.cls} or a {resource.plural} table already")


def migration_heads(package: Path) -> list[str]:
    """The newest revisions of `migrations/versions/` (the core's and the service's own). Usually
    one; two after a template update brought a core revision beside the service's own (both come
    after the core revision the service's migrations started from): the new migration merges them."""
    config = alembic_config()
    config.set_main_option("version_locations", str(package / "migrations" / "versions"))
    heads = sorted(ScriptDirectory.from_config(config).get_heads())
    if not heads:
        raise ScaffoldRefused("migrations/versions/ has no revision")
    return heads


def next_revision(heads: list[str], versions: Path) -> str:
    """A revision id after every head, in the folder's numbering (0002 -> 0003), unused."""
    numbers = [int(head) for head in heads if head.isdigit()]
    number = max(numbers) + 1 if numbers else 100
    while list(versions.glob(f"{number:04d}_*.py")):
        number += 1
    return f"{number:04d}"


def scaffold(resource: Resource, *, package: Path = PACKAGE_DIR, project: Path | None = None) -> list[Path]:
    """Write the resource's files; the paths written or extended."""
    project = project or package.parent.parent
    if not (project / "pyproject.toml").is_file() or not (project / "tests").is_dir():
        raise ScaffoldRefused(f"{project} is not the service's source checkout (scaffold runs in one, not in an image)")
    check_name(resource, package)
    versions = package / "migrations" / "versions"
    heads = migration_heads(package)
    revision = next_revision(heads, versions)
    values = _values(resource, parent_of(resource, package), heads, revision, package.name)
    migration = versions / f"{revision}_{resource.plural}.py"
    test = project / "tests" / f"test_{resource.plural}.py"
    for path in (migration, test):
        if path.exists():
            raise ScaffoldRefused(f"{path} exists already")
    kind = "child" if resource.parent else "top"
    deps = package / "api" / "deps.py"
    policies = deps.read_text()
    if resource.step_up:
        policies = _with_step_up_import(policies, deps)
    writes = {package / "models.py": _fill(MODEL[kind], values)}
    api = package / "api" / "__init__.py"
    registry = api.read_text()
    imports = re.search(r"^from \. import (.+)$", registry, re.MULTILINE)
    if imports is None:
        raise ScaffoldRefused(f"{api}: no `from . import ...` line to add the router to")
    modules = sorted({*imports.group(1).split(", "), resource.plural})
    registry = registry.replace(imports.group(0), f"from . import {', '.join(modules)}")
    registry += f"router.include_router({resource.plural}.router)\n"
    for path, addition in writes.items():
        path.write_text(path.read_text().rstrip("\n") + "\n" + addition)
    deps.write_text(policies.rstrip("\n") + "\n" + _fill(POLICIES[kind], values))
    api.write_text(registry)
    (package / "api" / f"{resource.plural}.py").write_text(_fill(ROUTES[kind], values))
    migration.write_text(_fill(MIGRATION[kind], values))
    test.write_text(_fill(TEST[kind] + (STEP_UP_TEST[kind] if resource.step_up else ""), values))
    written = [
        package / "models.py",
        package / "api" / "deps.py",
        api,
        package / "api" / f"{resource.plural}.py",
        migration,
        test,
    ]
    for option in extensions.parts("scaffold"):  # authz_engine=cerbos: the resource's policy and its test
        written += option.scaffold(kind, values, project)
    return written


def tidy(paths: list[Path]) -> bool:
    """ruff's format and safe fixes on what was written, when ruff is installed (the dev extra)."""
    import subprocess
    import sys

    files = [str(path) for path in paths if path.suffix == ".py"]
    for command in (["format", "--quiet"], ["check", "--fix", "--quiet"]):
        result = subprocess.run([sys.executable, "-m", "ruff", *command, *files], check=False)  # noqa: S603
        if result.returncode != 0:
            return False
    return True


_AUTHZ_IMPORT = re.compile(r"^from \.\.security\.authz import (\([^)]*\)|.+)$", re.MULTILINE)


def _with_step_up_import(policies: str, deps: Path) -> str:
    """`api/deps.py` with CONFIGURED_STEP_UP imported (the step-up the scaffolded writes declare)."""
    found = _AUTHZ_IMPORT.search(policies)
    if found is None:
        raise ScaffoldRefused(f"{deps}: no `from ..security.authz import ...` line to add CONFIGURED_STEP_UP to")
    listed = (name.strip() for name in found.group(1).strip("()").split(","))
    names = sorted({*(name for name in listed if name), "CONFIGURED_STEP_UP"})
    line = f"from ..security.authz import {', '.join(names)}"
    if len(line) > 120:  # ruff's line length: one name per line, as ruff format writes it
        line = "from ..security.authz import (\n" + "".join(f"    {name},\n" for name in names) + ")"
    return policies.replace(found.group(0), line)


def _values(resource: Resource, parent: Parent | None, heads: list[str], revision: str, package: str) -> dict[str, str]:
    step_up_imports = f"import time\nfrom collections.abc import Callable\n\nfrom {package}.app import create_app\n"
    step_up_imports += f"from {package}.config import Settings\n\nfrom .conftest import running\n"
    values = {
        "name": resource.name,
        "plural": resource.plural,
        "cls": resource.cls,
        "label": resource.label,
        "type": resource.name.upper(),
        "down": f'"{heads[0]}"' if len(heads) == 1 else "(" + ", ".join(f'"{head}"' for head in heads) + ")",
        "revision": revision,
        "step_up": ", step_up=CONFIGURED_STEP_UP" if resource.step_up else "",
        "test_imports": step_up_imports if resource.step_up else "",
    }
    if parent is not None:
        values |= {
            "parent": parent.name,
            "parent_type": parent.object_type,
            "param": parent.param,
            "parent_table": parent.table,
            "parents": f"/{parent.table}",
        }
    return values


def _fill(template: str, values: dict[str, str]) -> str:
    return Template(template).substitute(values)


# --- What is written (string.Template: $name) ------------------------------------------------

MODEL = {
    "child": '''

class $cls(Base):
    """A $name of an $parent (scaffolded)."""

    __tablename__ = "$plural"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    $param: Mapped[uuid.UUID] = mapped_column(ForeignKey("$parent_table.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(100))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now(), default=utc_now)
''',
    "top": '''

class $cls(Base):
    """A $name (scaffolded): an object type of its own, whose creator becomes its owner."""

    __tablename__ = "$plural"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    name: Mapped[str] = mapped_column(String(100))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now(), default=utc_now)
    created_by: Mapped[str] = mapped_column(String(255))
''',
}

POLICIES = {
    "child": """

# $label (scaffolded): the caller's relation to the $parent in the path
# (object type $parent_type).
CanRead$label = Annotated[
    uuid.UUID, require_relation($parent_type, Relation.viewer, param="$param", scopes=["$plural:read"])
]
CanWrite$label = Annotated[
    uuid.UUID, require_relation($parent_type, Relation.editor, param="$param", scopes=["$plural:write"]$step_up)
]
""",
    "top": """

# $label (scaffolded): an object type of its own in the permissions table.
$type = "$name"
CanCreate$label = Annotated[Principal, no_object_policy(scopes=["$plural:write"]$step_up)]
CanRead$cls = Annotated[
    uuid.UUID, require_relation($type, Relation.viewer, param="${name}_id", scopes=["$plural:read"])
]
CanDelete$cls = Annotated[
    uuid.UUID, require_relation($type, Relation.owner, param="${name}_id", scopes=["$plural:write"]$step_up)
]
""",
}

ROUTES = {
    "child": '''"""The ${plural} of an $parent (scaffolded): create, read, delete."""

from __future__ import annotations

import uuid
from datetime import datetime

from fastapi import APIRouter, HTTPException, status

from ..db import SessionDep
from ..models import $cls
from ..security.validation import Strict
from .deps import CanRead$label, CanWrite$label, as_utc
from .schemas import Name

router = APIRouter(prefix="$parents/{$param}/$plural", tags=["$plural"])


class ${cls}In(Strict):
    name: Name


class ${cls}Out(Strict):
    id: uuid.UUID
    $param: uuid.UUID
    name: str
    created_at: datetime


def _out(row: $cls) -> ${cls}Out:
    return ${cls}Out(id=row.id, $param=row.$param, name=row.name, created_at=as_utc(row.created_at))


async def _in_parent(session: SessionDep, $param: uuid.UUID, ${name}_id: uuid.UUID) -> $cls:
    """The $name, when it belongs to the $parent in the path; 404 otherwise:
    another ${parent}'s $name is not found
    through this one."""
    row = await session.get($cls, ${name}_id)
    if row is None or row.$param != $param:
        raise HTTPException(404)
    return row


@router.post("", status_code=status.HTTP_201_CREATED)
async def create_$name($param: CanWrite$label, body: ${cls}In, session: SessionDep) -> ${cls}Out:
    row = $cls($param=$param, name=body.name)
    session.add(row)
    await session.commit()
    return _out(row)


@router.get("/{${name}_id}")
async def get_$name($param: CanRead$label, ${name}_id: uuid.UUID, session: SessionDep) -> ${cls}Out:
    return _out(await _in_parent(session, $param, ${name}_id))


@router.delete("/{${name}_id}", status_code=status.HTTP_204_NO_CONTENT)
async def delete_$name($param: CanWrite$label, ${name}_id: uuid.UUID, session: SessionDep) -> None:
    await session.delete(await _in_parent(session, $param, ${name}_id))
    await session.commit()
''',
    "top": '''"""$label (scaffolded): create (the caller becomes the owner), read, delete."""

from __future__ import annotations

import uuid
from datetime import datetime

from fastapi import APIRouter, HTTPException, status
from sqlalchemy import delete

from ..db import SessionDep
from ..models import $cls
from ..security.validation import Strict
from ..tables import Permission, Relation
from .deps import $type, CanCreate$label, CanDelete$cls, CanRead$cls, as_utc
from .schemas import Name

router = APIRouter(prefix="/$plural", tags=["$plural"])


class ${cls}In(Strict):
    name: Name


class ${cls}Out(Strict):
    id: uuid.UUID
    name: str
    created_at: datetime


def _out(row: $cls) -> ${cls}Out:
    return ${cls}Out(id=row.id, name=row.name, created_at=as_utc(row.created_at))


@router.post("", status_code=status.HTTP_201_CREATED)
async def create_$name(principal: CanCreate$label, body: ${cls}In, session: SessionDep) -> ${cls}Out:
    row = $cls(name=body.name, created_by=principal.subject)
    session.add(row)
    await session.flush()
    session.add(
        Permission(
            subject=principal.subject,
            resource_type=$type,
            resource_id=str(row.id),
            relation=Relation.owner,
            created_by=principal.subject,
        )
    )
    await session.commit()
    return _out(row)


@router.get("/{${name}_id}")
async def get_$name(${name}_id: CanRead$cls, session: SessionDep) -> ${cls}Out:
    row = await session.get($cls, ${name}_id)
    if row is None:  # a grant that outlived its $name
        raise HTTPException(404)
    return _out(row)


@router.delete("/{${name}_id}", status_code=status.HTTP_204_NO_CONTENT)
async def delete_$name(${name}_id: CanDelete$cls, session: SessionDep) -> None:
    row = await session.get($cls, ${name}_id)
    if row is None:
        raise HTTPException(404)
    await session.delete(row)
    # Its grants go with it: a later object cannot inherit them.
    grants = delete(Permission).where(Permission.resource_type == $type, Permission.resource_id == str(${name}_id))
    await session.execute(grants)
    await session.commit()
''',
}

_COLUMNS = """        sa.Column("id", sa.Uuid(), nullable=False),
"""
MIGRATION = {
    "child": '''"""$plural: the ${plural} of an $parent (scaffolded)."""

import sqlalchemy as sa
from alembic import op

revision: str = "$revision"
down_revision: str | tuple[str, ...] | None = $down
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.create_table(
        "$plural",
'''
    + _COLUMNS
    + """        sa.Column("$param", sa.Uuid(), nullable=False),
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.ForeignKeyConstraint(
            ["$param"], ["$parent_table.id"], name=op.f("fk_${plural}_${param}_$parent_table"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_$plural")),
    )
    op.create_index(op.f("ix_${plural}_$param"), "$plural", ["$param"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_${plural}_$param"), table_name="$plural")
    op.drop_table("$plural")
""",
    "top": '''"""$plural: an object type of the service's own (scaffolded)."""

import sqlalchemy as sa
from alembic import op

revision: str = "$revision"
down_revision: str | tuple[str, ...] | None = $down
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.create_table(
        "$plural",
'''
    + _COLUMNS
    + """        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.Column("created_by", sa.String(length=255), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_$plural")),
    )


def downgrade() -> None:
    op.drop_table("$plural")
""",
}

TEST = {
    "child": '''"""The $plural of an $parent (scaffolded): reached through their $parent only (no BOLA)."""

from __future__ import annotations

import httpx
$test_imports
from .conftest import TokenFactory, bearer

SCOPES = "$parent_table:read $parent_table:write $plural:read $plural:write"
PARENTS = "/api/v1$parents"


async def test_a_${name}_is_reached_through_its_${parent}_only(
    client: httpx.AsyncClient, make_token: TokenFactory
) -> None:
    alice, mallory = bearer(make_token("alice", SCOPES)), bearer(make_token("mallory", SCOPES))
    parent = (await client.post(PARENTS, json={"name": "Acme"}, headers=alice)).json()["id"]
    other = (await client.post(PARENTS, json={"name": "Other"}, headers=mallory)).json()["id"]
    created = await client.post(f"{PARENTS}/{parent}/$plural", json={"name": "First"}, headers=alice)
    assert created.status_code == 201, created.text
    ${name}_id = created.json()["id"]
    path = f"{PARENTS}/{parent}/$plural/{${name}_id}"
    assert (await client.get(path, headers=alice)).json()["name"] == "First"
    # Another caller: refused, and nothing written.
    assert (await client.get(path, headers=mallory)).status_code == 403
    assert (await client.delete(path, headers=mallory)).status_code == 403
    written = await client.post(f"{PARENTS}/{parent}/$plural", json={"name": "x"}, headers=mallory)
    assert written.status_code == 403
    # Through an $parent the caller does hold, another ${parent}'s $name is not found.
    assert (await client.get(f"{PARENTS}/{other}/$plural/{${name}_id}", headers=mallory)).status_code == 404
    assert (await client.delete(path, headers=alice)).status_code == 204
    assert (await client.get(path, headers=alice)).status_code == 404
''',
    "top": '''"""$label (scaffolded): reached by their owner only (no BOLA)."""

from __future__ import annotations

import httpx
$test_imports
from .conftest import TokenFactory, bearer

SCOPES = "$plural:read $plural:write"


async def test_a_${name}_is_reached_by_its_owner_only(client: httpx.AsyncClient, make_token: TokenFactory) -> None:
    alice, mallory = bearer(make_token("alice", SCOPES)), bearer(make_token("mallory", SCOPES))
    created = await client.post("/api/v1/$plural", json={"name": "First"}, headers=alice)
    assert created.status_code == 201, created.text
    path = f"/api/v1/$plural/{created.json()['id']}"
    assert (await client.get(path, headers=alice)).json()["name"] == "First"
    assert (await client.get(path, headers=mallory)).status_code == 403
    assert (await client.delete(path, headers=mallory)).status_code == 403
    assert (await client.delete(path, headers=alice)).status_code == 204
    # Its grants went with it: its owner is refused like anyone else.
    assert (await client.get(path, headers=alice)).status_code == 403
''',
}

STEP_UP_TEST = {
    "child": '''

async def test_writing_${plural}_needs_a_recent_authentication(
    settings_for: Callable[..., Settings], make_token: TokenFactory
) -> None:
    """--step-up: with STEP_UP_MAX_AGE_SECONDS set, a write with a stale authentication is a 401."""
    async with running(create_app(settings_for(step_up_max_age_seconds=300))) as client:
        stale = bearer(make_token("alice", SCOPES, auth_time=int(time.time()) - 3600))
        fresh = bearer(make_token("alice", SCOPES, auth_time=int(time.time())))
        parent = (await client.post(PARENTS, json={"name": "Acme"}, headers=fresh)).json()["id"]
        refused = await client.post(f"{PARENTS}/{parent}/$plural", json={"name": "First"}, headers=stale)
        assert refused.status_code == 401, refused.text
        assert refused.headers["www-authenticate"].startswith('Bearer error="insufficient_user_authentication"')
        created = await client.post(f"{PARENTS}/{parent}/$plural", json={"name": "First"}, headers=fresh)
        assert created.status_code == 201, created.text
        path = f"{PARENTS}/{parent}/$plural/{created.json()['id']}"
        assert (await client.get(path, headers=stale)).status_code == 200  # reading needs no step-up
        assert (await client.delete(path, headers=stale)).status_code == 401
        assert (await client.delete(path, headers=fresh)).status_code == 204
''',
    "top": '''

async def test_writing_${plural}_needs_a_recent_authentication(
    settings_for: Callable[..., Settings], make_token: TokenFactory
) -> None:
    """--step-up: with STEP_UP_MAX_AGE_SECONDS set, a write with a stale authentication is a 401."""
    async with running(create_app(settings_for(step_up_max_age_seconds=300))) as client:
        stale = bearer(make_token("alice", SCOPES, auth_time=int(time.time()) - 3600))
        fresh = bearer(make_token("alice", SCOPES, auth_time=int(time.time())))
        refused = await client.post("/api/v1/$plural", json={"name": "First"}, headers=stale)
        assert refused.status_code == 401, refused.text
        assert refused.headers["www-authenticate"].startswith('Bearer error="insufficient_user_authentication"')
        created = await client.post("/api/v1/$plural", json={"name": "First"}, headers=fresh)
        assert created.status_code == 201, created.text
        path = f"/api/v1/$plural/{created.json()['id']}"
        assert (await client.get(path, headers=stale)).status_code == 200  # reading needs no step-up
        assert (await client.delete(path, headers=stale)).status_code == 401
        assert (await client.delete(path, headers=fresh)).status_code == 204
''',
}
