"""The template update path, end to end: a service baked from an older commit of this template,
changed by its owner, then updated to the newest commit with `cruft update`.

The template's history is made here, in a temporary git repository (no network): commit OLD is
this working tree with a few changes undone (a security setting of the reverse proxy, a
Kubernetes manifest the template later added, lines in template-owned files), commit NEW is the
working tree as it is. The service owner's change is a resource of its own (table, migration, policies, routes, router,
test) made by the README's steps, a setting, a dependency and a documentation section of its own,
all in owner files; the template's change touches a security module (`security/transport.py`),
the settings module, the dependencies, deploy files and the README. No conflict is allowed.
The update must apply without a conflict or a rejected hunk, bring every template change, keep
the owner's change, and leave a service whose tests pass: the owner's and those that see the owner's
change (UPDATE_SUITE; the rest of the suite runs on the same template tree in the default variant;
its lint and type check: test_releases, on the same tree).
"""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
from collections.abc import Callable
from pathlib import Path

import pytest
from bake import GIT_ENV, UV, copy_working_tree, git, make_target, report, run

SLUG, PACKAGE = "secure-api", "secure_api"
TEMPLATE_PROJECT = "{{cookiecutter.project_slug}}"
TEMPLATE_PACKAGE = f"{TEMPLATE_PROJECT}/src/{{{{cookiecutter.package_name}}}}"
OLD_HEADER_TIMEOUT = "client_header_timeout 60s;"
OLD_TEMPLATE_LINE = "# (an older revision of the template)\n"
OLD_DEPENDENCY = '    "python-json-logger>=2.0",\n'
# The service owner's week (README "Layout", "Your own resource"): a `projects` resource under an
# org, in owner files only: its table, migration, policies, routes, router and test.
OWNER_MODEL = '''

class Project(Base):
    """A project of an org: the owner's own resource."""

    __tablename__ = "projects"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    org_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("orgs.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(100))
'''
OWNER_MIGRATION = '''"""projects: the owner's own table."""

import sqlalchemy as sa
from alembic import op

revision: str = "0100"
down_revision: str | None = "0002"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.create_table(
        "projects",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("org_id", sa.Uuid(), nullable=False),
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.ForeignKeyConstraint(["org_id"], ["orgs.id"], name=op.f("fk_projects_org_id_orgs"), ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_projects")),
    )
    op.create_index(op.f("ix_projects_org_id"), "projects", ["org_id"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_projects_org_id"), table_name="projects")
    op.drop_table("projects")
'''
OWNER_POLICIES = '''

CanReadProjects = Annotated[uuid.UUID, org_relation(Relation.viewer, scopes=["orgs:read"])]
CanWriteProjects = Annotated[uuid.UUID, org_relation(Relation.editor, scopes=["orgs:write"])]
'''
OWNER_ROUTES = '''"""The projects of an org: the service's own resource, added after baking."""

from __future__ import annotations

import uuid

from fastapi import APIRouter, HTTPException, status

from ..db import SessionDep
from ..models import Project
from ..security.validation import Strict
from .deps import CanReadProjects, CanWriteProjects
from .schemas import Name

router = APIRouter(prefix="/orgs/{org_id}/projects", tags=["projects"])


class ProjectIn(Strict):
    name: Name


class ProjectOut(Strict):
    id: uuid.UUID
    org_id: uuid.UUID
    name: str


@router.post("", status_code=status.HTTP_201_CREATED)
async def create_project(org_id: CanWriteProjects, body: ProjectIn, session: SessionDep) -> ProjectOut:
    project = Project(org_id=org_id, name=body.name)
    session.add(project)
    await session.commit()
    return ProjectOut(id=project.id, org_id=org_id, name=project.name)


@router.get("/{project_id}")
async def get_project(org_id: CanReadProjects, project_id: uuid.UUID, session: SessionDep) -> ProjectOut:
    project = await session.get(Project, project_id)
    if project is None or project.org_id != org_id:
        raise HTTPException(404)
    return ProjectOut(id=project.id, org_id=org_id, name=project.name)
'''
OWNER_TEST = '''"""The projects resource: created by an org's editor, read by its viewers, refused to others."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx

from .conftest import TokenFactory, bearer


async def test_an_orgs_viewer_reads_its_project_and_a_stranger_is_refused(
    client: httpx.AsyncClient, make_token: TokenFactory
) -> None:
    alice, mallory = bearer(make_token("alice")), bearer(make_token("mallory"))
    org = (await client.post("/api/v1/orgs", json={"name": "Acme"}, headers=alice)).json()["id"]
    created = await client.post(f"/api/v1/orgs/{org}/projects", json={"name": "Apollo"}, headers=alice)
    assert created.status_code == 201, created.text
    project = created.json()["id"]
    read = await client.get(f"/api/v1/orgs/{org}/projects/{project}", headers=alice)
    assert read.status_code == 200 and read.json()["name"] == "Apollo"
    assert (await client.get(f"/api/v1/orgs/{org}/projects/{project}", headers=mallory)).status_code == 403
    refused = await client.post(f"/api/v1/orgs/{org}/projects", json={"name": "Mine"}, headers=mallory)
    assert refused.status_code == 403


def test_the_services_own_setting_is_read_with_the_templates(settings_for: Callable[..., Any]) -> None:
    assert settings_for().projects_per_org == 100
    assert settings_for(projects_per_org=7).projects_per_org == 7
'''
OWNER_SETTING = """
    projects_per_org: int = Field(100, ge=1, le=10_000)  # PROJECTS_PER_ORG
"""
OWNER_DEPENDENCY = "python-slugify>=8\n"
OWNER_DOCS = """
## Projects

Each org has projects (`/api/v1/orgs/{org_id}/projects`); `PROJECTS_PER_ORG` caps them.
"""
# The owner files the owner changes (package-relative, then project-relative).
OWNER_FILES = (
    "models.py",
    "settings.py",
    "api/deps.py",
    "api/projects.py",
    "api/__init__.py",
    "migrations/versions/0100_projects.py",
)
OWNER_PROJECT_FILES = ("tests/test_projects.py", "requirements/service.in", "SERVICE.md")


