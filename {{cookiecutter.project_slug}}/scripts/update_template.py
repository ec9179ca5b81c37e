"""Template updates that cannot pass for clean ones, taken from the template's releases.

`cruft update` merges the template's changes three ways (`git apply -3`, or `git apply --reject`
when that cannot run) and exits 0 either way: conflict markers and `*.rej` files are left in the
tree, and `.cruft.json` already names the new template commit, so after a commit `cruft check`
calls the service current. And with no `--checkout` it takes whatever the template's default
branch holds that minute. Here:

    python scripts/update_template.py             # make update-template: the latest release vX.Y.Z
    python scripts/update_template.py --ref main  # make update-template TEMPLATE_REF=main: a branch, by choice
    python scripts/update_template.py --check     # pre-commit and CI: any marker or *.rej fails
    python scripts/update_template.py --behind    # CI: fails, and says so, behind the latest release or conflicted
    python scripts/update_template.py --notes DIR # title.txt and body.md of the update's pull request

The latest release is the highest `vX.Y.Z` tag of the template repository (`git ls-remote --tags`);
TEMPLATE_REF in the environment is the same as `--ref`. An update that leaves a conflict fails,
names each file, and keeps `.cruft.json` at the old commit; the new state waits in
`.git/template-update.json` until the tree is clean, and running `make update-template` again then
records it. A clean update prints the template's CHANGELOG entries it brought, Upgrading notes
included. Conflicts are looked for in every file type: a marker in Python fails lint anyway, one in
README.md or a YAML file would ship.

Standard library and git only, so it runs before anything is installed, and from a checkout of the
template for a service baked before this script existed (README, Template updates).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

CRUFT_FILE = Path(".cruft.json")
PENDING_NAME = "template-update.json"
# Lines git writes around a conflict (ours, the merge base with diff3, separator, theirs).
MARKER = re.compile(rb"^(?:<{7}|\|{7}|={7}|>{7})(?: |\r?$)", re.MULTILINE)
BINARY_PROBE_BYTES = 8000
# Walked when the project is not a git work tree (tools' and builds' directories skipped).
NOT_SOURCE = {".git", ".venv", "venv", "build", "dist", "node_modules", "__pycache__"}
CRUFT_SUCCESS = "Good work!"
RELEASE_TAG = re.compile(r"^refs/tags/v(\d+)\.(\d+)\.(\d+)(\^\{\})?$")
SECTION = re.compile(r"^## \[(?P<name>[^\]]+)\]", re.MULTILINE)
Version = tuple[int, int, int]


def git(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["git", *args], capture_output=True, text=True, check=False, stdin=subprocess.DEVNULL)


def in_git_work_tree() -> bool:
    return git("rev-parse", "--is-inside-work-tree").stdout.strip() == "true"


def project_files() -> list[Path]:
    """Every file of the project: tracked and untracked, without git-ignored ones."""
    if in_git_work_tree():
        listed = git("ls-files", "-z", "--cached", "--others", "--exclude-standard").stdout
        return sorted({Path(name) for name in listed.split("\0") if name})
    files = []
    for directory, subdirectories, names in os.walk("."):
        subdirectories[:] = [name for name in subdirectories if name not in NOT_SOURCE and not name.endswith("_cache")]
        files += [Path(directory, name).relative_to(".") for name in names]
    return sorted(files)


def marker_lines(path: Path) -> list[int]:
    """Line numbers of conflict markers in a text file; none for a binary or unreadable one."""
    try:
        data = path.read_bytes()
    except OSError:
        return []
    if b"\0" in data[:BINARY_PROBE_BYTES]:
        return []
    return [data.count(b"\n", 0, match.start()) + 1 for match in MARKER.finditer(data)]


def unmerged_paths() -> list[Path]:
    """Paths git's index still holds in conflict (a three-way apply leaves them so)."""
    if not in_git_work_tree():
        return []
    listed = git("diff", "--name-only", "--diff-filter=U", "-z").stdout
    return sorted({Path(name) for name in listed.split("\0") if name})


