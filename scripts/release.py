#!/usr/bin/env python3
"""The template's releases: which commit each is, its annotated tag, and the release commit.

A release is the commit that sets `VERSION` to a new version and closes that version's section of
CHANGELOG.md (`## [X.Y.Z] - date`). The releases made before VERSION existed are marked in their
CHANGELOG section by a line `Commit: <full hash>`. Tags do not always travel with a push or a
clone, so they are never the record, only made from it:

    scripts/release.py tags [--push REMOTE]  # make tags: an annotated vX.Y.Z per release, from history
    scripts/release.py list                  # each release and its commit
    scripts/release.py check                 # VERSION and CHANGELOG.md agree (make test runs it)
    scripts/release.py prepare X.Y.Z         # the release commit's edit: VERSION, [Unreleased] closed

Tags are reproducible: each names its release commit, with that commit's committer and date as the
tagger and its CHANGELOG section as the message, so every clone makes the same tag objects. A tag
that exists elsewhere is an error, never moved. Standard library and git only.
"""

from __future__ import annotations

import datetime
import os
import re
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SEMVER = re.compile(r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)$")
SECTION = re.compile(r"^## \[(?P<name>[^\]]+)\](?: - (?P<date>\d{4}-\d{2}-\d{2}))?[ \t]*$", re.MULTILINE)
RECORDED = re.compile(r"^Commit: (?P<commit>[0-9a-f]{40})[ \t]*$", re.MULTILINE)
UNRELEASED = "Unreleased"
UNRELEASED_STUB = f"## [{UNRELEASED}]\n\n"


class ReleaseError(Exception):
    pass


@dataclass(frozen=True)
class Section:
    name: str
    date: str | None
    text: str  # the whole section, heading included

    @property
    def tag(self) -> str:
        return f"v{self.name}"

    @property
    def recorded_commit(self) -> str | None:
        match = RECORDED.search(self.text)
        return match["commit"] if match else None


