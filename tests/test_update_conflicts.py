"""A template update that conflicts fails loudly, and what a conflict leaves cannot be committed.

The template's history is made here, in a temporary git repository (no network): commit OLD is
this working tree as it is (release v1.0.0), commit NEW changes two of its lines (the nginx
keep-alive timeout and a line of a docs page; release v1.1.0), and a commit after it on `main` is not
released. A service baked from OLD with `cruft create`, whose owner changed the same two lines
differently, then runs `make update-template`: a true conflict in two file types that no linter
reads. It must fail, name both files, and keep `.cruft.json` at OLD; once the owner resolves them,
the same command must record NEW, the latest release (the branch is taken only by choice). A plain
`cruft update` (what services baked before the wrapper ran) leaves markers that `make
template-behind` reports.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from bake import GIT_ENV, bake, copy_working_tree, git, make_target, report, run

SLUG = "secure-api"
TEMPLATE_PROJECT = "{{cookiecutter.project_slug}}"
# The venv running these tests has cruft (requirements-dev.txt): the baked Makefile uses it.
VENV = Path(sys.executable).parent.parent
# (file, the line at OLD, the template's line at NEW, the owner's line)
CONFLICTS = (
    ("deploy/nginx/nginx.conf", "    keepalive_timeout 15s;\n", "    keepalive_timeout 20s;\n", "    keepalive_timeout 5s;\n"),
    (
        "docs/updates.md",
        "`cruft diff` shows what differs from the template.",
        "`cruft diff` shows what differs from the template (the template's wording).",
        "`cruft diff` shows what differs from the template (the owner's wording).",
    ),
)
MARKERS = ("<<<<<<<", ">>>>>>>")
UNRELEASED_LINE = "# (a change on the template's branch, in no release yet)\n"


def make(target: str, project: Path, *variables: str) -> subprocess.CompletedProcess[str]:
    return make_target(target, project, *variables)


def replace_line(path: Path, old: str, new: str) -> None:
    """Replace text that must be there: a moved anchor fails loudly, not silently."""
    text = path.read_text()
    assert text.count(old) == 1, f"{path}: {old!r} is not there exactly once; update {__file__}"
    path.write_text(text.replace(old, new))


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, str]:
    """A template repository with OLD (this working tree) and NEW (two lines changed) on `main`."""
    repo = tmp_path_factory.mktemp("conflicts") / "template"
    copy_working_tree(repo)
    git("init", "-q", "-b", "main", cwd=repo)
    git("add", "-A", cwd=repo)
    git("commit", "-q", "-m", "the template, as it is", cwd=repo)
    git("tag", "-a", "-m", "release 1.0.0", "v1.0.0", cwd=repo)
    old = git("rev-parse", "HEAD", cwd=repo).strip()
    for relative, at_old, at_new, _owner in CONFLICTS:
        replace_line(repo / TEMPLATE_PROJECT / relative, at_old, at_new)
    git("commit", "-q", "-am", "fixture: the template changes two lines", cwd=repo)
    git("tag", "-a", "-m", "release 1.1.0", "v1.1.0", cwd=repo)
    new = git("rev-parse", "HEAD", cwd=repo).strip()
    dockerignore = repo / TEMPLATE_PROJECT / ".dockerignore"
    dockerignore.write_text(dockerignore.read_text() + UNRELEASED_LINE)
    git("commit", "-q", "-am", "fixture: a change on the branch, not released", cwd=repo)
    return repo, old, new


def bake_service(template: Path, commit: str, out: Path, *, repository: bool = True) -> Path:
    """`cruft create` at `commit`, committed to a repository of the service's own."""
    out.mkdir()
    command = [sys.executable, "-m", "cruft", "create", "--no-input", "--checkout", commit]
    result = run([*command, "--output-dir", str(out), str(template)], cwd=out, timeout=120)
    assert result.returncode == 0, report(result)
    project = out / SLUG
    if not repository:
        return project
    git("init", "-q", "-b", "main", cwd=project)
    git("add", "-A", cwd=project)
    git("commit", "-q", "-m", "baked from the template", cwd=project)
    return project


def output(result: subprocess.CompletedProcess[str]) -> str:
    return result.stdout + result.stderr


def test_a_service_behind_its_template_is_told_so(template: tuple[Path, str, str], tmp_path: Path) -> None:
    repo, old, new = template
    behind = make("template-behind", bake_service(repo, old, tmp_path / "old"))
    assert behind.returncode != 0, report(behind)
    assert "BEHIND" in output(behind) and old[:12] in output(behind) and new[:12] in output(behind), report(behind)
    assert "latest release v1.1.0" in output(behind), report(behind)
    current = make("template-behind", bake_service(repo, new, tmp_path / "new"))
    assert current.returncode == 0, report(current)
    assert "current" in current.stdout, report(current)