def edit(path: Path, old: str, new: str) -> None:
    """Replace text that must be there: a changed anchor fails loudly, not silently."""
    text = path.read_text()
    assert old in text, f"{path}: {old!r} not found; update the fixture in {__file__}"
    path.write_text(text.replace(old, new, 1))


def undo_template_changes(template: Path) -> None:
    """Turn the working tree into the older template that OLD stands for."""
    edit(template / TEMPLATE_PROJECT / "deploy/nginx/nginx.conf", "client_header_timeout 10s;", OLD_HEADER_TIMEOUT)
    edit(template / TEMPLATE_PROJECT / "deploy/kubernetes/kustomization.yaml", "  - networkpolicy.yaml\n", "")
    (template / TEMPLATE_PROJECT / "deploy/kubernetes/networkpolicy.yaml").unlink()
    for owned in ("security/transport.py", "config.py"):
        path = template / TEMPLATE_PACKAGE / owned
        path.write_text(path.read_text() + OLD_TEMPLATE_LINE)
    readme = template / TEMPLATE_PROJECT / "README.md"
    readme.write_text(readme.read_text() + "\n" + OLD_TEMPLATE_LINE)
    # A dependency the older template had and the newer one dropped (as python-json-logger was).
    edit(template / TEMPLATE_PROJECT / "pyproject.toml", '    "httpx>=0.27",\n', '    "httpx>=0.27",\n' + OLD_DEPENDENCY)


def make_template_history(template: Path) -> tuple[str, str]:
    """Commit OLD, then NEW on top of it, on `main`, each tagged as a release."""
    copy_working_tree(template)
    undo_template_changes(template)
    git("init", "-q", "-b", "main", cwd=template)
    git("add", "-A", cwd=template)
    git("commit", "-q", "-m", "fixture: an older template", cwd=template)
    git("tag", "-a", "-m", "an older release", "v1.0.0", cwd=template)
    old = git("rev-parse", "HEAD", cwd=template).strip()
    copy_working_tree(template)
    git("add", "-A", cwd=template)
    git("commit", "-q", "-m", "the template, as it is", cwd=template)
    # make update-template takes the latest release (tests/test_releases.py crosses the real ones).
    git("tag", "-a", "-m", "the release under test", "v1.1.0", cwd=template)
    return old, git("rev-parse", "HEAD", cwd=template).strip()