def problems(files: Iterable[Path]) -> dict[Path, str]:
    """What keeps a tree from being clean after a merge: file -> why."""
    found: dict[Path, str] = {}
    for path in files:
        if path.suffix == ".rej":
            found[path] = "a rejected hunk: apply it by hand to the file beside it, then delete this file"
        elif path.is_file() and not path.is_symlink() and (lines := marker_lines(path)):
            found[path] = "conflict markers on line " + ", ".join(map(str, lines))
    for path in unmerged_paths():
        found.setdefault(path, "unmerged in git's index: `git add` it once resolved")
    return dict(sorted(found.items()))


def report(found: dict[Path, str], headline: str) -> None:
    print(f"\n{headline}", file=sys.stderr)
    for path, why in found.items():
        print(f"  {path}: {why}", file=sys.stderr)
    if os.environ.get("GITHUB_ACTIONS") == "true":
        for path, why in found.items():
            print(f"::error file={path},title=merge conflict::{why}")
        summary = os.environ.get("GITHUB_STEP_SUMMARY")
        if summary:
            with open(summary, "a", encoding="utf-8") as out:
                out.write(f"### {headline}\n\n" + "".join(f"- `{path}`: {why}\n" for path, why in found.items()))


def pending_path() -> Path:
    """Where an update waiting for its conflicts to be resolved keeps its new .cruft.json."""
    if in_git_work_tree():
        return Path(git("rev-parse", "--git-path", PENDING_NAME).stdout.strip())
    return Path(f".{PENDING_NAME}")


def head() -> str:
    return git("rev-parse", "--verify", "--quiet", "HEAD").stdout.strip() if in_git_work_tree() else ""


def tree_is_clean() -> bool:
    return in_git_work_tree() and not git("status", "--porcelain").stdout.strip()


def short(commit: object) -> str:
    return str(commit)[:12]


