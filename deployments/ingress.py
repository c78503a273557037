"""Ingress: HTTP API and Python entry point; validates requests, runs jobs, drives the stage DAG.

The class imports nothing from Ray. It receives one handle per stage (Ray Serve
`DeploymentHandle`s in a cluster, `deployments.local.LocalHandle`s in-process) and calls
`handle.method.remote(...)`. The encoder's response is passed as an argument straight to both
experts (the conditioning never visits the ingress); the experts stream a record after every
denoise step, which is how the ingress reports progress and cancels between steps, and their
final latents (4 MB at 480p) come back through it to the next stage.

graph.py turns it into the HTTP ingress with `serve.ingress()`; Ray calls
`__serve_build_asgi_app__` once the replica is constructed. One ingress replica owns the job
store (keep `replicas: 1` for the ingress).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import logging
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Callable, Literal

import numpy as np
from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from deployments.config import GraphConfig
from deployments.jobs import FINAL, Job, JobError, JobEvents, JobStore, new_job_id, sse
from deployments.observability import IngressMetrics
from deployments.payloads import StepRecord, VideoParams
from deployments.protocol import (ApiError, LoraActivate, LoraRequest, VideoRequest, decode_image,
                                  error_body, resolve)

log = logging.getLogger("avatar_serve.ingress")

Progress = Callable[..., None]


@dataclass(frozen=True)
class VideoResult:
    """What the Python API returns: MP4 bytes or uint8 frames (F, H, W, 3), and the parameters
    actually used (the seed included, when the caller left it to the server)."""

    params: VideoParams
    mp4: bytes | None = None
    frames: np.ndarray | None = None


def validation_param(exc: ValidationError | RequestValidationError) -> tuple[str, str | None]:
    """First error of a pydantic validation -> (message, field name)."""
    err = exc.errors()[0]
    loc = [str(p) for p in err.get("loc", ()) if p not in ("body", "query", "path", "form")]
    param = loc[-1] if loc else None
    return (f"{param}: {err.get('msg')}" if param else str(err.get("msg"))), param


def failure(exc: BaseException) -> JobError:
    """A stage failure as the client sees it: a reason, no stack trace (that goes to the log)."""
    if isinstance(exc, TimeoutError):
        return JobError(code="timeout", message="the job ran past its deadline and was stopped")
    name = type(exc).__name__
    text = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
    if "ActorDied" in name or "ActorUnavailable" in name or "RayActorError" in name or "died" in text:
        return JobError(code="stage_unavailable", message=f"a stage replica died while running this job ({name})")
    return JobError(code="stage_error", message=f"{name}: {text}" if text else name)


class Ingress:
    def __init__(self, encoder, high, low, decoder, cfg: GraphConfig):
        self.encoder, self.high, self.low, self.decoder = encoder, high, low, decoder
        self.cfg = cfg
        self.metrics = IngressMetrics()
        self.store = JobStore(cfg.serving.storage_dir or tempfile.mkdtemp(prefix="avatar-serve-jobs-"))
        self.jobs: dict[str, Job] = {j.id: j for j in self.store.recover()}
        self.events: dict[str, JobEvents] = {}
        self.tasks: dict[str, asyncio.Task] = {}
        self.waiting: list[str] = []  # queued job ids, oldest first
        self.running = 0
        self._wakeup: asyncio.Event | None = None

    # ------------------------------------------------------------------ validation

    def prepare(self, request: VideoRequest | dict, image: bytes | np.ndarray,
                job_id: str = "") -> tuple[VideoParams, np.ndarray]:
        """Validate a request and its image; raises ApiError naming the field at fault."""
        if not isinstance(request, VideoRequest):
            try:
                request = VideoRequest.model_validate(request)
            except ValidationError as exc:
                message, param = validation_param(exc)
                raise ApiError(422, message, param) from None
        if request.model is not None and request.model != self.cfg.name:
            raise ApiError(422, f"model {request.model!r} is not served here; this deployment serves "
                                f"{self.cfg.name!r}", "model")
        params = resolve(request, self.cfg, job_id=job_id or new_job_id())
        if isinstance(image, (bytes, bytearray)):
            pixels = decode_image(bytes(image), self.cfg.limits.max_image_bytes)
        else:
            pixels = np.asarray(image)
            if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[-1] != 3:
                raise ApiError(422, "image must be uint8 (H, W, 3)", "input_reference")
        return params, pixels

    # ------------------------------------------------------------------ the video flow

    async def _denoise(self, expert, cond, state, report: Progress):
        """Stream one expert's steps; on cancellation the stage is told to stop."""
        stream = expert.options(stream=True).denoise_stream.remote(cond, state)
        try:
            async for item in stream:
                if isinstance(item, StepRecord):
                    report("step", step=item.index + 1, expert=item.expert)
                else:
                    state = item
        except BaseException:
            stream.cancel()
            raise
        return state

    async def run(self, params: VideoParams, image: np.ndarray,
                  output: Literal["mp4", "frames"] = "mp4", report: Progress | None = None) -> VideoResult:
        """encode -> high -> low -> decode (+ MP4 mux in the decoder, next to the frames)."""
        report = report or (lambda *a, **k: None)
        log.info("job %s: %dx%d, %d frames, %d steps, seed %d", params.job_id, params.width,
                 params.height, params.num_frames, params.num_inference_steps, params.seed)
        report("stage", stage="encode", state="started")
        cond = self.encoder.encode.remote(params, image)
        state = await self._denoise(self.high, cond, None, report)
        state = await self._denoise(self.low, cond, state, report)
        report("stage", stage="decode", state="started")
        if output == "frames":
            frames = await self.decoder.decode.remote(state)
            return VideoResult(params=params, frames=frames.frames)
        return VideoResult(params=params, mp4=await self.decoder.decode_mp4.remote(state))

    async def generate(self, request: VideoRequest | dict, image: bytes | np.ndarray,
                       output: Literal["mp4", "frames"] = "mp4") -> VideoResult:
        """Synchronous generation for DeploymentHandle callers:
        `await handle.generate.remote({...}, image_bytes)`."""
        params, pixels = self.prepare(request, image)
        return await self.run(params, pixels, output)

    # ------------------------------------------------------------------ jobs

    @property
    def capacity(self) -> int:
        return self.cfg.serving.max_running_jobs + self.cfg.serving.max_queued_jobs

    def submit(self, request: VideoRequest | dict, image: bytes | np.ndarray) -> Job:
        """Validate and queue a job; raises ApiError (429 when the queue is full)."""
        params, pixels = self.prepare(request, image)
        if len(self.waiting) + self.running >= self.capacity:
            raise ApiError(429, f"the job queue is full ({self.capacity} jobs); retry later", None,
                           type="rate_limit_error", headers={"Retry-After": str(self.cfg.serving.retry_after_s)})
        job = Job(id=params.job_id, created_at=int(time.time()), model=self.cfg.name, prompt=params.prompt,
                  size=f"{params.width}x{params.height}", seconds=f"{params.num_frames / params.fps:g}",
                  num_frames=params.num_frames, fps=params.fps, seed=params.seed,
                  num_inference_steps=params.num_inference_steps)
        self.jobs[job.id] = job
        self.events[job.id] = JobEvents()
        self.waiting.append(job.id)
        self._update_queue()
        self.store.save(job)
        self.tasks[job.id] = asyncio.ensure_future(self._execute(job, params, pixels))
        self._expire()
        return job

    def _update_queue(self) -> None:
        for position, job_id in enumerate(self.waiting, start=1):
            job = self.jobs[job_id]
            if job.queue_position != position:
                job.queue_position = position
                self.events[job_id].emit("queued", position=position)
        self.metrics.load(len(self.waiting), self.running)

    async def _slot(self, job_id: str) -> None:
        """Wait until this job is first in line and a running slot is free."""
        if self._wakeup is None:
            self._wakeup = asyncio.Event()
        while not (self.waiting and self.waiting[0] == job_id and self.running < self.cfg.serving.max_running_jobs):
            await self._wakeup.wait()
        self.waiting.pop(0)
        self.running += 1
        self._wake()

    def _wake(self) -> None:
        if self._wakeup is not None:
            self._wakeup.set()
            self._wakeup = asyncio.Event()

    def _progress(self, job: Job) -> Progress:
        events = self.events[job.id]
        total = job.num_inference_steps

        def report(kind: str, **data: Any) -> None:
            if kind == "step":
                if job.stage != "denoise":
                    events.emit("stage", stage="encode", state="finished")
                    job.stage = "denoise"
                job.step = data["step"]
                job.progress = 5 + int(85 * data["step"] / total)
                events.emit("step", step=data["step"], total=total, expert=data["expert"], progress=job.progress)
            else:
                job.stage = data["stage"]
                job.progress = max(job.progress, {"encode": 1, "decode": 90}.get(data["stage"], 0))
                events.emit("stage", stage=data["stage"], state=data["state"], progress=job.progress)
        return report

    async def _execute(self, job: Job, params: VideoParams, pixels: np.ndarray) -> None:
        started = False
        try:
            await self._slot(job.id)
            started = True
            job.status, job.queue_position = "in_progress", None
            self._update_queue()
            self.store.save(job)
            async with asyncio.timeout(self.cfg.serving.job_timeout_s):
                result = await self.run(params, pixels, "mp4", self._progress(job))
            self.store.save_result(job.id, result.mp4)
            self._finish(job, "completed")
        except asyncio.CancelledError:
            self._finish(job, "cancelled")
        except Exception as exc:  # noqa: BLE001 - every failure ends the job with a reason
            log.error("job %s failed: %r", job.id, exc, exc_info=not isinstance(exc, TimeoutError))
            self._finish(job, "failed", failure(exc))
        finally:
            if job.id in self.waiting:
                self.waiting.remove(job.id)
            if started:
                self.running -= 1
            self.tasks.pop(job.id, None)
            self._update_queue()
            self._wake()

    def _finish(self, job: Job, status: str, error: JobError | None = None) -> None:
        job.status, job.error, job.completed_at = status, error, int(time.time())
        job.queue_position = None
        if status == "completed":
            job.progress = 100
            job.expires_at = int(job.completed_at + self.cfg.serving.result_ttl_s)
        if job.id in self.jobs:  # not deleted meanwhile
            self.store.save(job)
        self.metrics.finished(status)
        events = self.events.get(job.id)
        if events is not None:
            data = {"status": status, "progress": job.progress}
            if error is not None:
                data["error"] = error.model_dump()
            events.emit(status, **data)
            events.close()
        log.info("job %s %s%s", job.id, status, f": {error.message}" if error else "")

    def _expire(self) -> None:
        for job_id in self.store.expire(self.jobs, self.cfg.serving.result_ttl_s, self.cfg.serving.max_result_bytes):
            self.jobs.pop(job_id, None)
            self.events.pop(job_id, None)

    def job(self, job_id: str) -> Job:
        try:
            return self.jobs[job_id]
        except KeyError:
            raise ApiError(404, f"no video job {job_id!r}", "video_id", type="not_found_error") from None

    def list_jobs(self, limit: int = 20, after: str | None = None) -> dict:
        jobs = sorted(self.jobs.values(), key=lambda j: (j.created_at, j.id), reverse=True)
        if after is not None:
            ids = [j.id for j in jobs]
            if after not in ids:
                raise ApiError(422, f"after: no video job {after!r}", "after")
            jobs = jobs[ids.index(after) + 1:]
        page = jobs[:limit]
        return {"object": "list", "data": [j.model_dump() for j in page], "has_more": len(jobs) > limit,
                "first_id": page[0].id if page else None, "last_id": page[-1].id if page else None}

    def cancel_or_delete(self, job_id: str) -> dict:
        """DELETE: cancels a queued or running job, deletes a finished one."""
        job = self.job(job_id)
        if not job.final:
            task = self.tasks.get(job_id)
            if task is not None:
                # The job's task ends at its next await (queued: at once; running: the expert stops
                # before its next step) and its handler records the cancellation.
                task.cancel()
                return {**job.model_dump(), "status": "cancelled"}
            self._finish(job, "cancelled")
            return job.model_dump()
        self.jobs.pop(job_id)
        self.events.pop(job_id, None)
        self.store.delete(job_id)
        return {"id": job_id, "object": "video.deleted", "deleted": True}

    def content_path(self, job_id: str):
        job = self.job(job_id)
        if job.status != "completed":
            raise ApiError(409, f"video {job_id} is {job.status}; content exists once it is completed",
                           "video_id", type="conflict_error")
        path = self.store.result_path(job_id)
        if not path.exists():
            raise ApiError(404, f"the result of {job_id} has expired", "video_id", type="not_found_error")
        return path

    async def follow(self, job_id: str):
        """Progress events of a job (replayed from its start); a finished job's final state only."""
        job = self.job(job_id)
        events = self.events.get(job_id)
        if events is None:  # finished before this ingress started
            yield {"event": job.status, "status": job.status, "progress": job.progress,
                   **({"error": job.error.model_dump()} if job.error else {})}
            return
        async for event in events.follow():
            yield event

    # ------------------------------------------------------------------ LoRA admin

    def _experts(self, target: str) -> list:
        return [self.high, self.low] if target == "both" else [self.high if target == "high" else self.low]

    async def _on_experts(self, target: str, call) -> dict:
        """Run `call(handle)` on the experts `target` names (only those), mapping their refusals."""
        try:
            results = [await call(h) for h in self._experts(target)]
        except Exception as exc:  # noqa: BLE001 - stage errors arrive wrapped by Ray
            cause = getattr(exc, "cause", None) or exc
            name = type(cause).__name__
            if name == "LoraBusyError":
                raise ApiError(409, str(cause), None, type="conflict_error") from None
            if name in ("LoraError", "FileNotFoundError", "MissingWeightsError"):
                raise ApiError(422, str(cause), "path" if name != "LoraError" else None) from None
            raise
        return {r["role"]: r for r in results}

    async def load_lora(self, req: LoraRequest) -> dict:
        return await self._on_experts(req.target, lambda h: h.load_lora.remote(req.name, req.path, req.strength,
                                                                                 req.target))

    async def activate_loras(self, req: LoraActivate) -> dict:
        return await self._on_experts(req.target, lambda h: h.activate_loras.remote(req.names, req.strengths))

    async def remove_lora(self, name: str, target: str = "both") -> dict:
        return await self._on_experts(target, lambda h: h.remove_lora.remote(name))

    async def list_loras(self) -> dict:
        return await self._on_experts("both", lambda h: h.list_loras.remote())

    def check_health(self) -> None:
        if not self.store.jobs_dir.is_dir():
            raise RuntimeError(f"job storage {self.store.root} is gone")

    # ------------------------------------------------------------------ HTTP

    async def _read_video_form(self, request: Request) -> tuple[dict, bytes | None]:
        """A multipart form or a JSON body -> (fields, image bytes or None)."""
        if request.headers.get("content-type", "").startswith("application/json"):
            try:
                body = await request.json()
            except ValueError:
                raise ApiError(400, "the body is not valid JSON", None) from None
            if not isinstance(body, dict):
                raise ApiError(400, "the JSON body must be an object", None)
            ref = body.pop("input_reference", None)
            if ref is None:
                return body, None
            if not isinstance(ref, str):
                raise ApiError(422, "input_reference: a base64 image (or data: URL) is required", "input_reference")
            try:
                return body, base64.b64decode(ref.split(",", 1)[-1] if ref.startswith("data:") else ref, validate=True)
            except (binascii.Error, ValueError):
                raise ApiError(400, "input_reference: not valid base64", "input_reference") from None
        try:
            form = await request.form()
        except Exception as exc:  # malformed multipart
            raise ApiError(400, f"could not parse the multipart form: {exc}", None) from None
        upload = form.get("input_reference")
        fields = {k: v for k, v in form.multi_items() if k != "input_reference"}
        for key, value in fields.items():
            if not isinstance(value, str):
                raise ApiError(422, f"{key}: expected a text field, got a file", key)
        if upload is None:
            return fields, None
        if isinstance(upload, str):
            raise ApiError(422, "input_reference: must be an image file upload", "input_reference")
        return fields, await upload.read(self.cfg.limits.max_image_bytes + 1)

    async def _video_request(self, request: Request) -> tuple[dict, bytes]:
        fields, image = await self._read_video_form(request)
        if image is None:
            raise ApiError(422, "input_reference: an image file is required", "input_reference")
        return fields, image

    def _require_key(self, request: Request) -> None:
        keys = self.cfg.serving.api_keys
        if not keys:
            return
        header = request.headers.get("authorization", "")
        token = header[7:].strip() if header.lower().startswith("bearer ") else ""
        if not token or not any(hmac.compare_digest(token, k) for k in keys):
            raise ApiError(401, "a valid API key is required (Authorization: Bearer <key>)", None,
                           type="authentication_error", headers={"WWW-Authenticate": "Bearer"})

    def build_app(self) -> FastAPI:
        app = FastAPI(title="avatar-serve", version="0.1.0",
                      description="Talking-avatar video: Wan2.2 I2V stages on Ray Serve.")
        auth = [Depends(self._require_key)]

        @app.exception_handler(ApiError)
        async def _api_error(_: Request, exc: ApiError):
            return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

        @app.exception_handler(RequestValidationError)
        async def _validation(_: Request, exc: RequestValidationError):
            message, param = validation_param(exc)
            return JSONResponse(error_body("invalid_request_error", message, param), status_code=422)

        @app.exception_handler(StarletteHTTPException)
        async def _http(_: Request, exc: StarletteHTTPException):
            kind = {404: "not_found_error", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
            return JSONResponse(error_body(kind, str(exc.detail)), status_code=exc.status_code,
                                headers=getattr(exc, "headers", None))

        @app.exception_handler(Exception)
        async def _internal(request: Request, exc: Exception):
            log.exception("unhandled error on %s %s", request.method, request.url.path)
            return JSONResponse(error_body("server_error", "internal error; see the server logs"),
                                status_code=500)

        @app.get("/healthz")
        async def healthz() -> dict[str, Any]:
            return {"status": "ok", "profile": self.cfg.name}

        @app.get("/v1/models", dependencies=auth)
        async def models() -> dict[str, Any]:
            loras = await self.list_loras()
            return {"object": "list", "data": [{
                "id": self.cfg.name, "object": "model", "owned_by": "avatar-serve",
                "description": self.cfg.description,
                "loras": {role: info["active"] for role, info in loras.items()}}]}

        @app.get("/v1/admin/loras", dependencies=auth)
        async def get_loras() -> dict:
            return await self.list_loras()

        @app.post("/v1/admin/loras", dependencies=auth, summary="Load a LoRA onto the high, low or both experts")
        async def post_lora(req: LoraRequest) -> dict:
            return await self.load_lora(req)

        @app.post("/v1/admin/loras/activate", dependencies=auth)
        async def post_activate(req: LoraActivate) -> dict:
            return await self.activate_loras(req)

        @app.delete("/v1/admin/loras/{name}", dependencies=auth)
        async def delete_lora(name: str, target: Literal["high", "low", "both"] = "both") -> dict:
            return await self.remove_lora(name, target)

        @app.post("/v1/videos/sync", dependencies=auth, response_class=Response,
                  responses={200: {"content": {"video/mp4": {}}}},
                  summary="Generate a video and wait for the MP4 (multipart: prompt, input_reference, ...)")
        async def video_sync(request: Request) -> Response:
            fields, image = await self._video_request(request)
            params, pixels = self.prepare(fields, image)
            result = await self.run(params, pixels, "mp4")
            return Response(content=result.mp4, media_type="video/mp4",
                            headers={"X-Seed": str(params.seed), "X-Job-Id": params.job_id})

        @app.post("/v1/videos", dependencies=auth, summary="Create a video job (multipart or JSON)")
        async def create_video(request: Request) -> JSONResponse:
            fields, image = await self._video_request(request)
            return JSONResponse(self.submit(fields, image).model_dump(), status_code=200)

        @app.get("/v1/videos", dependencies=auth)
        async def list_videos(limit: int = Query(20, ge=1, le=100), after: str | None = None) -> dict:
            return self.list_jobs(limit, after)

        @app.get("/v1/videos/{video_id}", dependencies=auth)
        async def get_video(video_id: str) -> dict:
            return self.job(video_id).model_dump()

        @app.delete("/v1/videos/{video_id}", dependencies=auth)
        async def delete_video(video_id: str) -> dict:
            return self.cancel_or_delete(video_id)

        @app.get("/v1/videos/{video_id}/content", dependencies=auth, response_class=FileResponse,
                 responses={200: {"content": {"video/mp4": {}}}})
        async def video_content(video_id: str):
            return FileResponse(self.content_path(video_id), media_type="video/mp4",
                                filename=f"{video_id}.mp4")

        @app.get("/v1/videos/{video_id}/events", dependencies=auth, summary="Server-sent progress events")
        async def video_events(video_id: str) -> StreamingResponse:
            self.job(video_id)  # 404 before the stream starts

            async def stream():
                async for event in self.follow(video_id):
                    yield sse(event)

            return StreamingResponse(stream(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})

        return app

    def __serve_build_asgi_app__(self) -> FastAPI:
        return self.build_app()


__all__ = ["Ingress", "VideoResult", "FINAL"]
