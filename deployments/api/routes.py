"""HTTP over an Ingress: the FastAPI app -- routes, upload parsing, auth and the error table.

Every route is a named function below that reads the request, calls one typed method of the
ingress and shapes the answer; the ingress knows nothing of HTTP and this module does not import
it (the object arrives as `app.state.ingress`). graph.py makes `build_app` the ingress replica's
`__serve_build_asgi_app__` (one subclass, as Ray LLM's `make_fastapi_ingress` makes); tests call
`build_app(ingress)` on the in-process graph.

Errors: an `ApiError` carries its own status; stage errors are mapped by class in `ERRORS`;
anything else is a 500 without a stack trace (the log has it). All use one envelope.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from pathlib import Path
from typing import Any, Literal

from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.routing import APIRoute
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from deployments.api.auth import IngressDep, require_admin, require_key
from deployments.api.jobs import sse
from deployments.api.protocol import (
    BINARY,
    EXAMPLE_IMAGE,
    ApiError,
    Avatar,
    AvatarRequest,
    Deleted,
    ErrorResponse,
    Job,
    LoraActivate,
    LoraRequest,
    ModelLimits,
    ModelList,
    SpeechRequest,
    VideoList,
    VideoRequest,
    error_body,
    upload_body,
    validation_param,
)
from deployments.api.uploads import read_body, read_form, read_video_form
from deployments.common.errors import (
    AudioError,
    LoraBusyError,
    LoraError,
    LoraNotFound,
    MissingWeightsError,
    unwrap,
)

log = logging.getLogger("avatar_serve.http")

# Stage errors -> (HTTP status, error type, the request field at fault). Ray hands the ingress an
# exception that is an instance of the stage's class, so the lookup walks the class's MRO.
ERRORS: dict[type[BaseException], tuple[int, str, str | None]] = {
    AudioError: (400, "invalid_request_error", "audio"),
    LoraBusyError: (409, "conflict_error", None),
    LoraNotFound: (404, "not_found_error", "name"),
    LoraError: (422, "invalid_request_error", None),
    MissingWeightsError: (422, "invalid_request_error", "path"),
}
MP4 = {200: {"content": {"video/mp4": {"schema": BINARY}}}}
START_INDEX = re.compile(r"[0-9]{1,9}")
STATIC = Path(__file__).with_name("static")  # the web page: index.html, app.js, style.css
# Swagger UI and Redoc, vendored (static/docs/README.md): /docs and /redoc load nothing from elsewhere.
DOCS_ASSETS = {"swagger_js": "swagger-ui-bundle.js", "swagger_css": "swagger-ui.css",
               "redoc_js": "redoc.standalone.js", "favicon": "favicon.svg"}
# ... and the browser is told so: Redoc's "by Redocly" logo (a CDN image, hidden when it fails) is
# never requested, and no other request leaves the origin.
DOCS_CSP = ("default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
            "img-src 'self' data:; font-src 'self' data:; connect-src 'self'; worker-src 'self' blob:")
BEARER = "bearerAuth"  # the OpenAPI security scheme of every route behind a key


# ------------------------------------------------------------------ the app


def build_app(ingress) -> FastAPI:
    """The FastAPI app serving `ingress` (an `Ingress`, or anything with its methods)."""
    # The docs and the OpenAPI schema are routes of `api` below: they follow the API's auth.
    app = FastAPI(title="avatar-serve", version="0.1.0", docs_url=None, redoc_url=None, openapi_url=None,
                  description="Talking-avatar video: Wan2.2 I2V + MuseTalk stages on Ray Serve.")
    app.state.ingress = ingress
    app.add_exception_handler(ApiError, api_error)
    for kind in ERRORS:
        app.add_exception_handler(kind, stage_error)
    app.add_exception_handler(RequestValidationError, request_invalid)
    app.add_exception_handler(ClientDisconnect, client_gone)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, internal_error)
    app.include_router(public)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")  # public, like the page
    app.include_router(api, dependencies=[Depends(require_key)])
    app.include_router(admin, dependencies=[Depends(require_admin)])
    app.openapi = lambda: openapi(app)
    return app


def openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's schema of `app`, plus the bearer security scheme listed on every operation of the
    routers behind a key (`api`, `admin`: all of /v1, not /healthz and /readyz), and 422s in the
    app's error envelope (FastAPI's default is its own validation shape)."""
    if app.openapi_schema is not None:
        return app.openapi_schema
    spec = FastAPI.openapi(app)  # builds and caches app.openapi_schema
    components = spec.setdefault("components", {})
    components["securitySchemes"] = {BEARER: {
        "type": "http", "scheme": "bearer",
        "description": "an API key (serving.api_keys); the /v1/admin routes need an admin key "
                       "(serving.admin_keys). Checked only when the deployment has keys."}}
    for router in (api, admin):  # included by build_app with require_key / require_admin
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