def change_the_service(project: Path) -> None:
    """What a service owner does: a resource of their own, by the README's steps, in owner files."""
    package = project / "src" / PACKAGE
    models = package / "models.py"
    models.write_text(models.read_text() + OWNER_MODEL)
    (package / "migrations" / "versions" / "0100_projects.py").write_text(OWNER_MIGRATION)
    deps = package / "api" / "deps.py"
    deps.write_text(deps.read_text() + OWNER_POLICIES)
    (package / "api" / "projects.py").write_text(OWNER_ROUTES)
    api = package / "api" / "__init__.py"
    edit(api, "from . import orgs, users", "from . import orgs, projects, users")
    api.write_text(api.read_text() + "router.include_router(projects.router)\n")
    (project / "tests" / "test_projects.py").write_text(OWNER_TEST)
    settings = package / "settings.py"
    edit(settings, "from .config import Settings\n", "from pydantic import Field\n\nfrom .config import Settings\n")
    settings.write_text(settings.read_text() + OWNER_SETTING)
    dependencies = project / "requirements" / "service.in"
    dependencies.write_text(dependencies.read_text() + OWNER_DEPENDENCY)
    docs = project / "SERVICE.md"
    docs.write_text(docs.read_text() + OWNER_DOCS)


def overlay_python(tmp_path: Path, project: Path) -> Path:
    """A venv that sees this venv's packages and has `project` installed editable on top, so the
    updated service is tested without touching the install other template tests share."""
    overlay = tmp_path / "venv"
    result = run([sys.executable, "-m", "venv", "--without-pip", str(overlay)], cwd=tmp_path)
    assert result.returncode == 0, report(result)
    python = overlay / "bin" / "python"
    purelib = run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], cwd=tmp_path)
    # A plain path line: this venv's packages, but not the editable installs its .pth files make.
    (Path(purelib.stdout.strip()) / "template-venv.pth").write_text(sysconfig.get_path("purelib") + "\n")
    command = [UV, "pip", "install", "--quiet", "--python", str(python), "--no-build-isolation"]
    result = run([*command, "--editable", str(project), "--group", "dev"], cwd=project)
    assert result.returncode == 0, report(result)
    return python


@pytest.fixture(scope="module")
def updated(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, str, subprocess.CompletedProcess[str]]:
    root = tmp_path_factory.mktemp("update")
    template = root / "template"
    old, new = make_template_history(template)
    out = root / "out"
    out.mkdir()
    create = run(
        [sys.executable, "-m", "cruft", "create", "--no-input", "--checkout", old, "--output-dir", str(out), str(template)],
        cwd=root,
        timeout=120,
    )
    assert create.returncode == 0, report(create)
    project = out / SLUG
    assert json.loads((project / ".cruft.json").read_text())["commit"] == old
    git("init", "-q", "-b", "main", cwd=project)
    git("add", "-A", cwd=project)
    git("commit", "-q", "-m", "baked from the template", cwd=project)
    change_the_service(project)
    git("add", "-A", cwd=project)
    git("commit", "-q", "-m", "our projects resource", cwd=project)
    update = make_target("update-template", project)
    return project, old, new, update


def test_cruft_create_and_update_apply_cleanly(updated: tuple[Path, str, str, subprocess.CompletedProcess[str]]) -> None:
    project, _old, new, update = updated
    assert update.returncode == 0, report(update)
    assert json.loads((project / ".cruft.json").read_text())["commit"] == new
    rejected = [str(path.relative_to(project)) for path in project.rglob("*.rej")]
    assert not rejected, f"hunks rejected: {rejected}\n{report(update)}"
    conflicted = git("diff", "--name-only", "--diff-filter=U", cwd=project).split()
    markers = git("grep", "-l", "-E", "^(<<<<<<<|>>>>>>>) ", cwd=project) if _has_markers(project) else ""
    assert not conflicted and not markers, f"conflicts: {conflicted} {markers}"


def _has_markers(project: Path) -> bool:
    return (
        subprocess.run(
            ["git", "grep", "-q", "-E", "^(<<<<<<<|>>>>>>>) "], cwd=project, env=GIT_ENV, check=False
        ).returncode
        == 0
    )


def test_the_update_brings_every_template_change(updated: tuple[Path, str, str, subprocess.CompletedProcess[str]]) -> None:
    project, *_ = updated
    nginx = (project / "deploy/nginx/nginx.conf").read_text()
    assert "client_header_timeout 10s;" in nginx and OLD_HEADER_TIMEOUT not in nginx
    assert (project / "deploy/kubernetes/networkpolicy.yaml").is_file()
    assert "networkpolicy.yaml" in (project / "deploy/kubernetes/kustomization.yaml").read_text()
    for path in (f"src/{PACKAGE}/security/transport.py", f"src/{PACKAGE}/config.py", "README.md"):
        assert OLD_TEMPLATE_LINE not in (project / path).read_text(), path
    # Exactly the files the template changed, and none the owner alone touched.
    changed = set(git("diff", "--name-only", "HEAD", cwd=project).split())
    changed |= set(git("ls-files", "--others", "--exclude-standard", cwd=project).split())
    assert changed == {
        ".cruft.json",
        "README.md",
        "deploy/kubernetes/kustomization.yaml",
        "deploy/kubernetes/networkpolicy.yaml",
        "deploy/nginx/nginx.conf",
        "pyproject.toml",
        f"src/{PACKAGE}/config.py",
        f"src/{PACKAGE}/security/transport.py",
    }


