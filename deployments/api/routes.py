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
import logging
import re
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Literal

from fastapi import APIRouter, Depends, FastAPI, Query, Request, WebSocket, WebSocketDisconnect
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from deployments.api.admission import Admission, BodyTooSlow
from deployments.api.auth import IngressDep, live_key_ok, require_admin, require_key
from deployments.api.docs import ERROR_TEXT, docs_router, openapi
from deployments.api.jobs import sse
from deployments.api.live import Gone, LiveError
from deployments.api.lora_request import LoraList
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


DESCRIPTION = """Talking-avatar video: Wan2.2 I2V + MuseTalk stages on Ray Serve.

**Live sessions** (a WebSocket, so not listed below): `GET /v1/avatars/{id}/live` on a ready avatar,
with `Authorization: Bearer <key>` or `?access_token=<key>`. Send `{"type": "start", "format":
"pcm_s16le" | "pcm_f32le", "sample_rate": 16000 | 24000 | 48000}`, then binary mono audio of any size
and `{"type": "end_of_utterance" | "interrupt" | "close"}`. Receive one fragmented MP4 (H.264 + AAC,
real-time pace, idle and speech) as binary messages, and JSON events: `ready` (with the MSE `mime`),
`speech_started` / `speech_ended` / `interrupted` (with `frame`), `stats`, `error` before a close.
Close codes: 1000 normal, 1009 audio message too big, 4400 bad message, 4401 key, 4404 unknown avatar,
4409 avatar not ready or deleted, 4413 too much audio, 4408 session too long or client reading too
slowly, 4429 full (`retry_after`), 1011 internal."""


# ------------------------------------------------------------------ the app


@asynccontextmanager
async def lifespan(app: FastAPI):
    """The app's start-up, on the event loop that serves it (Ray Serve runs it once the replica
    is built, before any request): the ingress starts the work a restart left queued."""
    resume = getattr(app.state.ingress, "resume", None)
    if resume is not None:
        resume()
    yield


def build_app(ingress) -> FastAPI:
    """The FastAPI app serving `ingress` (an `Ingress`, or anything with its methods)."""
    app = FastAPI(title="avatar-serve", version="0.1.0", docs_url=None, redoc_url=None, openapi_url=None,
                  description=DESCRIPTION, lifespan=lifespan)
    app.state.ingress = ingress
    serving = ingress.cfg.serving
    app.add_middleware(Admission, cfg=serving.admission, body_timeout_s=serving.body_timeout_s)
    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(BodyTooSlow, body_too_slow)
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
    app.include_router(docs_router, dependencies=[Depends(require_key)])  # the docs follow the API's auth
    app.openapi = lambda: openapi(app, (api, admin, docs_router))
    return app


# ------------------------------------------------------------------ errors