# ------------------------------------------------------------------ errors


async def api_error(_: Request, exc: ApiError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


async def stage_error(_: Request, exc: Exception) -> JSONResponse:
    cause = unwrap(exc)
    status, kind, param = next(ERRORS[k] for k in type(exc).__mro__ if k in ERRORS)  # most specific first
    return JSONResponse(error_body(kind, str(cause), param), status_code=status)


async def request_invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
    message, param = validation_param(exc)
    return JSONResponse(error_body("invalid_request_error", message, param), status_code=422)


async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    kind = {404: "not_found_error", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return JSONResponse(error_body(kind, str(exc.detail)), status_code=exc.status_code,
                        headers=getattr(exc, "headers", None))


async def client_gone(request: Request, exc: ClientDisconnect) -> Response:
    """The client left before its request was read: nothing to answer, nothing went wrong here."""
    log.info("client left during %s %s", request.method, request.url.path)
    return Response(status_code=499)


async def internal_error(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return JSONResponse(error_body("server_error", "internal error; see the server logs"), status_code=500)


# ------------------------------------------------------------------ routes

ERROR_TEXT = {
    400: "bad input: not an image or audio, malformed form or JSON",
    401: "no valid key (Authorization: Bearer <key>)",
    403: "an API key on an admin route",
    404: "unknown or expired id",
    408: "the body did not arrive within serving.body_timeout_s",
    409: "conflict: not finished yet, or busy",
    413: "the body or a file is over its limit",
    422: "a field is invalid; `param` names it",
    429: "full: retry after Retry-After seconds",
    500: "internal error (details in the server log)",
    504: "the job passed serving.job_timeout_s",
}


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI responses for these error statuses, each the one error envelope."""
    out: dict[int | str, dict[str, Any]] = {}
    for code in codes:
        out[code] = {"model": ErrorResponse, "description": ERROR_TEXT[code]}
        if code == 429:
            out[code]["headers"] = {"Retry-After": {"description": "seconds", "schema": {"type": "integer"}}}
    return out


IMAGE_FIELD = (True, "image/png, image/jpeg, image/webp", "the portrait (first frame)")
AUDIO_FIELD = (False, "audio/*", "speech to lip-sync onto the clip (wav, mp3, ogg/opus, flac, m4a; the clip then "
                                 "runs at 25 fps for as long as the audio)")
EXAMPLE = {"prompt": "a portrait of a woman who smiles and talks", "input_reference": EXAMPLE_IMAGE}
VIDEO_BODY = upload_body(VideoRequest, {"input_reference": IMAGE_FIELD, "audio": AUDIO_FIELD}, EXAMPLE)
AVATAR_BODY = upload_body(AvatarRequest, {"input_reference": IMAGE_FIELD}, EXAMPLE)
SPEECH_BODY = upload_body(SpeechRequest, {"audio": (True, "audio/*", "speech: wav, mp3, ogg/opus, flac, m4a")},
                          extra_content={media: {"schema": {**BINARY, "description": "the audio file as the body"}}
                                         for media in ("audio/*", "application/octet-stream")})

public = APIRouter()
api = APIRouter(responses=errors(401))
admin = APIRouter(prefix="/v1/admin", responses=errors(401, 403))


@api.get("/openapi.json", include_in_schema=False)
async def openapi_schema(request: Request) -> JSONResponse:
    return JSONResponse(request.app.openapi())


def docs_urls(request: Request) -> dict[str, str]:
    """The schema's and the vendored assets' URLs, under the app's root path."""
    root = request.scope.get("root_path", "").rstrip("/")
    return {"openapi": f"{root}/openapi.json", **{k: f"{root}/static/docs/{v}" for k, v in DOCS_ASSETS.items()}}


@api.get("/docs", include_in_schema=False)
async def docs(request: Request) -> Response:
    urls = docs_urls(request)
    page = get_swagger_ui_html(openapi_url=urls["openapi"], title="avatar-serve", swagger_js_url=urls["swagger_js"],
                               swagger_css_url=urls["swagger_css"], swagger_favicon_url=urls["favicon"],
                               swagger_ui_parameters={"validatorUrl": None})
    page.headers["Content-Security-Policy"] = DOCS_CSP
    return page


@api.get("/redoc", include_in_schema=False)
async def redoc(request: Request) -> Response:
    urls = docs_urls(request)
    page = get_redoc_html(openapi_url=urls["openapi"], title="avatar-serve", redoc_js_url=urls["redoc_js"],
                          redoc_favicon_url=urls["favicon"], with_google_fonts=False)
    page.headers["Content-Security-Policy"] = DOCS_CSP
    return page


@public.get("/", include_in_schema=False)
async def web_page() -> FileResponse:
    """The web page (public: it asks for the API key itself and sends it with each call)."""
    return FileResponse(STATIC / "index.html", media_type="text/html", headers={"Cache-Control": "no-cache"})


@public.get("/healthz", summary="Liveness: the ingress answers")
@public.head("/healthz", include_in_schema=False)  # for probes that send HEAD; one entry in the schema
async def healthz(ingress: IngressDep) -> dict[str, Any]:
    return {"status": "ok", "profile": ingress.cfg.name}


@public.get("/readyz", summary="Readiness: 200 once every stage has loaded and warmed up, else 503",
            responses={503: {"description": "stages still starting"}})
async def readyz(ingress: IngressDep) -> JSONResponse:
    ready, stages = await ingress.ready()
    return JSONResponse({"status": "ready" if ready else "starting", "profile": ingress.cfg.name,
                         "stages": stages}, status_code=200 if ready else 503)


@api.get("/v1/models", response_model=ModelList, responses=errors(500))
async def list_models(ingress: IngressDep):
    models = await ingress.models()
    for card in models.data:  # the bounds a form needs (the web page reads them)
        card.limits = card.limits or ModelLimits.of(ingress.cfg)
    return models


@api.post("/v1/videos", response_model=Job, summary="Create a video job (multipart or JSON)",
          openapi_extra={"requestBody": VIDEO_BODY}, responses=errors(400, 408, 413, 422, 429, 500))
async def create_video(request: Request, ingress: IngressDep):
    fields, image, audio = await read_video_form(request, ingress)
    return await ingress.submit(fields, image, audio)


@api.post("/v1/videos/sync", response_class=Response, openapi_extra={"requestBody": VIDEO_BODY},
          summary="Generate a video and wait for the MP4 (multipart: prompt, input_reference, ...)",
          responses={200: {"content": {"video/mp4": {"schema": BINARY}}, "description": "the MP4",
                           "headers": {"X-Seed": {"description": "the seed used", "schema": {"type": "integer"}},
                                       "X-Job-Id": {"description": "the job's id", "schema": {"type": "string"}}}},
                     **errors(400, 408, 413, 422, 429, 500, 504)})
async def create_video_sync(request: Request, ingress: IngressDep) -> Response:
    fields, image, audio = await read_video_form(request, ingress)
    result = await ingress.generate(fields, image, "mp4", audio)
    return Response(content=result.mp4, media_type="video/mp4",
                    headers={"X-Seed": str(result.params.seed), "X-Job-Id": result.params.request_id})


@api.get("/v1/videos", response_model=VideoList, responses=errors(422))
async def list_videos(ingress: IngressDep, limit: int = Query(20, ge=1, le=100), after: str | None = None):
    return ingress.list_jobs(limit, after)


@api.get("/v1/videos/{video_id}", response_model=Job, responses=errors(404))
async def get_video(video_id: str, ingress: IngressDep):
    return ingress.job(video_id)


@api.delete("/v1/videos/{video_id}", response_model=Job | Deleted, responses=errors(404),
            summary="Cancel a queued or running job; delete a finished one")
async def delete_video(video_id: str, ingress: IngressDep):
    return ingress.cancel_or_delete(video_id)


@api.get("/v1/videos/{video_id}/content", response_class=FileResponse, responses={**MP4, **errors(404, 409)})
async def get_video_content(video_id: str, ingress: IngressDep):
    return FileResponse(ingress.content_path(video_id), media_type="video/mp4", filename=f"{video_id}.mp4")


SSE_KEEPALIVE_S = 15.0  # a comment line this often on a quiet stream: proxies keep it, clients see it live


async def with_keepalive(events, every_s: float):
    """SSE lines for `events`, plus a comment line whenever none came for `every_s` (the pending
    read is kept, not cancelled, so no event is lost)."""
    events = aiter(events)
    pending = asyncio.ensure_future(anext(events))
    try:
        while True:
            done, _ = await asyncio.wait({pending}, timeout=every_s)
            if not done:
                yield ": keep-alive\n\n"
                continue
            try:
                event = pending.result()
            except StopAsyncIteration:
                return
            yield sse(event)
            pending = asyncio.ensure_future(anext(events))
    finally:
        pending.cancel()


@api.get("/v1/videos/{video_id}/events", summary="Server-sent progress events", response_class=StreamingResponse,
         responses={200: {"content": {"text/event-stream": {"schema": {"type": "string"}}},
                          "description": "`event:`, `id:` and `data:` (JSON) lines"}, **errors(404)},
         description="Every event has an `id`; a client that reconnects with `Last-Event-ID` gets the "
                     "events after it. Every stream ends with a final event (completed, failed or "
                     "cancelled), also after the server restarted mid-job (failed: interrupted).")
async def get_video_events(video_id: str, request: Request, ingress: IngressDep) -> StreamingResponse:
    last = request.headers.get("last-event-id", "")
    after = int(last) if last.isascii() and last.isdigit() and len(last) < 10 else -1
    events = ingress.follow(video_id, after)  # 404 before the stream starts

    async def stream():
        yield "retry: 2000\n\n"  # EventSource reconnects after 2 s if the connection drops
        async for line in with_keepalive(events, SSE_KEEPALIVE_S):
            yield line

    return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


@api.post("/v1/avatars", response_model=Avatar, status_code=201, openapi_extra={"requestBody": AVATAR_BODY},
          summary="Create an avatar: base clip + lip-sync preparation (idempotent for the same inputs)",
          responses={200: {"model": Avatar, "description": "the avatar of the same inputs, created before"},
                     **errors(400, 408, 413, 422, 429, 500)})
async def create_avatar(request: Request, ingress: IngressDep):
    fields, image, audio = await read_video_form(request, ingress)
    if audio is not None:
        raise ApiError(422, "audio: avatars take no audio; send it to /v1/avatars/{id}/speech", "audio")
    avatar, created = await ingress.create_avatar(fields, image)
    return JSONResponse(avatar.model_dump(), status_code=201 if created else 200)


@api.get("/v1/avatars/{avatar_id}", response_model=Avatar, responses=errors(404))
async def get_avatar(avatar_id: str, ingress: IngressDep):
    return ingress.avatar(avatar_id)


@api.delete("/v1/avatars/{avatar_id}", response_model=Deleted, responses=errors(404))
async def delete_avatar(avatar_id: str, ingress: IngressDep):
    return await ingress.delete_avatar(avatar_id)


@api.post("/v1/avatars/{avatar_id}/speech", response_class=StreamingResponse,
          summary="Audio in (multipart `audio`, or a raw audio body), lip-synced fragmented MP4 streamed out",
          openapi_extra={"requestBody": SPEECH_BODY},
          responses={200: {"content": {"video/mp4": {"schema": BINARY}},
                           "description": "fragmented MP4 (H.264 + AAC), streamed as it is made"},
                     **errors(400, 404, 408, 409, 413, 422, 429, 500)})
async def create_speech(avatar_id: str, request: Request, ingress: IngressDep) -> StreamingResponse:
    ingress.avatar(avatar_id)  # 404 before reading the body
    limit, timeout_s = ingress.cfg.limits.max_audio_bytes, ingress.cfg.serving.body_timeout_s
    if request.headers.get("content-type", "").startswith(("audio/", "application/octet-stream", "video/")):
        audio, fields = await read_body(request, limit, timeout_s, "audio"), {}
    else:
        fields, files = await read_form(request, {"audio": limit}, timeout_s)
        audio = files.get("audio")
    start = str(fields.get("start_index", "0"))
    if not START_INDEX.fullmatch(start):  # (str.isdigit accepts "²", which int() refuses)
        raise ApiError(422, "start_index: a non-negative integer", "start_index")
    chunks = ingress.speak(avatar_id, audio, int(start))
    first = await anext(chunks)  # validation and the first fragment: errors here are HTTP errors

    async def body():
        yield first
        async for chunk in chunks:
            yield chunk

    return StreamingResponse(body(), media_type="video/mp4", headers={"Cache-Control": "no-cache"})


@admin.get("/loras")
async def list_loras(ingress: IngressDep) -> dict:
    return await ingress.list_loras()


@admin.post("/loras", summary="Load a LoRA onto the high, low or both experts", responses=errors(404, 409, 422))
async def load_lora(req: LoraRequest, ingress: IngressDep) -> dict:
    return await ingress.load_lora(req)


@admin.post("/loras/activate", responses=errors(404, 409, 422))
async def activate_loras(req: LoraActivate, ingress: IngressDep) -> dict:
    return await ingress.activate_loras(req)


@admin.delete("/loras/{name}", responses=errors(404, 409, 422))
async def remove_lora(name: str, ingress: IngressDep, target: Literal["high", "low", "both"] = "both") -> dict:
    return await ingress.remove_lora(name, target)
