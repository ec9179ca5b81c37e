"""Template updates that cannot pass for clean ones, and a check for what a conflict leaves behind.

`cruft update` merges the template's changes three ways (`git apply -3`, or `git apply --reject`
when that cannot run) and exits 0 either way: conflict markers and `*.rej` files are left in the
tree, and `.cruft.json` already names the new template commit, so after a commit `cruft check`
calls the service current. Here:

    python scripts/update_template.py            # make update-template
    python scripts/update_template.py --check    # pre-commit and CI: any marker or *.rej fails
    python scripts/update_template.py --behind   # CI: fails, and says so, when the template moved

An update that leaves a conflict fails, names each file, and keeps `.cruft.json` at the old commit;
the new state waits in `.git/template-update.json` until the tree is clean, and running
`make update-template` again then records it. Conflicts are looked for in every file type: a
marker in Python fails lint anyway, one in README.md or a YAML file would ship.

Standard library and git only, so it runs before anything is installed.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
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


def update(cruft_args: Sequence[str]) -> int:
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


def behind() -> int:
    """Exit 1 when the template's default branch is at another commit than .cruft.json's, saying
    which; 2 when the template cannot be asked. (The branch `cruft update` and `cruft check` take
    unless given `--checkout`, whatever .cruft.json's "checkout" says.)"""
    state = json.loads(CRUFT_FILE.read_text())
    template, commit = state["template"], state["commit"]
    ref = "HEAD"
    answer = git("ls-remote", template, ref)
    latest = answer.stdout.split()[0] if answer.returncode == 0 and answer.stdout.strip() else None
    if latest is None:
        print(f"cannot ask the template {template} for {ref}:\n{answer.stderr.strip()}", file=sys.stderr)
        return 2
    if latest == commit:
        print(f"current: this service is at the template's latest commit ({short(commit)}, {template})")
        return 0
    message = (
        f"BEHIND: the template ({template}) is at {short(latest)}, this service at {short(commit)}. "
        "Run `make update-template` (or merge the template-update workflow's pull request)."
    )
    print(message, file=sys.stderr)
    if os.environ.get("GITHUB_ACTIONS") == "true":
        print(f"::error file={CRUFT_FILE},title=template update waiting::{message}")
    return 1


def main(argv: Sequence[str]) -> int:
    if argv[:1] in (["-h"], ["--help"]):
        print(__doc__)
        return 0
    if argv[:1] == ["--check"]:
        return check(argv[1:])
    if argv[:1] == ["--behind"]:
        return behind()
    return update(argv)  # the rest are cruft update's options, e.g. --checkout <branch>


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