def update(cruft_args: Sequence[str], ref: str | None) -> int:
    if not CRUFT_FILE.is_file():
        print(f"no {CRUFT_FILE} here: run this in the service's directory", file=sys.stderr)
        return 2
    pending = pending_path()
    if pending.is_file():
        waiting = json.loads(pending.read_text())
        if head() != waiting["head"] or not tree_is_clean():
            return finish(pending, waiting)
        # Same commit, nothing changed: the merged tree was thrown away, so the update starts over.
        print(f"the update to {short(waiting['commit'])} was abandoned (clean tree): taking it again")
        pending.unlink()
    before = CRUFT_FILE.read_bytes()
    template = json.loads(before)["template"]
    if not any(arg == "--checkout" or arg.startswith("--checkout=") for arg in cruft_args):
        if ref is None:
            latest = latest_release(template)
            if latest is None:
                return 2
            ref = f"v{'.'.join(map(str, latest[0]))}"
            print(f"taking the template's latest release, {ref} ({template})")
        else:
            print(f"following the template's {ref} ({template}), by choice (TEMPLATE_REF / --ref)")
        cruft_args = ["--checkout", ref, *cruft_args]
    result = subprocess.run(
        [sys.executable, "-m", "cruft", "update", "--skip-apply-ask", *cruft_args],
        capture_output=True,
        text=True,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    found = problems(project_files()) if result.returncode == 0 else {}
    for stream, text in ((sys.stdout, result.stdout), (sys.stderr, result.stderr)):
        # cruft congratulates whatever the merge left; only a clean one deserves it.
        stream.write("".join(line for line in text.splitlines(True) if not (found and CRUFT_SUCCESS in line)))
    if result.returncode != 0:
        if CRUFT_FILE.read_bytes() != before:
            CRUFT_FILE.write_bytes(before)
        return result.returncode
    if not found:
        if CRUFT_FILE.read_bytes() != before:
            show_notes(template, json.loads(before)["commit"], json.loads(CRUFT_FILE.read_bytes())["commit"])
        return 0
    after = CRUFT_FILE.read_bytes()
    new_commit = json.loads(after).get("commit")
    if after != before:
        pending.write_text(json.dumps({"head": head(), "commit": new_commit, "cruft_json": after.decode()}))
        CRUFT_FILE.write_bytes(before)
    report(found, f"TEMPLATE UPDATE FAILED: the merge left {len(found)} conflicted file(s)")
    print(
        f"\n{CRUFT_FILE} stays at {short(json.loads(before).get('commit'))} until these are resolved "
        f"(template commit {short(new_commit)} waits in {pending}). Edit each file to what both sides "
        "meant, delete the *.rej files, `git add` them, then run `make update-template` again.",
        file=sys.stderr,
    )
    return 1


def finish(pending: Path, waiting: dict[str, str]) -> int:
    """Record the waiting update once the tree holds no conflict."""
    found = problems(project_files())
    if found:
        report(found, f"TEMPLATE UPDATE NOT FINISHED: {len(found)} file(s) still conflicted")
        print(f"\n{CRUFT_FILE} stays at the old commit until they are resolved.", file=sys.stderr)
        return 1
    CRUFT_FILE.write_text(waiting["cruft_json"])
    pending.unlink()
    print(
        f"Template update to {short(waiting['commit'])} finished: {CRUFT_FILE} records it. "
        "Review `git diff`, run `make lint test`, and commit."
    )
    return 0


def check(paths: Sequence[str]) -> int:
    files = [Path(path) for path in paths] if paths else project_files()
    found = problems(files)
    if found:
        report(found, f"{len(found)} file(s) hold a merge conflict")
        return 1
    return 0


def releases(template: str) -> dict[Version, str] | None:
    """The template's release tags (vX.Y.Z) and the commit each names; None when it cannot be asked."""
    answer = git("ls-remote", "--tags", template)
    if answer.returncode != 0:
        print(f"cannot ask the template {template} for its tags:\n{answer.stderr.strip()}", file=sys.stderr)
        return None
    found: dict[Version, str] = {}
    peeled: dict[Version, str] = {}
    for line in answer.stdout.splitlines():
        commit, _, name = line.partition("\t")
        if match := RELEASE_TAG.match(name):
            version = (int(match[1]), int(match[2]), int(match[3]))
            (peeled if match[4] else found)[version] = commit
    return found | peeled  # an annotated tag's own object id gives way to its commit's


def latest_release(template: str) -> tuple[Version, str] | None:
    """The highest release and its commit, saying why when there is none."""
    tags = releases(template)
    if tags is None:
        return None
    if not tags:
        print(
            f"the template {template} has no release tag (vX.Y.Z). Its maintainers recreate them with "
            "`make tags` and push them; or follow a branch by choice: make update-template TEMPLATE_REF=main",
            file=sys.stderr,
        )
        return None
    version = max(tags)
    return version, tags[version]


def behind(ref: str | None) -> int:
    """Exit 1 when the tree holds a conflict, or the template's latest release (or `ref`, by
    choice) is at another commit than .cruft.json's, saying which; 2 when the template cannot be
    asked."""
    found = problems(project_files())
    if found:
        report(found, f"CONFLICTED: {len(found)} file(s) hold what a merge left; the update is not done")
        return 1
    state = json.loads(CRUFT_FILE.read_text())
    template, commit = state["template"], state["commit"]
    if ref is None:
        latest = latest_release(template)
        if latest is None:
            return 2
        target, name = latest[1], f"latest release v{'.'.join(map(str, latest[0]))}"
    else:
        answer = git("ls-remote", template, ref)
        if answer.returncode != 0 or not answer.stdout.strip():
            print(f"cannot ask the template {template} for {ref}:\n{answer.stderr.strip()}", file=sys.stderr)
            return 2
        target, name = answer.stdout.split()[0], ref
    if target == commit:
        print(f"current: this service is at the template's {name} ({short(commit)}, {template})")
        return 0
    message = (
        f"BEHIND: the template's {name} ({template}) is at {short(target)}, this service at {short(commit)}. "
        "Run `make update-template` (or merge the template-update workflow's pull request)."
    )
    print(message, file=sys.stderr)
    if os.environ.get("GITHUB_ACTIONS") == "true":
        print(f"::error file={CRUFT_FILE},title=template update waiting::{message}")
    return 1


def version_key(name: str) -> Version:
    """A CHANGELOG section's order: Unreleased after every release."""
    if name.lower() == "unreleased":
        return (1 << 30, 0, 0)
    major, minor, patch = (int(part) for part in name.split("."))
    return (major, minor, patch)


def changelog_since(changelog: str, version: Version | None) -> str:
    """The CHANGELOG's sections newer than `version` (all of them for None), in its own order."""
    sections = list(SECTION.finditer(changelog))
    ends = [section.start() for section in sections[1:]] + [len(changelog)]
    kept = [
        changelog[section.start() : end].rstrip() + "\n"
        for section, end in zip(sections, ends, strict=True)
        if (version is None or version_key(section["name"]) > version)
        and (section["name"].lower() != "unreleased" or changelog[section.end() : end].strip())  # empty: nothing to say
    ]
    return "\n".join(kept)


def changes_between(template: str, old: str, new: str) -> str | None:
    """The template CHANGELOG's entries after the newest release `old` contains, as `new` has them.
    A bare clone: git only, no template code runs."""
    with tempfile.TemporaryDirectory() as directory:
        clone = str(Path(directory, "template.git"))
        if git("clone", "--quiet", "--bare", template, clone).returncode != 0:
            return None
        changelog = git("-C", clone, "show", f"{new}:CHANGELOG.md")
        if changelog.returncode != 0:
            return None
        taken = git("-C", clone, "tag", "--list", "v*", "--merged", old).stdout.split()
    versions = [version_key(tag[1:]) for tag in taken if re.fullmatch(r"v\d+\.\d+\.\d+", tag)]
    return changelog_since(changelog.stdout, max(versions) if versions else None)


def show_notes(template: str, old: str, new: str) -> None:
    notes = changes_between(template, old, new)
    if notes:
        print(f"\nWhat the template changed since {short(old)} (its CHANGELOG.md); do what Upgrading says:\n")
        print(notes)


def notes(directory: Path) -> int:
    """title.txt and body.md of the pull request for the update in the working tree (against HEAD)."""
    before = json.loads(git("show", f"HEAD:{CRUFT_FILE}").stdout)
    after = json.loads(CRUFT_FILE.read_text())
    name = after.get("checkout") or short(after["commit"])
    entries = changes_between(after["template"], before["commit"], after["commit"])
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "title.txt").write_text(f"Template update to {name}\n")
    (directory / "body.md").write_text(
        f"`make update-template` took the template {after['template']} at {name} ({after['commit']}); "
        f"this service was at {before.get('checkout') or short(before['commit'])}.\n\n"
        "Do what the **Upgrading** parts below ask (push to this branch), let CI run, review, merge.\n\n"
        "## The template's CHANGELOG since then\n\n" + (entries or "(the template's CHANGELOG.md could not be read)\n")
    )
    return 0


def main(argv: Sequence[str]) -> int:
    if argv[:1] in (["-h"], ["--help"]):
        print(__doc__)
        return 0
    if argv[:1] == ["--check"]:
        return check(argv[1:])
    args = list(argv)
    ref = os.environ.get("TEMPLATE_REF") or None
    if args[:1] == ["--ref"] and len(args) > 1:
        ref, args = args[1] or None, args[2:]
    if args[:1] == ["--behind"]:
        return behind(ref)
    if args[:1] == ["--notes"] and len(args) == 2:
        return notes(Path(args[1]))
    return update(args, ref)  # the rest are cruft update's options


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
