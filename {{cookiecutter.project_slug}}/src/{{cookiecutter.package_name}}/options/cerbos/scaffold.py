"""`scaffold resource` with authz_engine=cerbos: the new resource's policy and its policy test.

A top-level resource is an object type of its own: its resource policy (`policies/resources/
<name>.yaml`) and a test suite (creating one is the `service` policy's: the scopes decide). A resource under a
parent is checked on its parent (the caller's relation to the org): its actions are added to the
parent's policy, with a test suite of their own. `make policies` compiles and tests them.
"""

from __future__ import annotations

from pathlib import Path
from string import Template

TOP_POLICY = """# $label (scaffolded): an object type of its own, whose creator becomes its owner.
apiVersion: api.cerbos.dev/v1
resourcePolicy:
  version: default
  resource: $name
  importDerivedRoles:
    - relations
  rules:
    # GET /$plural/{${name}_id}
    - actions: ["$plural:read"]
      effect: EFFECT_ALLOW
      derivedRoles: [viewer]
      condition:
        match:
          expr: '"$plural:read" in P.attr.scopes'
    # DELETE /$plural/{${name}_id}
    - actions: ["$plural:write"]
      effect: EFFECT_ALLOW
      derivedRoles: [owner]
      condition:
        match:
          expr: '"$plural:write" in P.attr.scopes'
"""

CHILD_RULES = """    # GET /$parent_table/{$param}/$plural/... (scaffolded)
    - actions: ["$plural:read"]
      effect: EFFECT_ALLOW
      derivedRoles: [viewer]
      condition:
        match:
          expr: '"$plural:read" in P.attr.scopes'
    # POST, DELETE /$parent_table/{$param}/$plural/... (scaffolded)
    - actions: ["$plural:write"]
      effect: EFFECT_ALLOW
      derivedRoles: [editor]
      condition:
        match:
          expr: '"$plural:write" in P.attr.scopes'
"""

_PRINCIPALS = """principals:
  scoped:
    id: scoped
    roles: ["user"]
    attr:
      scopes: ["$plural:read", "$plural:write"]
  unscoped:
    id: unscoped
    roles: ["user"]
    attr:
      scopes: []
"""


def _resources(kind: str, relations: tuple[str, ...]) -> str:
    lines = ["resources:"]
    for relation in relations:
        name = f"as_{relation}" if relation else "no_grant"
        lines += [f"  {name}:", f"    kind: {kind}", "    id: x1", "    attr:", f'      relation: "{relation}"']
    return "\n".join(lines) + "\n"


def _expect(principal: str, resource: str, read: bool, write: bool, plural: str) -> str:
    effect = {True: "EFFECT_ALLOW", False: "EFFECT_DENY"}
    return (
        f"      - principal: {principal}\n        resource: {resource}\n        actions:\n"
        f"          {plural}:read: {effect[read]}\n          {plural}:write: {effect[write]}\n"
    )


def _test_suite(values: dict[str, str], kind: str, write_relation: str) -> str:
    plural = values["plural"]
    relations = ("owner", "editor", "viewer", "")
    rank = {"owner": 3, "editor": 2, "viewer": 1, "": 0}
    expectations = "".join(
        _expect(
            "scoped",
            f"as_{relation}" if relation else "no_grant",
            rank[relation] >= 1,
            rank[relation] >= rank[write_relation],
            plural,
        )
        for relation in relations
    )
    suite = (
        f"# {values['label']} (scaffolded): each relation, with and without the scopes.\n"
        f"name: {values['label']}TestSuite\n"
        f"description: {plural} decided by relation and scope\n"
        + Template(_PRINCIPALS).substitute(values)
        + _resources(kind, relations)
        + "tests:\n"
        + "  - name: Each relation allows what it includes\n"
        + "    input:\n"
        + '      principals: ["scoped"]\n'
        + f"      resources: [{', '.join(f'as_{r}' if r else 'no_grant' for r in relations)}]\n"
        + f'      actions: ["{plural}:read", "{plural}:write"]\n'
        + "    expected:\n"
        + expectations
        + "  - name: Without the scopes, even the owner is refused\n"
        + "    input:\n"
        + '      principals: ["unscoped"]\n'
        + "      resources: [as_owner]\n"
        + f'      actions: ["{plural}:read", "{plural}:write"]\n'
        + "    expected:\n"
        + _expect("unscoped", "as_owner", False, False, plural)
    )
    return suite


def scaffold(kind: str, values: dict[str, str], project: Path) -> list[Path]:
    """Write the policy and policy test of the resource `values` describes; the paths written."""
    policies = project / "policies"
    resources, tests = policies / "resources", policies / "tests"
    if kind == "top":
        policy = resources / f"{values['name']}.yaml"
        suite = tests / f"{values['name']}_test.yaml"
        policy.write_text(Template(TOP_POLICY).substitute(values))
        suite.write_text(_test_suite(values, values["name"], "owner"))
        return [policy, suite]
    parent = resources / f"{values['parent']}.yaml"
    suite = tests / f"{values['plural']}_test.yaml"
    _append(parent, Template(CHILD_RULES).substitute(values))
    suite.write_text(_test_suite(values, values["parent"], "editor"))
    return [parent, suite]


def _append(policy: Path, rules: str) -> None:
    """Add rules to a resource policy, whose `rules:` list is its last key."""
    policy.write_text(policy.read_text().rstrip("\n") + "\n" + rules)
