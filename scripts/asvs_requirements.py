"""Write the ASVS 5.0 requirement ids the baked docs/asvs.md must answer, from the ASVS source.

    python scripts/asvs_requirements.py <checkout of OWASP/ASVS>/5.0/en

reads the chapters' requirement tables (`| **8.2.1** | Verify that ... | 1 |`) and writes
`{{cookiecutter.project_slug}}/tests/asvs_requirements.json`: the ids of the chapters and levels
below, each with its level. The baked tests/test_asvs.py reads that file (never the network) and
fails when docs/asvs.md leaves one out. Run it again when a new ASVS release changes a chapter and
record the commit in SOURCE. Standard library only.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

TEMPLATE = Path(__file__).resolve().parent.parent
OUTPUT = TEMPLATE / "{{cookiecutter.project_slug}}" / "tests" / "asvs_requirements.json"

# Where the ids came from: OWASP/ASVS, branch master, 5.0/en (ASVS 5.0.0, May 2025).
SOURCE = {
    "standard": "OWASP Application Security Verification Standard 5.0.0",
    "repository": "https://github.com/OWASP/ASVS",
    "files": {
        "0x11-V2-Validation-and-Business-Logic.md": "104040a50a6dc9c261ee9564ab55a076b9db8779",
        "0x12-V3-Web-Frontend-Security.md": "05cd7676b50bf1b4ddfd69f4fce734001e1fcfc9",
        "0x13-V4-API-and-Web-Service.md": "46f24b30b3d18b2c82c365a34b3d6f655e161b7a",
        "0x17-V8-Authorization.md": "1c4fca441680fc900c66856c4445be4b57bea794",
        "0x18-V9-Self-contained-Tokens.md": "14d2ed9879ee4a120d3b16f8af681b78e46c0472",
        "0x19-V10-OAuth-and-OIDC.md": "104040a50a6dc9c261ee9564ab55a076b9db8779",
        "0x21-V12-Secure-Communication.md": "113cb33713590632af97c6106514548238fcd901",
        "0x22-V13-Configuration.md": "1c4fca441680fc900c66856c4445be4b57bea794",
        "0x23-V14-Data-Protection.md": "09f4556f7cb4c826bd167cbf24c06de73f5dd13b",
        "0x24-V15-Secure-Coding-and-Architecture.md": "1baf9769ef7cc24e5b6453c295991d4493cf42ac",
        "0x25-V16-Security-Logging-and-Error-Handling.md": "1c4fca441680fc900c66856c4445be4b57bea794",
    },
}

# Issue 32: chapters (or sections) and the highest level the page answers for them. V10 only its
# generic and resource-server sections: the service is an OAuth resource server, never a client,
# an authorization server or an OpenID provider.
SCOPE: dict[str, int] = {
    "2": 2,
    "3.4": 2,
    "4": 2,
    "8": 3,
    "9": 3,
    "10.1": 3,
    "10.3": 3,
    "12": 2,
    "13": 2,
    "14": 2,
    "15": 2,
    "16": 3,
}

ROW = re.compile(r"^\|\s*\*\*(\d+\.\d+\.\d+)\*\*\s*\|.*?\|\s*([123])\s*\|")


def in_scope(requirement: str, level: int) -> bool:
    for prefix, highest in SCOPE.items():
        if (requirement == prefix or requirement.startswith(prefix + ".")) and level <= highest:
            return True
    return False


def requirements(folder: Path) -> dict[str, int]:
    found: dict[str, int] = {}
    for name in SOURCE["files"]:
        for line in (folder / name).read_text(encoding="utf-8").splitlines():
            match = ROW.match(line)
            if match and in_scope(match[1], int(match[2])):
                found[f"V{match[1]}"] = int(match[2])
    return dict(sorted(found.items(), key=lambda item: [int(part) for part in item[0][1:].split(".")]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="5.0/en of a checkout of OWASP/ASVS")
    args = parser.parse_args()
    found = requirements(args.folder)
    document = {"source": SOURCE, "scope": SCOPE, "requirements": found}
    OUTPUT.write_text(json.dumps(document, indent=1) + "\n", encoding="utf-8")
    print(f"{len(found)} requirements -> {OUTPUT.relative_to(TEMPLATE)}")


if __name__ == "__main__":
    main()