def test_a_conflicted_update_fails_names_each_file_and_keeps_cruft_json(
    template: tuple[Path, str, str], tmp_path: Path
) -> None:
    repo, old, new = template
    project = bake_service(repo, old, tmp_path / "service")
    for relative, at_old, _at_new, owner in CONFLICTS:
        replace_line(project / relative, at_old, owner)
    git("commit", "-q", "-am", "the owner's own timeout and wording", cwd=project)
    before = (project / ".cruft.json").read_bytes()

    update = make("update-template", project)

    assert update.returncode != 0, report(update)
    assert "TEMPLATE UPDATE FAILED" in output(update), report(update)
    assert "Good work!" not in output(update), "cruft's success message must not survive a conflict"
    assert "Next steps" not in output(update), "the hook's first-bake text, printed by an update"
    for relative, *_ in CONFLICTS:
        assert f"  {relative}: conflict markers on line" in update.stderr, report(update)
        assert any(line.startswith(MARKERS) for line in (project / relative).read_text().splitlines()), relative
    assert (project / ".cruft.json").read_bytes() == before
    # The same refusal from the check that pre-commit and CI run.
    checked = make("check-conflicts", project)
    assert checked.returncode != 0, report(checked)
    assert all(relative in checked.stderr for relative, *_ in CONFLICTS), report(checked)

    # Taking it again before the files are resolved still fails, and still records nothing.
    again = make("update-template", project)
    assert again.returncode != 0, report(again)
    assert "NOT FINISHED" in output(again), report(again)
    assert (project / ".cruft.json").read_bytes() == before

    # Resolved (the template's side of both) and added: the same command records NEW.
    files = [relative for relative, *_ in CONFLICTS]
    git("checkout", "--theirs", "--", *files, cwd=project)
    git("add", "--", *files, cwd=project)
    finished = make("update-template", project)
    assert finished.returncode == 0, report(finished)
    assert json.loads((project / ".cruft.json").read_text())["commit"] == new
    for relative, _at_old, at_new, _owner in CONFLICTS:
        assert at_new in (project / relative).read_text(), relative
    assert make("check-conflicts", project).returncode == 0
    assert make("template-behind", project).returncode == 0


def test_rejected_hunks_fail_the_update_too(template: tuple[Path, str, str], tmp_path: Path) -> None:
    """Outside a git repository cruft applies with `git apply --reject`: what does not apply lands
    in `*.rej` files, and the files themselves keep the owner's lines."""
    repo, old, new = template
    project = bake_service(repo, old, tmp_path / "service", repository=False)
    for relative, at_old, _at_new, owner in CONFLICTS:
        replace_line(project / relative, at_old, owner)
    before = (project / ".cruft.json").read_bytes()

    update = make("update-template", project)

    assert update.returncode != 0, report(update)
    for relative, *_ in CONFLICTS:
        assert f"  {relative}.rej: a rejected hunk" in update.stderr, report(update)
    assert (project / ".cruft.json").read_bytes() == before

    # Applied by hand, the .rej files deleted: the same command records NEW.
    for relative, _at_old, at_new, owner in CONFLICTS:
        replace_line(project / relative, owner, at_new)
        (project / f"{relative}.rej").unlink()
    finished = make("update-template", project)
    assert finished.returncode == 0, report(finished)
    assert json.loads((project / ".cruft.json").read_text())["commit"] == new


def test_an_update_takes_the_latest_release_and_the_branch_only_by_choice(
    template: tuple[Path, str, str], tmp_path: Path
) -> None:
    repo, old, new = template
    project = bake_service(repo, old, tmp_path / "service")
    update = make("update-template", project)
    assert update.returncode == 0, report(update)
    assert "taking the template's latest release, v1.1.0" in update.stdout, report(update)
    assert json.loads((project / ".cruft.json").read_text())["commit"] == new
    for relative, _at_old, at_new, _owner in CONFLICTS:
        assert at_new in (project / relative).read_text(), relative
    assert UNRELEASED_LINE not in (project / ".dockerignore").read_text()
    git("commit", "-q", "-am", "template update to v1.1.0", cwd=project)
    current = make("template-behind", project)
    assert current.returncode == 0 and "latest release v1.1.0" in current.stdout, report(current)

    branch = make("update-template", project, "TEMPLATE_REF=main")
    assert branch.returncode == 0, report(branch)
    assert json.loads((project / ".cruft.json").read_text())["commit"] == git("rev-parse", "main", cwd=repo).strip()
    assert UNRELEASED_LINE in (project / ".dockerignore").read_text()


