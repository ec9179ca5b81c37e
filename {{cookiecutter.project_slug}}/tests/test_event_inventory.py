"""docs/audit.md's event inventory against the code (ASVS 5.0 V16.1.1).

The names come from the source, by an AST walk over every module of the package: the first argument
of each `security_event(...)` call (the events), of each `privilege_changed(...)` call (its
actions), the `"event"` of every `extra={"event": ...}` a logger is given, and the reasons of the
DPoP and token-binding refusals (`InvalidProof(...)`, `NonceRequired(...)`, `InvalidBinding(...)`),
which `authentication_failed` logs. A name that is a variable is resolved through the assignments
to it in its function; one that cannot be resolved fails the test, as does an event the code logs
and the inventory leaves out, or one the inventory lists and the code never logs.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "src" / "{{ cookiecutter.package_name }}"
PAGE = ROOT / "docs" / "audit.md"

KINDS = {
    "security_event": "event",
    "privilege_changed": "action",
    "InvalidProof": "reason",
    "NonceRequired": "reason",
    "InvalidBinding": "reason",
}
# A row of the inventory: `| event | <kind> | <name> |` ... with the name in backticks.
INVENTORY_ROW = re.compile(r"^\|\s*(event|action|reason)\s*\|\s*`([a-z0-9_]+)`\s*\|")


def _strings(node: ast.AST) -> set[str]:
    return {n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str)}


def _assigned(function: ast.AST, name: str) -> set[str]:
    """The string constants assigned to `name` in `function` (`x = "a"`, `x, y = "a" if c else "b", 1`)."""
    found: set[str] = set()
    for node in ast.walk(function):
        if not isinstance(node, ast.Assign):
            continue
        for target in node.targets:
            if isinstance(target, ast.Name) and target.id == name:
                found |= _strings(node.value)
            elif isinstance(target, ast.Tuple) and isinstance(node.value, ast.Tuple):
                for element, value in zip(target.elts, node.value.elts, strict=False):
                    if isinstance(element, ast.Name) and element.id == name:
                        found |= _strings(value)
    return found


def _event(node: ast.Dict) -> str | None:
    """The constant `"event"` of a dict literal, if it has one."""
    for key, value in zip(node.keys, node.values, strict=True):
        if isinstance(key, ast.Constant) and key.value == "event" and isinstance(value, ast.Constant):
            return value.value if isinstance(value.value, str) else None
    return None


def _calls(scope: ast.AST) -> Iterator[tuple[ast.AST, ast.Call]]:
    """Every call with the innermost function (or the module) it is made in."""
    for child in ast.iter_child_nodes(scope):
        yield from _calls_in(child, scope)


def _calls_in(node: ast.AST, scope: ast.AST) -> Iterator[tuple[ast.AST, ast.Call]]:
    if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
        scope = node
    if isinstance(node, ast.Call):
        yield scope, node
    for child in ast.iter_child_nodes(node):
        yield from _calls_in(child, scope)


def logged(package: Path = PACKAGE) -> tuple[dict[str, set[str]], list[str]]:
    """What the code logs, by kind (`event`, `action`, `reason`), and the calls it cannot name."""
    names: dict[str, set[str]] = {"event": set(), "action": set(), "reason": set()}
    unresolved: list[str] = []
    for module in sorted(package.rglob("*.py")):
        tree = ast.parse(module.read_text(encoding="utf-8"))
        for scope, call in _calls(tree):
            function = call.func
            called = function.id if isinstance(function, ast.Name) else getattr(function, "attr", None)
            if called in KINDS and call.args:
                first = call.args[0]
                found = _assigned(scope, first.id) if isinstance(first, ast.Name) else _strings(first)
                if not found:
                    unresolved.append(f"{module.relative_to(package)}:{call.lineno} {called}(...)")
                names[KINDS[called]] |= found
            for keyword in call.keywords:
                extra = keyword.value if keyword.arg == "extra" and isinstance(keyword.value, ast.Dict) else None
                named = extra is not None and any(
                    isinstance(k, ast.Constant) and k.value == "event" for k in extra.keys
                )
                if extra is not None and named and _event(extra) is None:
                    unresolved.append(f"{module.relative_to(package)}:{call.lineno} extra event")
        # A logger's `extra={"event": ...}`, and records built as dicts (the request line's "request").
        names["event"] |= {event for node in ast.walk(tree) if isinstance(node, ast.Dict) and (event := _event(node))}
    return names, unresolved


def inventory(page: str) -> dict[str, set[str]]:
    listed: dict[str, set[str]] = {"event": set(), "action": set(), "reason": set()}
    for line in page.splitlines():
        match = INVENTORY_ROW.match(line)
        if match:
            listed[match[1]].add(match[2])
    return listed


def test_every_event_the_code_logs_is_in_the_inventory() -> None:
    names, unresolved = logged()
    assert unresolved == [], "calls whose event name is not a string the walk can read"
    listed = inventory(PAGE.read_text(encoding="utf-8"))
    missing = {kind: sorted(names[kind] - listed[kind]) for kind in names if names[kind] - listed[kind]}
    assert missing == {}, "logged by the code, missing from docs/audit.md's event inventory"


def test_the_inventory_lists_no_event_the_code_never_logs() -> None:
    names, _ = logged()
    listed = inventory(PAGE.read_text(encoding="utf-8"))
    extra = {kind: sorted(listed[kind] - names[kind]) for kind in listed if listed[kind] - names[kind]}
    assert extra == {}, "in docs/audit.md's event inventory, never logged by the code"


def test_the_walk_finds_events_actions_reasons_and_variables(tmp_path: Path) -> None:
    (tmp_path / "module.py").write_text(
        "import logging\n"
        "def f(created):\n"
        "    security_event('made_up_event', subject='s')\n"
        "    action, command = ('one_action' if created else 'other_action'), 'cmd'\n"
        "    privilege_changed(action, grantee='g')\n"
        "    logging.getLogger().info('x', extra={'event': 'extra_event'})\n"
        "    raise InvalidProof('made_up_reason')\n"
        "def g(name):\n"
        "    privilege_changed(name)\n"
    )
    names, unresolved = logged(tmp_path)
    assert names["event"] == {"made_up_event", "extra_event"}
    assert names["action"] == {"one_action", "other_action"}
    assert names["reason"] == {"made_up_reason"}
    assert unresolved == ["module.py:9 privilege_changed(...)"]
    page = "| event | `made_up_event` | x |\n| action | `one_action` | y |\n"
    assert inventory(page) == {"event": {"made_up_event"}, "action": {"one_action"}, "reason": set()}