def test_the_owners_resource_survives_the_update(updated: tuple[Path, str, str, subprocess.CompletedProcess[str]]) -> None:
    project, *_ = updated
    package = project / "src" / PACKAGE
    assert (package / "api" / "projects.py").read_text() == OWNER_ROUTES
    assert (package / "migrations" / "versions" / "0100_projects.py").read_text() == OWNER_MIGRATION
    assert (project / "tests" / "test_projects.py").read_text() == OWNER_TEST
    assert (package / "models.py").read_text().endswith(OWNER_MODEL)
    assert (package / "api" / "deps.py").read_text().endswith(OWNER_POLICIES)
    assert "router.include_router(projects.router)" in (package / "api" / "__init__.py").read_text()
    # The owner touched no template file: the update's commit range and theirs do not meet.
    owned = set(git("diff", "--name-only", "HEAD~1", "HEAD", cwd=project).split())
    assert owned == {f"src/{PACKAGE}/{path}" for path in OWNER_FILES} | set(OWNER_PROJECT_FILES)
    assert (package / "settings.py").read_text().endswith(OWNER_SETTING)
    assert (project / "requirements" / "service.in").read_text().endswith(OWNER_DEPENDENCY)
    assert (project / "SERVICE.md").read_text().endswith(OWNER_DOCS)
    assert OLD_DEPENDENCY not in (project / "pyproject.toml").read_text()


# What of the generated suite runs on the updated service. The update changes exactly the files
# `test_the_update_brings_every_template_change` names, to the working tree's content: the
# template's part of the updated service is the default bake, whose whole suite
# tests/test_baked_service.py runs on this same tree. What only this service has is the owner's
# week, so the run is the owner's test and every module that walks the whole service (its routes'
# policies, migrations and heads, settings, options, health, the scaffold on top of the owner's
# resource, the logged events, the docs and ASVS pages) or serves the example beside the owner's
# routes, plus the modules of the template files the update changed (transport, settings).
UPDATE_SUITE = (
    "tests/test_projects.py",
    "tests/test_route_policy.py",
    "tests/test_migrations.py",
    "tests/test_settings.py",
    "tests/test_options.py",
    "tests/test_health.py",
    "tests/test_scaffold.py",
    "tests/test_event_inventory.py",
    "tests/test_asvs.py",
    "tests/test_docs.py",
    "tests/test_orgs_api.py",
    "tests/test_authz.py",
    "tests/test_transport.py",
)
CHECKS: dict[str, Callable[[Path], list[str]]] = {
    "ruff-check": lambda python: [str(python), "-m", "ruff", "check", "."],
    "ruff-format": lambda python: [str(python), "-m", "ruff", "format", "--check", "."],
    "mypy": lambda python: [str(python), "-m", "mypy"],
    "import-contracts": lambda python: [
        str(python),
        "-c",
        "from importlinter.cli import lint_imports_command; lint_imports_command()",
    ],
    "pytest": lambda python: [str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", *UPDATE_SUITE],
}


def test_the_updated_service_passes_its_tests(
    updated: tuple[Path, str, str, subprocess.CompletedProcess[str]], tmp_path: Path
) -> None:
    """The owner's test and the generated modules that see the owner's week (UPDATE_SUITE). Ruff,
    mypy and the import contracts run on the same tree (this working tree plus the same owner's
    week) in tests/test_releases.py, which reaches it from the previous real release; they are not
    run twice."""
    project, *_ = updated
    missing = [module for module in UPDATE_SUITE if not (project / module).is_file()]
    assert not missing, f"named in UPDATE_SUITE but not in the service: {missing}; update {__file__}"
    python = overlay_python(tmp_path, project)
    failures = []
    for name, command in {"pytest": CHECKS["pytest"]}.items():
        result = run(command(python), cwd=project)
        if result.returncode != 0:
            failures.append(f"{name}: {report(result)}")
    assert not failures, "\n\n".join(failures)