def git(*args: str, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(
        ["git", *args], cwd=ROOT, capture_output=True, text=True, check=False, stdin=subprocess.DEVNULL, env=env
    )
    if result.returncode != 0:
        raise ReleaseError(f"git {' '.join(args)}: {result.stderr.strip()}")
    return result.stdout


def version_key(name: str) -> tuple[int, int, int]:
    match = SEMVER.match(name)
    if not match:
        raise ReleaseError(f"{name!r} is not a version (MAJOR.MINOR.PATCH)")
    return int(match[1]), int(match[2]), int(match[3])


def sections(changelog: str) -> list[Section]:
    found = list(SECTION.finditer(changelog))
    ends = [match.start() for match in found[1:]] + [len(changelog)]
    return [
        Section(match["name"], match["date"], changelog[match.start() : end].rstrip() + "\n")
        for match, end in zip(found, ends, strict=True)
    ]


def released(changelog: str) -> list[Section]:
    """The released sections, newest first, checked: versions, dates, order."""
    result = []
    for section in sections(changelog):
        if section.name == UNRELEASED:
            if result:
                raise ReleaseError("CHANGELOG.md: [Unreleased] must come before every release")
            continue
        version_key(section.name)
        if section.date is None:
            raise ReleaseError(f"CHANGELOG.md: [{section.name}] has no date (## [X.Y.Z] - YYYY-MM-DD)")
        if result and version_key(section.name) >= version_key(result[-1].name):
            raise ReleaseError(f"CHANGELOG.md: [{section.name}] comes after [{result[-1].name}]: newest first")
        result.append(section)
    if not result:
        raise ReleaseError("CHANGELOG.md has no release")
    return result


def version_changes() -> dict[str, str]:
    """Version -> the first commit of HEAD's first-parent history whose VERSION holds it."""
    first: dict[str, str] = {}
    for commit in git("log", "--first-parent", "--reverse", "--format=%H", "HEAD", "--", "VERSION").split():
        try:
            version = git("show", f"{commit}:VERSION").strip()
        except ReleaseError:
            continue  # VERSION deleted in this commit
        first.setdefault(version, commit)
    return first


def releases() -> list[tuple[Section, str]]:
    """Each release of HEAD's CHANGELOG.md and its commit, newest first."""
    changelog = git("show", "HEAD:CHANGELOG.md")
    changes = version_changes()
    result = []
    for section in released(changelog):
        commit = section.recorded_commit or changes.get(section.name)
        if commit is None:
            raise ReleaseError(
                f"[{section.name}] is in CHANGELOG.md but no commit of this history sets VERSION to it, "
                "and its section records no `Commit: <hash>`"
            )
        try:
            git("merge-base", "--is-ancestor", commit, "HEAD")
        except ReleaseError:
            raise ReleaseError(f"[{section.name}]'s commit {commit} is not in HEAD's history") from None
        result.append((section, commit))
    return result


def tag_commit(tag: str) -> str | None:
    try:
        return git("rev-parse", "--verify", "--quiet", f"refs/tags/{tag}^{{commit}}").strip()
    except ReleaseError:
        return None


def make_tags(push: str | None) -> int:
    made = []
    for section, commit in releases():
        existing = tag_commit(section.tag)
        if existing == commit:
            print(f"{section.tag} {commit[:12]} (already tagged)")
            continue
        if existing is not None:
            raise ReleaseError(f"{section.tag} exists at {existing[:12]}, not at the release commit {commit[:12]}")
        name, email, date = git("log", "-1", "--format=%cn%x00%ce%x00%cI", commit).rstrip("\n").split("\0")
        env = {**os.environ, "GIT_COMMITTER_NAME": name, "GIT_COMMITTER_EMAIL": email, "GIT_COMMITTER_DATE": date}
        message = f"secure-api {section.name}\n\n{section.text}"
        git("tag", "--annotate", "--cleanup=verbatim", "--message", message, section.tag, commit, env=env)
        made.append(section.tag)
        print(f"{section.tag} {commit[:12]} (tagged)")
    if push:
        tags = [f"refs/tags/{section.tag}" for section, _ in releases()]
        git("push", push, *tags)
        print(f"pushed to {push}: {', '.join(tag.removeprefix('refs/tags/') for tag in tags)}")
    return 0


def list_releases() -> int:
    for section, commit in releases():
        how = "recorded in CHANGELOG.md" if section.recorded_commit else "sets VERSION"
        print(f"{section.tag}\t{commit}\t{section.date}\t{how}")
    return 0


def check() -> int:
    """The working tree's VERSION and CHANGELOG.md agree: VERSION is the newest release's."""
    version = (ROOT / "VERSION").read_text().strip()
    version_key(version)
    newest = released((ROOT / "CHANGELOG.md").read_text())[0]
    if newest.name != version:
        raise ReleaseError(f"VERSION is {version}, the newest release in CHANGELOG.md is {newest.name}")
    print(f"VERSION {version}: CHANGELOG.md agrees")
    return 0


def prepare(version: str, today: str) -> int:
    """Bump VERSION and close the Unreleased section as this release, leaving a new empty one."""
    current = (ROOT / "VERSION").read_text().strip()
    if version_key(version) <= version_key(current):
        raise ReleaseError(f"{version} is not newer than VERSION {current}")
    path = ROOT / "CHANGELOG.md"
    changelog = path.read_text()
    heading = f"## [{UNRELEASED}]\n"
    if heading not in changelog:
        raise ReleaseError("CHANGELOG.md has no [Unreleased] section to release")
    changelog = changelog.replace(heading, f"{UNRELEASED_STUB}## [{version}] - {today}\n", 1)
    released(changelog)
    path.write_text(changelog)
    (ROOT / "VERSION").write_text(version + "\n")
    print(f"VERSION {version}, CHANGELOG.md's [Unreleased] is now [{version}] - {today}; commit both as the release")
    return 0


def main(argv: Sequence[str]) -> int:
    try:
        match list(argv):
            case ["tags"]:
                return make_tags(None)
            case ["tags", "--push", remote]:
                return make_tags(remote)
            case ["list"]:
                return list_releases()
            case ["check"]:
                return check()
            case ["prepare", version]:
                return prepare(version, datetime.datetime.now(datetime.UTC).date().isoformat())
            case _:
                print(__doc__)
                return 0 if list(argv)[:1] in (["-h"], ["--help"]) else 2
    except ReleaseError as error:
        print(f"release: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
