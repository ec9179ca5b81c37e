"""The credential options baked into this service are exactly the ones chosen, and each one is
wired into the pipeline, the routes and the CLI through its own package, `options/<option>/`."""

from __future__ import annotations

from fastapi import FastAPI

from {{ cookiecutter.package_name }} import extensions
from {{ cookiecutter.package_name }}.cli import build_parser
from {{ cookiecutter.package_name }}.runtime import Runtime
from {{ cookiecutter.package_name }}.security.authn import Authenticate, BearerToken, DPoPToken
from {{ cookiecutter.package_name }}.security.route_policy import _flat_routes
from {{ cookiecutter.package_name }}.security.stack import SecuredApp

# The answers this service was baked with.
BAKED = {
    "mtls": "{{ cookiecutter.mtls }}",
    "api_keys": "{{ cookiecutter.api_keys }}",
    "webhooks": "{{ cookiecutter.webhooks }}",
    # authz_engine=cerbos is the option package `cerbos` (a policy engine, no credential)
    "cerbos": "{{ 'yes' if cookiecutter.authz_engine == 'cerbos' else 'no' }}",
}


def test_the_option_modules_are_exactly_the_chosen_ones() -> None:
    assert set(BAKED) == set(extensions.KNOWN)
    chosen = [name for name in extensions.KNOWN if BAKED[name] == "yes"]
    assert extensions.present() == chosen
    assert [module.__name__.split(".")[-2] for module in extensions.chosen()] == chosen


def test_each_options_authenticators_come_before_the_bearer_token(app: FastAPI) -> None:
    assert isinstance(app, SecuredApp)
    runtime: Runtime = app.state.runtime
    assert [extension.name for extension in runtime.extensions] == [
        name for name in extensions.KNOWN if BAKED[name] == "yes"
    ]
    app.middleware_stack = app.build_middleware_stack()
    layer = app.middleware_stack
    while not isinstance(layer, Authenticate):
        layer = layer.app  # type: ignore[attr-defined]
    expected = [a for extension in runtime.extensions for a in extension.authenticators]
    assert list(layer.authenticators[:-2]) == expected
    # The core's JWT access tokens last: bound to a key (DPoP), then as Bearer.
    assert isinstance(layer.authenticators[-2], DPoPToken)
    assert isinstance(layer.authenticators[-1], BearerToken)
    # The channel credentials they declare (a client certificate) reach the layer too.
    assert list(layer.channels) == [c for extension in runtime.extensions for c in extension.channels]


def test_each_options_routes_are_served(app: FastAPI) -> None:
    runtime: Runtime = app.state.runtime
    # Recent FastAPI keeps included routers nested in app.routes: walk them as the policy walk does.
    served = {path for path, _methods, _route, _dependant in _flat_routes(app.routes)}
    for extension in runtime.extensions:
        for router in extension.routers:
            assert {route.path for route in router.routes} <= served  # type: ignore[attr-defined]


def test_the_cli_offers_exactly_the_core_and_the_chosen_options_commands() -> None:
    parser = build_parser()
    commands = next(action for action in parser._actions if action.dest == "command")
    core = {"keys", "token", "serve", "check-config", "audit-pseudonym", "grant", "revoke-grant"}
    assert core <= set(commands.choices)  # type: ignore[arg-type]