async def api_error(_: Request, exc: ApiError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


async def body_too_slow(_: Request, exc: BodyTooSlow) -> JSONResponse:
    return JSONResponse(error_body("timeout_error", str(exc.detail)), status_code=408)


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
    """The client left before its request was read: nothing to answer, nothing went wrong here
    (the admission middleware logged its leaving, one INFO line, as for every request)."""
    return Response(status_code=499)


async def internal_error(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return JSONResponse(error_body("server_error", "internal error; see the server logs"), status_code=500)


# ------------------------------------------------------------------ routes

def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI responses for these error statuses, each the one error envelope."""
    out: dict[int | str, dict[str, Any]] = {}
    for code in codes:
        out[code] = {"model": ErrorResponse, "description": ERROR_TEXT[code]}
        if code in (429, 503):
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


@public.websocket("/v1/avatars/{avatar_id}/live")
async def live_session(websocket: WebSocket, avatar_id: str) -> None:
    """A live session (api/live.py; the protocol is in the app's description). Public here: the
    key is checked in the session, from the header or `access_token`, since browsers cannot set
    headers on a WebSocket."""
    ingress = websocket.app.state.ingress
    await websocket.accept()
    if not live_key_ok(websocket, ingress.cfg.serving):
        error = LiveError("unauthorized", "a valid API key is required (Authorization: Bearer <key>, or "
                                          "?access_token=<key>)")
        await websocket.send_json(error.event())
        await websocket.close(error.code, error.message)
        return

    async def receive():
        message = await websocket.receive()
        if message["type"] == "websocket.disconnect":
            return None
        return message["text"] if message.get("text") is not None else message.get("bytes") or b""

    async def send(message) -> None:
        try:
            await (websocket.send_bytes(message) if isinstance(message, bytes) else websocket.send_json(message))
        except (WebSocketDisconnect, RuntimeError, OSError):
            raise Gone() from None

    closing = await ingress.live(avatar_id, receive, send)
    if closing is not None:
        try:
            await websocket.close(*closing)
        except (WebSocketDisconnect, RuntimeError, OSError):  # the client went first
            pass


@api.get("/v1/models", response_model=ModelList, responses=errors(500))
async def list_models(ingress: IngressDep):
    models = await ingress.models()
    for card in models.data:  # the bounds a form needs (the web page reads them)
        card.limits = card.limits or ModelLimits.of(ingress.cfg)
    return models


@api.get("/v1/loras", response_model=LoraList, summary="The LoRAs a request's `loras` may name")
async def list_request_loras(ingress: IngressDep):
    return ingress.request_loras()


@api.post("/v1/videos", response_model=Job, summary="Create a video job (multipart or JSON)",
          openapi_extra={"requestBody": VIDEO_BODY}, responses=errors(400, 408, 413, 422, 429, 500, 503))
async def create_video(request: Request, ingress: IngressDep):
    fields, image, audio = await read_video_form(request, ingress)
    return await ingress.submit(fields, image, audio)


@api.post("/v1/videos/sync", response_class=Response, openapi_extra={"requestBody": VIDEO_BODY},
          summary="Generate a video and wait for the MP4 (multipart: prompt, input_reference, ...)",
          responses={200: {"content": {"video/mp4": {"schema": BINARY}}, "description": "the MP4",
                           "headers": {"X-Seed": {"description": "the seed used", "schema": {"type": "integer"}},
                                       "X-Job-Id": {"description": "the job's id", "schema": {"type": "string"}}}},
                     **errors(400, 408, 413, 422, 429, 500, 503, 504)})
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


@api.get("/v1/videos/{video_id}/stream", response_class=StreamingResponse, responses={**MP4, **errors(404, 409)},
         summary="The MP4 as it is made: a fragmented MP4 whose first bytes leave while the clip decodes")
async def stream_video_content(video_id: str, ingress: IngressDep):
    """Open any time after the job is created: the fMP4 pieces made so far, then each new one as
    the decoder makes it (the `first_fragment` event says when the first is there), until the
    job completes; the bytes are the finished file's, byte for byte. Of a completed job: its
    file. A job that fails while streaming ends the stream early; its record says why."""
    return StreamingResponse(ingress.content_stream(video_id), media_type="video/mp4",
                             headers={"Cache-Control": "no-store"})


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
                          "description": "`event:`, `id:` and `data:` (JSON) lines"}, **errors(404, 429, 503)},
         description="Every event has an `id`; a client that reconnects with `Last-Event-ID` gets the "
                     "events after it. Every stream ends with a final event (completed, failed or "
                     "cancelled). After a server restart mid-job, a re-queued job's stream starts with "
                     "`requeued` (its ids past the first run's), one that was not re-queued ends failed "
                     "(interrupted).")
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
                     **errors(400, 408, 413, 422, 429, 500, 503)})
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
                     **errors(400, 404, 408, 409, 413, 422, 429, 500, 503)})
async def create_speech(avatar_id: str, request: Request, ingress: IngressDep) -> StreamingResponse:
    ingress.avatar(avatar_id)  # 404 before reading the body
    limit = ingress.cfg.limits.max_audio_bytes
    if request.headers.get("content-type", "").startswith(("audio/", "application/octet-stream", "video/")):
        audio, fields = await read_body(request, limit, "audio"), {}
    else:
        fields, files = await read_form(request, {"audio": limit})
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
