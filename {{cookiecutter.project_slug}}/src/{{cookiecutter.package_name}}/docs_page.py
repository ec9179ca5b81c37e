"""The development API page, `/docs`: Swagger UI served by the service itself, never from a CDN.

Its files are Swagger UI's own dist as the `fastapi-swagger` package ships it (a dependency pinned
in the lock with its hash); only its files are used, not its FastAPI patch. The page is static
HTML that loads a stylesheet and two scripts of its own origin, the bundle and the initializer
below, so its CSP (`DOCS_CSP`, security/transport.py) needs neither `'unsafe-inline'` nor any
other origin, and it works on a machine without internet. Every URL in it is relative, so it
works under a path prefix too. Added only while DOCS_ENABLED (off in production): otherwise none
of these paths exists."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from importlib.resources import files
from pathlib import Path

from fastapi import FastAPI
from starlette.requests import Request
from starlette.responses import FileResponse, Response

DOCS_URL = "/docs"
# Swagger UI's files, by the name they are served under /docs/, and their media type.
SWAGGER_UI_FILES = {
    "swagger-ui-bundle.js": "text/javascript; charset=utf-8",
    "swagger-ui.css": "text/css; charset=utf-8",
    "favicon-32x32.png": "image/png",
}
INITIALIZER = "swagger-initializer.js"

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{title} - API</title>
<link rel="stylesheet" href="docs/swagger-ui.css">
<link rel="icon" type="image/png" href="docs/favicon-32x32.png">
</head>
<body>
<div id="swagger-ui"></div>
<script src="docs/swagger-ui-bundle.js"></script>
<script src="docs/swagger-initializer.js"></script>
</body>
</html>
"""

# Swagger UI's initializer as a file of its own rather than an inline script (FastAPI's page), so
# script-src stays 'self'. The document's URL is relative to this script's, prefix included.
# validatorUrl null: Swagger UI would otherwise ask validator.swagger.io about the document.
INITIALIZER_JS = """window.ui = SwaggerUIBundle({
  url: new URL("../openapi.json", document.currentScript.src).href,
  dom_id: "#swagger-ui",
  layout: "BaseLayout",
  deepLinking: true,
  showExtensions: true,
  showCommonExtensions: true,
  validatorUrl: null,
  presets: [SwaggerUIBundle.presets.apis, SwaggerUIBundle.SwaggerUIStandalonePreset],
});
"""


def swagger_ui_directory() -> Path:
    return Path(str(files("fastapi_swagger") / "resources"))


def add_docs_page(app: FastAPI) -> None:
    """`/docs`, its initializer and Swagger UI's files: public routes (DOCS_ROUTES in
    security/route_policy.py; the start refuses a path missing there)."""
    page = PAGE.format(title=app.title).encode()
    directory = swagger_ui_directory()

    async def docs_page(request: Request) -> Response:
        return Response(page, media_type="text/html; charset=utf-8")

    async def initializer(request: Request) -> Response:
        return Response(INITIALIZER_JS, media_type="text/javascript; charset=utf-8")

    app.add_route(DOCS_URL, docs_page, include_in_schema=False)
    app.add_route(f"{DOCS_URL}/{INITIALIZER}", initializer, include_in_schema=False)
    for name, media_type in SWAGGER_UI_FILES.items():
        app.add_route(f"{DOCS_URL}/{name}", _file(directory / name, media_type), include_in_schema=False)


def _file(path: Path, media_type: str) -> Callable[[Request], Awaitable[Response]]:
    if not path.is_file():  # a release of the package that moved its files: fail at start, not on a click
        raise RuntimeError(f"Swagger UI's file {path} is missing: is fastapi-swagger installed?")

    async def serve(request: Request) -> Response:
        return FileResponse(path, media_type=media_type)

    return serve
