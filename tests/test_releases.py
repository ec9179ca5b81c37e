"""The template's releases, across its real history.

A clone of this repository (the whole history, no tags: tags do not always travel) gets its release
tags back from one command, `make tags`; the working tree is committed on top of it as a release of
its own (`scripts/release.py prepare`, what the release commit does). A service baked with
`cruft create` from the release before it, changed for a week by its owner as test_update's owner
does (a resource of its own, a setting in settings.py, a dependency in requirements/service.in, a
SERVICE.md section, all owner files), then takes the working tree's release with its own
`make update-template`. No conflict in owner files; the pull request's text carries the CHANGELOG
entries since the service's release; the owner's code passes lint and its own tests (the generated
suite runs in test_update and test_bake, not here again); and an owner's edit to a line the
template changed between the two releases is a true conflict that fails loudly.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from bake import GIT_ENV, TEMPLATE_DIR, copy_working_tree, git, make_target, report, run
from test_update import CHECKS, OWNER_DOCS, OWNER_ROUTES, OWNER_SETTING, change_the_service, overlay_python

SLUG, PACKAGE = "secure-api", "secure_api"
# The releases made before VERSION existed, as CHANGELOG.md records them.
RETROACTIVE = {
    "v0.1.0": "5895bc2ec852ed119344da19b833da27c70f46af",  # the last commit before the layout redesign
    "v0.2.0": "6be26cc1ca2463690a5547cc3df157bbe0f7634b",  # the last commit before releases
}
# The owner's files test_update's owner changes; the update must not conflict in any of them.
OWNER_PATHS = (
    f"src/{PACKAGE}/models.py",
    f"src/{PACKAGE}/settings.py",
    f"src/{PACKAGE}/api/deps.py",
    f"src/{PACKAGE}/api/__init__.py",
    f"src/{PACKAGE}/api/projects.py",
    f"src/{PACKAGE}/migrations/versions/0100_projects.py",
    "tests/test_projects.py",
    "requirements/service.in",
    "SERVICE.md",
)
OWNER_EDIT = " (the owner's edit)"



def upgrading_text() -> str:
    """The Upgrading section of the release this working tree makes (CHANGELOG.md's [Unreleased])."""
    changelog = (TEMPLATE_DIR / "CHANGELOG.md").read_text()
    unreleased = changelog.split("## [Unreleased]", 1)[1].split("\n## [", 1)[0]
    return unreleased.split("### Upgrading", 1)[1].split("\n### ", 1)[0] if "### Upgrading" in unreleased else ""


def tags(repository: Path) -> dict[str, str]:
    """Each vX.Y.Z tag and the commit it names."""
    return {
        name: git("rev-parse", f"refs/tags/{name}^{{commit}}", cwd=repository).strip()
        for name in git("tag", "--list", "v*", cwd=repository).split()
    }


def next_minor(version: str) -> str:
    major, minor, _patch = (int(part) for part in version.split("."))
    return f"{major}.{minor + 1}.0"


@pytest.fixture(scope="module")
def history(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, str, str]:
    """A clone of this repository with the working tree committed as release NEW on top, its tags
    made by `make tags`: (clone, the release before NEW, NEW's tag, NEW's commit)."""
    shallow = git("rev-parse", "--is-shallow-repository", cwd=TEMPLATE_DIR).strip()
    assert shallow == "false", "the release tests need this repository's whole history: git fetch --unshallow"
    clone = tmp_path_factory.mktemp("releases") / "template"
    git("clone", "--quiet", "--no-hardlinks", str(TEMPLATE_DIR), str(clone), cwd=clone.parent)
    for name in git("tag", "--list", cwd=clone).split():
        git("tag", "--delete", name, cwd=clone)
    # The working tree as it is (uncommitted changes and deletions included), released.
    for relative in filter(None, git("ls-files", "-z", cwd=clone).split("\0")):
        (clone / relative).unlink(missing_ok=True)
    copy_working_tree(clone)
    version = next_minor((clone / "VERSION").read_text().strip())
    prepared = run([sys.executable, "scripts/release.py", "prepare", version], cwd=clone)
    assert prepared.returncode == 0, report(prepared)
    git("add", "-A", cwd=clone)
    git("commit", "-q", "--allow-empty", "-m", f"fixture: the working tree, released as {version}", cwd=clone)
    made = make_target("tags", clone)
    assert made.returncode == 0, report(made)
    new_commit = git("rev-parse", "HEAD", cwd=clone).strip()
    found = tags(clone)
    releases = sorted((tag for tag in found if tag != f"v{version}"), key=lambda tag: tuple(map(int, tag[1:].split("."))))
    # The service is baked from the latest release, unless the working tree is that release (its
    # release commit, nothing since in what a bake renders): then from the one before, so that the
    # update crosses real changes.
    rendered = ["{{cookiecutter.project_slug}}", "hooks", "cookiecutter.json"]
    same = run(["git", "diff", "--quiet", found[releases[-1]], new_commit, "--", *rendered], cwd=clone)
    earlier = releases[-2] if same.returncode == 0 else releases[-1]
    return clone, earlier, f"v{version}", new_commit


def test_make_tags_recreates_every_release_tag_in_a_clone_without_tags(history: tuple[Path, str, str, str]) -> None:
    clone, _earlier, new, new_commit = history
    found = tags(clone)
    assert {name: found.get(name) for name in RETROACTIVE} == RETROACTIVE
    assert found[new] == new_commit  # the commit that set VERSION
    for name in found:
        assert git("cat-file", "-t", name, cwd=clone).strip() == "tag", f"{name} is not an annotated tag"
        assert f"## [{name[1:]}]" in git("tag", "--list", "--format=%(contents)", name, cwd=clone)
    # Run again: nothing moves, the same tag objects.
    objects = git("show-ref", "--tags", cwd=clone)
    again = make_target("tags", clone)
    assert again.returncode == 0 and "already tagged" in again.stdout, report(again)
    assert git("show-ref", "--tags", cwd=clone) == objects
    # A tag somewhere else is an error, never moved.
    git("tag", "--force", "--annotate", "--message", "elsewhere", "v0.1.0", RETROACTIVE["v0.2.0"], cwd=clone)
    refused = make_target("tags", clone)
    assert refused.returncode != 0 and "v0.1.0 exists at" in refused.stderr, report(refused)
    git("tag", "--delete", "v0.1.0", cwd=clone)
    assert make_target("tags", clone).returncode == 0 and tags(clone)["v0.1.0"] == RETROACTIVE["v0.1.0"]


def test_version_and_changelog_agree() -> None:
    result = run([sys.executable, "scripts/release.py", "check"], cwd=TEMPLATE_DIR)
    assert result.returncode == 0, report(result)


def bake_at(release: str, clone: Path, out: Path) -> Path:
    out.mkdir()
    command = [sys.executable, "-m", "cruft", "create", "--no-input", "--checkout", release, "--output-dir", str(out)]
    created = run([*command, str(clone)], cwd=out, timeout=120)
    assert created.returncode == 0, report(created)
    project = out / SLUG
    git("init", "-q", "-b", "main", cwd=project)
    git("add", "-A", cwd=project)
    git("commit", "-q", "-m", f"baked from the template's {release}", cwd=project)
    return project


@pytest.fixture(scope="module")
def updated(
    history: tuple[Path, str, str, str], tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, subprocess.CompletedProcess[str]]:
    clone, earlier, _new, _new_commit = history
    project = bake_at(earlier, clone, tmp_path_factory.mktemp("owner") / "out")
    change_the_service(project)
    git("add", "-A", cwd=project)
    git("commit", "-q", "-m", "our week: projects, a setting, a dependency, a SERVICE.md section", cwd=project)
    # The owner's own command; from a release before the wrapper existed it would be the command
    # CHANGELOG.md's Upgrading gives instead.
    return project, make_target("update-template", project)


def test_a_service_baked_from_the_previous_release_updates_without_conflict(
    history: tuple[Path, str, str, str], updated: tuple[Path, subprocess.CompletedProcess[str]]
) -> None:
    _clone, _earlier, _new, new_commit = history
    project, update = updated
    assert update.returncode == 0, report(update)
    assert json.loads((project / ".cruft.json").read_text())["commit"] == new_commit, report(update)
    checked = make_target("check-conflicts", project)
    assert checked.returncode == 0, report(checked)
    package = project / "src" / PACKAGE
    assert (package / "api" / "projects.py").read_text() == OWNER_ROUTES
    assert (package / "settings.py").read_text().endswith(OWNER_SETTING)
    assert (project / "SERVICE.md").read_text().endswith(OWNER_DOCS)
    changed = set(git("diff", "--name-only", "HEAD", cwd=project).split())
    # An owner file the release changes on purpose (the example domain lives in the owner's
    # api/deps.py) must be named in its CHANGELOG Upgrading section, so the owner is told.
    upgrading = upgrading_text()
    announced = {path for path in OWNER_PATHS if f"`{path.removeprefix(f'src/{PACKAGE}/')}`" in upgrading}
    unannounced = (changed & set(OWNER_PATHS)) - announced
    assert not unannounced, f"the update changed owner files its CHANGELOG Upgrading does not name: {unannounced}"


def test_the_pull_request_carries_the_changelog_since_the_services_release(
    history: tuple[Path, str, str, str], updated: tuple[Path, subprocess.CompletedProcess[str]], tmp_path: Path
) -> None:
    clone, earlier, new, _new_commit = history
    project, update = updated
    assert update.returncode == 0, report(update)
    notes = run([sys.executable, "scripts/update_template.py", "--notes", str(tmp_path)], cwd=project, env=GIT_ENV)
    assert notes.returncode == 0, report(notes)
    body = (tmp_path / "body.md").read_text()
    assert (tmp_path / "title.txt").read_text().startswith("Template update to ")
    changelog = (clone / "CHANGELOG.md").read_text()
    released = re.findall(r"^## \[(\d+\.\d+\.\d+)\]", changelog, re.MULTILINE)
    newer = released[: released.index(earlier[1:])]
    assert newer and all(f"## [{version}]" in body for version in newer), body
    assert f"## [{earlier[1:]}]" not in body, body
    upgrading = changelog.split(f"## [{new[1:]}]", 1)[1].split("\n## [", 1)[0]
    assert upgrading.strip() in body  # the whole section, its Upgrading part included


def test_the_updated_service_is_current_with_the_latest_release(
    history: tuple[Path, str, str, str], updated: tuple[Path, subprocess.CompletedProcess[str]]
) -> None:
    _clone, _earlier, new, _new_commit = history
    project, update = updated
    assert update.returncode == 0, report(update)
    git("add", "-A", cwd=project)
    git("commit", "-q", "-m", f"template update to {new}", cwd=project)
    behind = make_target("template-behind", project)
    assert behind.returncode == 0 and f"latest release {new}" in behind.stdout, report(behind)


def test_the_owners_code_passes_lint_and_its_tests_after_the_update(
    updated: tuple[Path, subprocess.CompletedProcess[str]], tmp_path: Path
) -> None:
    project, update = updated
    assert update.returncode == 0, report(update)
    python = overlay_python(tmp_path, project)
    checks = {name: command for name, command in CHECKS.items() if name != "pytest"}
    checks["owner's tests"] = lambda python: [str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_projects.py"]
    failures = []
    for name, command in checks.items():
        result = run(command(python), cwd=project)
        if result.returncode != 0:
            failures.append(f"{name}: {report(result)}")
    assert not failures, "\n\n".join(failures)


def a_line_the_template_changed(old: Path, new: Path) -> tuple[str, str]:
    """A template file's line in the bake at the earlier release that the later release changed:
    (file, line)."""
    owner = set(OWNER_PATHS) | {".cruft.json"}
    for relative in git("ls-files", cwd=old).split():
        if relative in owner or not (new / relative).is_file():
            continue
        try:
            lines, later = (old / relative).read_text().splitlines(), set((new / relative).read_text().splitlines())
        except UnicodeDecodeError:
            continue
        for line in lines:
            if line.strip() and lines.count(line) == 1 and line not in later:
                return relative, line
    raise AssertionError("no template line changed between the two releases: nothing can conflict")


def test_an_owners_edit_of_a_line_the_release_changed_fails_loudly(
    history: tuple[Path, str, str, str], updated: tuple[Path, subprocess.CompletedProcess[str]], tmp_path: Path
) -> None:
    clone, earlier, _new, _new_commit = history
    project = bake_at(earlier, clone, tmp_path / "out")
    relative, line = a_line_the_template_changed(project, updated[0])
    path = project / relative
    path.write_text(path.read_text().replace(line, line + OWNER_EDIT))
    git("commit", "-q", "-am", "the owner edits a template file", cwd=project)
    before = (project / ".cruft.json").read_bytes()

    update = make_target("update-template", project)

    assert update.returncode != 0, report(update)
    assert "TEMPLATE UPDATE FAILED" in update.stderr and f"  {relative}: " in update.stderr, report(update)
    assert (project / ".cruft.json").read_bytes() == before


def test_a_service_from_before_the_wrapper_takes_the_release_with_the_changelogs_command(
    history: tuple[Path, str, str, str], tmp_path: Path
) -> None:
    """0.1.0's `make update-template` is plain `cruft update` (exit 0 on a conflict). CHANGELOG.md's
    Upgrading gives the command to run instead; run as written (the URL, the release and the
    service's Python filled in), it must refuse the conflict the layout redesign brings to an owner
    who added a model to models.py, name the file, and keep .cruft.json."""
    clone, _earlier, new, new_commit = history
    project = bake_at("v0.1.0", clone, tmp_path / "out")
    models = project / "src" / PACKAGE / "models.py"
    models.write_text(models.read_text() + '\n\nclass Project(Base):\n    __tablename__ = "projects"\n')
    git("commit", "-q", "-am", "our own model", cwd=project)
    before = (project / ".cruft.json").read_bytes()
    changelog = (TEMPLATE_DIR / "CHANGELOG.md").read_text()
    (command,) = {line.strip() for line in changelog.splitlines() if line.strip().startswith("git clone --quiet --depth 1")}
    command = re.sub(r"--branch \S+", f"--branch {new}", command)
    command = command.replace("<template URL>", f"file://{clone}").replace("/tmp/secure-api-template", str(tmp_path / "template"))
    command = command.replace(".venv/bin/python", sys.executable)

    update = subprocess.run(
        ["bash", "-c", command], cwd=project, env=GIT_ENV, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300, check=False
    )

    assert update.returncode != 0, report(update)
    assert "TEMPLATE UPDATE FAILED" in update.stderr and f"  src/{PACKAGE}/models.py: " in update.stderr, report(update)
    assert f"taking the template's latest release, {new}" in update.stdout, report(update)
    assert (project / ".cruft.json").read_bytes() == before
    # Resolved (the template's models.py, as 0.2.0's Upgrading says, the owner's class to be added
    # back) and added: the Makefile the merge brought records the update.
    git("checkout", "--theirs", "--", f"src/{PACKAGE}/models.py", cwd=project)
    git("add", "--", f"src/{PACKAGE}/models.py", cwd=project)
    finished = make_target("update-template", project)
    assert finished.returncode == 0, report(finished)
    assert json.loads((project / ".cruft.json").read_text())["commit"] == new_commit