def test_markers_a_plain_cruft_update_left_are_reported_by_template_behind(
    template: tuple[Path, str, str], tmp_path: Path
) -> None:
    """A service baked before the wrapper ran plain `cruft update`: exit 0, markers committed,
    .cruft.json moved to the new commit. `make template-behind` must not call that current."""
    repo, old, new = template
    project = bake_service(repo, old, tmp_path / "service")
    for relative, at_old, _at_new, owner in CONFLICTS:
        replace_line(project / relative, at_old, owner)
    git("commit", "-q", "-am", "the owner's own timeout and wording", cwd=project)
    command = [sys.executable, "-m", "cruft", "update", "--skip-apply-ask", "--checkout", "v1.1.0"]
    plain = run(command, cwd=project, env=GIT_ENV)
    assert plain.returncode == 0, report(plain)
    assert json.loads((project / ".cruft.json").read_text())["commit"] == new, report(plain)
    git("add", "-A", cwd=project)
    git("commit", "-q", "-m", "template update (markers and all)", cwd=project)

    behind = make("template-behind", project)

    assert behind.returncode != 0, report(behind)
    assert "CONFLICTED" in behind.stderr and "current" not in behind.stdout, report(behind)
    for relative, *_ in CONFLICTS:
        assert f"  {relative}: conflict markers on line" in behind.stderr, report(behind)


def test_the_next_steps_are_printed_on_a_first_bake_only(template: tuple[Path, str, str], tmp_path: Path) -> None:
    """cruft update and cruft diff run the post-generation hook for each render they compare."""
    repo, old, new = template
    (tmp_path / "cookiecutter").mkdir()
    baked = bake(tmp_path / "cookiecutter", {})
    assert baked.returncode == 0 and output(baked).count("Next steps") == 1, report(baked)
    project = bake_service(repo, old, tmp_path / "cruft")
    command = [sys.executable, "-m", "cruft", "create", "--no-input", "--checkout", old, str(repo)]
    created = run([*command, "--output-dir", str(tmp_path / "again")], cwd=tmp_path)
    assert created.returncode == 0 and output(created).count("Next steps") == 1, report(created)

    diffed = run([sys.executable, "-m", "cruft", "diff"], cwd=project, env=GIT_ENV)
    assert diffed.returncode == 0 and "Next steps" not in output(diffed), report(diffed)
    # The console script this time (make update-template runs `python -m cruft`).
    cruft = [str(Path(sys.executable).parent / "cruft"), "update", "--skip-apply-ask", "--checkout", "v1.1.0"]
    updated = run(cruft, cwd=project, env=GIT_ENV)
    assert updated.returncode == 0, report(updated)
    assert json.loads((project / ".cruft.json").read_text())["commit"] == new, "the update did not run"
    assert "Next steps" not in output(updated), report(updated)


def shipped_local_hooks(project: Path, destination: Path) -> Path:
    """The baked pre-commit config's local hooks alone: the others would be fetched from GitHub."""
    config = yaml.safe_load((project / ".pre-commit-config.yaml").read_text())
    local = [repository for repository in config["repos"] if repository["repo"] == "local"]
    assert any(hook["id"] == "no-merge-conflicts" for repository in local for hook in repository["hooks"])
    destination.write_text(yaml.safe_dump({"repos": local}))
    return destination


def test_pre_commit_refuses_conflict_markers_in_readme_and_yaml_and_rejected_hunks(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    result = bake(tmp_path / "out", {})
    assert result.returncode == 0, report(result)
    project = tmp_path / "out" / SLUG
    git("init", "-q", "-b", "main", cwd=project)
    config = shipped_local_hooks(project, tmp_path / "local-hooks.yaml")
    pre_commit = [
        str(Path(sys.executable).parent / "pre-commit"), "run", "no-merge-conflicts", "--config", str(config), "--files",
    ]  # fmt: skip
    environment = {**GIT_ENV, "PRE_COMMIT_HOME": str(tmp_path / "pre-commit-home")}
    files = ["README.md", "compose.yaml", ".github/workflows/ci.yml"]

    clean = run([*pre_commit, *files], cwd=project, env=environment)
    assert clean.returncode == 0, report(clean)

    for relative in files:
        path = project / relative
        path.write_text(path.read_text() + "<<<<<<< ours\nour line\n=======\ntheir line\n>>>>>>> theirs\n")
    (project / "deploy/nginx/nginx.conf.rej").write_text("@@ -1 +1 @@\n-a\n+b\n")
    refused = run([*pre_commit, *files, "deploy/nginx/nginx.conf.rej"], cwd=project, env=environment)
    assert refused.returncode != 0, report(refused)
    for relative in (*files, "deploy/nginx/nginx.conf.rej"):
        assert f"  {relative}: " in refused.stdout + refused.stderr, report(refused)
