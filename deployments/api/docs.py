"""The API described: its OpenAPI schema (with the bearer scheme and the error envelope), and
Swagger UI and Redoc pages served from the package, behind the API's keys like the rest."""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute

# Swagger UI and Redoc, vendored (static/docs/README.md): /docs and /redoc load nothing from elsewhere.
DOCS_ASSETS = {"swagger_js": "swagger-ui-bundle.js", "swagger_css": "swagger-ui.css",
               "redoc_js": "redoc.standalone.js", "favicon": "favicon.svg"}
# ... and the browser is told so: Redoc's "by Redocly" logo (a CDN image, hidden when it fails) is
# never requested, and no other request leaves the origin.
DOCS_CSP = ("default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
            "img-src 'self' data:; font-src 'self' data:; connect-src 'self'; worker-src 'self' blob:")
BEARER = "bearerAuth"  # the OpenAPI security scheme of every route behind a key

ERROR_TEXT = {
    400: "bad input: not an image or audio, malformed form or JSON",
    401: "no valid key (Authorization: Bearer <key>)",
    403: "an API key on an admin route",
    404: "unknown or expired id",
    408: ("the body did not arrive within serving.body_timeout_s, or arrived slower than "
          "serving.admission.body_min_bytes_per_s"),
    409: "conflict: not finished yet, or busy",
    413: "the body or a file is over its limit",
    422: "a field is invalid; `param` names it",
    429: "full, or this client holds its share of streams, uploads or turns: retry after Retry-After seconds",
    500: "internal error (details in the server log)",
    503: "the server holds all the streams or uploads it takes: retry after Retry-After seconds",
    504: "the job passed serving.job_timeout_s",
}

docs_router = APIRouter()


def openapi(app: FastAPI, keyed: tuple[APIRouter, ...]) -> dict[str, Any]:
    """FastAPI's schema of `app`, plus the bearer security scheme listed on every operation of the
    routers behind a key (`keyed`: all of /v1, not /healthz and /readyz), and 422s in the
    app's error envelope (FastAPI's default is its own validation shape)."""
    if app.openapi_schema is not None:
        return app.openapi_schema
    spec = FastAPI.openapi(app)  # builds and caches app.openapi_schema
    components = spec.setdefault("components", {})
    components["securitySchemes"] = {BEARER: {
        "type": "http", "scheme": "bearer",
        "description": "an API key (serving.api_keys); the /v1/admin routes need an admin key "
                       "(serving.admin_keys). Checked only when the deployment has keys."}}
    for router in keyed:  # included by build_app with require_key / require_admin
        for route in router.routes:
            if isinstance(route, APIRoute) and route.include_in_schema:
                for method in route.methods:
                    spec["paths"][route.path_format][method.lower()]["security"] = [{BEARER: []}]
    envelope = {"description": ERROR_TEXT[422],
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}}
    for operations in spec["paths"].values():
        for operation in operations.values():
            default = operation.get("responses", {}).get("422", {})
            if "HTTPValidationError" in json.dumps(default):
                operation["responses"]["422"] = envelope
    schemas = components.get("schemas", {})
    if "HTTPValidationError" not in json.dumps(spec["paths"]):  # now unused: leave it out
        for name in ("HTTPValidationError", "ValidationError"):
            schemas.pop(name, None)
    return spec


@docs_router.get("/openapi.json", include_in_schema=False)
async def openapi_schema(request: Request) -> JSONResponse:
    return JSONResponse(request.app.openapi())


def docs_urls(request: Request) -> dict[str, str]:
    """The schema's and the vendored assets' URLs, under the app's root path."""
    root = request.scope.get("root_path", "").rstrip("/")
    return {"openapi": f"{root}/openapi.json", **{k: f"{root}/static/docs/{v}" for k, v in DOCS_ASSETS.items()}}


@docs_router.get("/docs", include_in_schema=False)
async def docs(request: Request) -> Response:
    urls = docs_urls(request)
    page = get_swagger_ui_html(openapi_url=urls["openapi"], title="avatar-serve", swagger_js_url=urls["swagger_js"],
                               swagger_css_url=urls["swagger_css"], swagger_favicon_url=urls["favicon"],
                               swagger_ui_parameters={"validatorUrl": None})
    page.headers["Content-Security-Policy"] = DOCS_CSP
    return page


@docs_router.get("/redoc", include_in_schema=False)
async def redoc(request: Request) -> Response:
    urls = docs_urls(request)
    page = get_redoc_html(openapi_url=urls["openapi"], title="avatar-serve", redoc_js_url=urls["redoc_js"],
                          redoc_favicon_url=urls["favicon"], with_google_fonts=False)
    page.headers["Content-Security-Policy"] = DOCS_CSP
    return page
