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
import hashlib
import hmac
import json
import logging
import tempfile
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Callable, Literal

import numpy as np
from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from deployments.api.jobs import Avatar, Job, JobError, JobEvents, JobStore, new_job_id, sse
from deployments.api.protocol import (
    ApiError,
    LoraActivate,
    LoraRequest,
    VideoRequest,
    decode_image,
    error_body,
    resolve,
)
from deployments.common.errors import AudioError
from deployments.common.metrics import IngressMetrics
from deployments.common.payloads import StepRecord, VideoParams
from deployments.config import GraphConfig
from deployments.media.audio import decode_audio

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


def parse_face_box(value) -> list[int] | None:
    """"x1,y1,x2,y2" in pixels of the generated clip -> [x1, y1, x2, y2] (422 otherwise)."""
    if value in (None, ""):
        return None
    try:
        box = [int(float(v)) for v in str(value).split(",")]
    except ValueError:
        box = []
    if len(box) != 4 or box[0] >= box[2] or box[1] >= box[3] or min(box) < 0:
        raise ApiError(422, "face_box: x1,y1,x2,y2 in pixels with x1 < x2 and y1 < y2", "face_box")
    return box


async def read_limited(request: Request, limit: int) -> bytes:
    """A raw request body, refused with 413 once it passes `limit` bytes."""
    data = bytearray()
    async for chunk in request.stream():
        data += chunk
        if len(data) > limit:
            raise ApiError(413, f"the body is over the limit of {limit} bytes", "audio")
    return bytes(data)


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
    def __init__(self, encoder, high, low, decoder, cfg: GraphConfig, lipsync=None):
        self.encoder, self.high, self.low, self.decoder = encoder, high, low, decoder
        self.lipsync = lipsync  # None: a deployment without the lip-sync stage
        self.cfg = cfg
        self.metrics = IngressMetrics()
        self.store = JobStore(cfg.serving.storage_dir or tempfile.mkdtemp(prefix="avatar-serve-jobs-"))
        self.jobs: dict[str, Job] = {j.id: j for j in sorted(self.store.recover(), key=lambda j: j.created_at)}
        self.avatars: dict[str, Avatar] = {a.id: a for a in self.store.recover_avatars()}
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

    def prepare_audio(self, data: bytes | None, param: str = "audio"):
        """Uploaded speech -> float32 PCM, 16 kHz mono, or ApiError (decoded here, on the CPU, so a
        bad file never reaches the lip-sync stage)."""
        if data is None:
            return None
        if self.lipsync is None:
            raise ApiError(422, "this deployment has no lip-sync stage", param)
        if not data:
            raise ApiError(400, "the audio file is empty", param)
        if len(data) > self.cfg.limits.max_audio_bytes:
            raise ApiError(413, f"the audio is {len(data)} bytes; the limit is {self.cfg.limits.max_audio_bytes}", param)
        limit = self.cfg.stages.lipsync.max_audio_seconds
        try:
            pcm = decode_audio(data)
        except AudioError as exc:
            raise ApiError(400, f"not usable audio: {exc}", param) from None
        seconds = pcm.shape[0] / 16000
        if seconds > limit:
            raise ApiError(422, f"the audio is {seconds:.1f} s long; the limit is {limit:g} s", param)
        if seconds * self.cfg.stages.lipsync.fps < 1:
            raise ApiError(422, "the audio is shorter than one video frame", param)
        return pcm

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

    async def _denoised(self, params: VideoParams, image: np.ndarray, report: Progress):
        """encode -> high -> low: the final DenoiseState."""
        log.info("job %s: %dx%d, %d frames, %d steps, seed %d", params.job_id, params.width,
                 params.height, params.num_frames, params.num_inference_steps, params.seed)
        report("stage", stage="encode", state="started")
        cond = self.encoder.encode.remote(params, image)
        state = await self._denoise(self.high, cond, None, report)
        state = await self._denoise(self.low, cond, state, report)
        report("stage", stage="decode", state="started")
        return state

    async def run(self, params: VideoParams, image: np.ndarray, output: Literal["mp4", "frames"] = "mp4",
                  report: Progress | None = None, audio: np.ndarray | None = None) -> VideoResult:
        """encode -> high -> low -> decode (+ MP4 mux in the decoder, next to the frames); with
        `audio` (16 kHz PCM), the decoded clip goes straight to the lip-sync stage instead."""
        report = report or (lambda *a, **k: None)
        state = await self._denoised(params, image, report)
        if audio is not None:
            clip = self.decoder.decode.remote(state)
            report("stage", stage="lipsync", state="started")
            info = self.lipsync.create_avatar_from.remote(clip)
            mp4 = await self.lipsync.lipsync_mp4.remote(info, audio)
            if output == "frames":
                from deployments.media.video import decode_mp4

                return VideoResult(params=params, frames=decode_mp4(mp4)[0])
            return VideoResult(params=params, mp4=mp4)
        if output == "frames":
            frames = await self.decoder.decode.remote(state)
            return VideoResult(params=params, frames=frames.frames)
        return VideoResult(params=params, mp4=await self.decoder.decode_mp4.remote(state))

    async def generate(self, request: VideoRequest | dict, image: bytes | np.ndarray,
                       output: Literal["mp4", "frames"] = "mp4", audio: bytes | None = None) -> VideoResult:
        """Synchronous generation for DeploymentHandle callers:
        `await handle.generate.remote({...}, image_bytes)`; with `audio` (file bytes), lip-synced."""
        params, pixels = self.prepare(request, image)
        return await self.run(params, pixels, output, audio=self.prepare_audio(audio))

    # ------------------------------------------------------------------ jobs

    @property
    def capacity(self) -> int:
        return self.cfg.serving.max_running_jobs + self.cfg.serving.max_queued_jobs

    def _check_capacity(self) -> None:
        if len(self.waiting) + self.running >= self.capacity:
            raise ApiError(429, f"the job queue is full ({self.capacity} jobs); retry later", None,
                           type="rate_limit_error", headers={"Retry-After": str(self.cfg.serving.retry_after_s)})

    def submit(self, request: VideoRequest | dict, image: bytes | np.ndarray, audio: bytes | None = None) -> Job:
        """Validate and queue a job; raises ApiError (429 when the queue is full)."""
        params, pixels = self.prepare(request, image)
        pcm = self.prepare_audio(audio)
        self._check_capacity()
        job = Job(has_audio=pcm is not None, id=params.job_id, created_at=int(time.time()), model=self.cfg.name, prompt=params.prompt,
                  size=f"{params.width}x{params.height}", seconds=f"{params.num_frames / params.fps:g}",
                  num_frames=params.num_frames, fps=params.fps, seed=params.seed,
                  num_inference_steps=params.num_inference_steps)
        self.jobs[job.id] = job
        self.events[job.id] = JobEvents()
        self.waiting.append(job.id)
        self._update_queue()
        self.store.save(job)
        self.tasks[job.id] = asyncio.ensure_future(self._execute(job, params, pixels, pcm))
        self._expire()
        return job

    def _update_queue(self) -> None:
        for position, job_id in enumerate(self.waiting, start=1):
            job = self.jobs.get(job_id) or self.avatars.get(job_id)
            if job is None:  # deleted while queued; its task is being cancelled
                continue
            if job.queue_position != position:
                job.queue_position = position
                if job_id in self.events:
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
                    job.stage, job.progress = "denoise", max(job.progress, 5)
                    events.emit("stage", stage="encode", state="finished", progress=job.progress)
                job.step = data["step"]
                job.progress = 5 + int(85 * data["step"] / total)
                events.emit("step", step=data["step"], total=total, expert=data["expert"], progress=job.progress)
            else:
                job.stage = data["stage"]
                job.progress = max(job.progress, {"encode": 1, "decode": 90, "lipsync": 93}.get(data["stage"], 0))
                events.emit("stage", stage=data["stage"], state=data["state"], progress=job.progress)
        return report

    @asynccontextmanager
    async def _turn(self, record: Job | Avatar, save: Callable):
        """Wait for a running slot, mark `record` in progress, run the body under the job
        deadline, and always give the slot back (cancelled, failed or done)."""
        started = False
        try:
            await self._slot(record.id)
            started = True
            record.status, record.queue_position = "in_progress", None
            self._update_queue()
            save(record)
            async with asyncio.timeout(self.cfg.serving.job_timeout_s):
                yield
        finally:
            record.queue_position = None
            if record.id in self.waiting:
                self.waiting.remove(record.id)
            if started:
                self.running -= 1
            self.tasks.pop(record.id, None)
            self._update_queue()
            self._wake()

    async def _execute(self, job: Job, params: VideoParams, pixels: np.ndarray, audio=None) -> None:
        try:
            async with self._turn(job, self.store.save):
                result = await self.run(params, pixels, "mp4", self._progress(job), audio=audio)
            self.store.save_result(job.id, result.mp4)
            self._finish(job, "completed")
        except asyncio.CancelledError:
            self._finish(job, "cancelled")
        except Exception as exc:  # noqa: BLE001 - every failure ends the job with a reason
            log.error("job %s failed: %r", job.id, exc, exc_info=not isinstance(exc, TimeoutError))
            self._finish(job, "failed", failure(exc))

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
        # Newest first: by creation second, then by creation order within it (dict order).
        order = {job_id: i for i, job_id in enumerate(self.jobs)}
        jobs = sorted(self.jobs.values(), key=lambda j: (j.created_at, order[j.id]), reverse=True)
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

    # ------------------------------------------------------------------ avatars

    def _need_lipsync(self) -> None:
        if self.lipsync is None:
            raise ApiError(404, "this deployment has no lip-sync stage, so no avatars", None, type="not_found_error")

    @staticmethod
    def avatar_key(image: bytes, params: VideoParams, face_box, profile: str) -> str:
        settings = {k: v for k, v in vars(params).items() if k not in ("job_id",)}
        digest = hashlib.sha256(image)
        digest.update(json.dumps({"params": settings, "face_box": face_box, "profile": profile},
                                 sort_keys=True).encode())
        return "avatar_" + digest.hexdigest()[:32]

    def create_avatar(self, request: VideoRequest | dict, image: bytes, face_box=None) -> tuple[Avatar, bool]:
        """Queue the base clip + lip-sync preparation; the same inputs give the same avatar.
        -> (avatar, created). The seed defaults to 0 so that the request alone fixes the id."""
        self._need_lipsync()
        if isinstance(request, dict) and request.get("seed") is None:
            request = {**request, "seed": 0}
        params, pixels = self.prepare(request, image)
        key = self.avatar_key(image, params, face_box, self.cfg.name)
        existing = self.avatars.get(key)
        if existing is not None and existing.status not in ("failed", "cancelled"):
            return existing, False
        self._check_capacity()
        params = VideoParams(**{**vars(params), "job_id": key})
        avatar = Avatar(id=key, created_at=int(time.time()), model=self.cfg.name, prompt=params.prompt,
                        size=f"{params.width}x{params.height}", num_frames=params.num_frames, seed=params.seed)
        self.avatars[key] = avatar
        self.waiting.append(key)
        self._update_queue()
        self.store.save_avatar(avatar)
        self.tasks[key] = asyncio.ensure_future(self._prepare_avatar(avatar, params, pixels, face_box))
        return avatar, True

    async def _prepare_avatar(self, avatar: Avatar, params: VideoParams, pixels: np.ndarray, face_box) -> None:
        try:
            async with self._turn(avatar, self.store.save_avatar):
                state = await self._denoised(params, pixels, lambda *a, **k: None)
                clip = self.decoder.decode.remote(state)  # frames go decoder -> lip-sync directly
                info = await self.lipsync.create_avatar_from.remote(clip, face_box)
            avatar.lipsync_id, avatar.fps, avatar.cycle_frames = info.avatar_id, info.fps, 2 * info.num_frames
            avatar.status, avatar.ready_at = "ready", int(time.time())
        except asyncio.CancelledError:
            avatar.status = "cancelled"
        except Exception as exc:  # noqa: BLE001 - the avatar fails with a reason
            log.error("avatar %s failed: %r", avatar.id, exc)
            avatar.status, avatar.error = "failed", failure(exc)
        if avatar.id in self.avatars:  # not deleted meanwhile
            self.store.save_avatar(avatar)
        log.info("avatar %s %s", avatar.id, avatar.status)

    def avatar(self, avatar_id: str) -> Avatar:
        self._need_lipsync()
        try:
            return self.avatars[avatar_id]
        except KeyError:
            raise ApiError(404, f"no avatar {avatar_id!r}", "avatar_id", type="not_found_error") from None

    async def delete_avatar(self, avatar_id: str) -> dict:
        avatar = self.avatar(avatar_id)
        task = self.tasks.get(avatar_id)
        if task is not None:
            task.cancel()
        if avatar_id in self.waiting:
            self.waiting.remove(avatar_id)
            self._wake()
        self.avatars.pop(avatar_id)
        self.store.delete_avatar(avatar_id)
        if avatar.lipsync_id and not any(a.lipsync_id == avatar.lipsync_id for a in self.avatars.values()):
            await self.lipsync.delete_avatar.remote(avatar.lipsync_id)
        return {"id": avatar_id, "object": "avatar.deleted", "deleted": True}

    async def speech(self, avatar_id: str, audio: bytes | None, start_index: int = 0):
        """Validate, then start the lip-sync stream: -> (first fMP4 bytes, the rest as an async
        iterator). Errors before the first byte become HTTP errors; the first fragment is the
        time to first frame."""
        avatar = self.avatar(avatar_id)
        if audio is None:
            raise ApiError(422, "audio: an audio file is required", "audio")
        if avatar.status != "ready":
            raise ApiError(409, f"avatar {avatar_id} is {avatar.status}; speech needs it ready", "avatar_id",
                           type="conflict_error")
        pcm = self.prepare_audio(audio)
        stream = self.lipsync.options(stream=True).speak_fmp4.remote(avatar.lipsync_id, pcm, start_index=start_index)
        try:
            first = await stream.__anext__()
        except Exception as exc:  # noqa: BLE001
            cause = getattr(exc, "cause", None) or exc
            if type(cause).__name__ == "AvatarNotFound":
                raise ApiError(409, f"avatar {avatar_id} is no longer prepared on the lip-sync stage; "
                                    "delete and create it again", "avatar_id", type="conflict_error") from None
            raise

        async def rest():
            try:
                async for chunk in stream:
                    yield chunk
            except BaseException:
                stream.cancel()
                raise

        return first, rest()

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

    async def _read_form(self, request: Request, file_fields: dict[str, int]) -> tuple[dict, dict[str, bytes]]:
        """A multipart form or a JSON body -> (text fields, {file field: bytes}).

        `file_fields` maps each file field to its size limit; a file is read up to one byte past
        it, enough to refuse it (413) without reading it all. In JSON, files are base64 strings
        (or data: URLs)."""
        files: dict[str, bytes] = {}
        if request.headers.get("content-type", "").startswith("application/json"):
            try:
                body = await request.json()
            except ValueError:
                raise ApiError(400, "the body is not valid JSON", None) from None
            if not isinstance(body, dict):
                raise ApiError(400, "the JSON body must be an object", None)
            for name in file_fields:
                value = body.pop(name, None)
                if value is None:
                    continue
                if not isinstance(value, str):
                    raise ApiError(422, f"{name}: a base64 string (or data: URL) is required", name)
                try:
                    files[name] = base64.b64decode(value.split(",", 1)[-1] if value.startswith("data:") else value,
                                                   validate=True)
                except (binascii.Error, ValueError):
                    raise ApiError(400, f"{name}: not valid base64", name) from None
            return body, files
        try:
            form = await request.form()
        except Exception as exc:  # malformed multipart
            raise ApiError(400, f"could not parse the multipart form: {exc}", None) from None
        fields = {}
        for key, value in form.multi_items():
            if key in file_fields:
                if isinstance(value, str):
                    raise ApiError(422, f"{key}: must be a file upload", key)
                files[key] = await value.read(file_fields[key] + 1)
            elif not isinstance(value, str):
                raise ApiError(422, f"{key}: expected a text field, got a file", key)
            else:
                fields[key] = value
        return fields, files

    async def _video_request(self, request: Request) -> tuple[dict, bytes, bytes | None]:
        fields, files = await self._read_form(request, {"input_reference": self.cfg.limits.max_image_bytes,
                                                        "audio": self.cfg.limits.max_audio_bytes})
        if "input_reference" not in files:
            raise ApiError(422, "input_reference: an image file is required", "input_reference")
        return fields, files["input_reference"], files.get("audio")

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
            fields, image, audio = await self._video_request(request)
            params, pixels = self.prepare(fields, image)
            result = await self.run(params, pixels, "mp4", audio=self.prepare_audio(audio))
            return Response(content=result.mp4, media_type="video/mp4",
                            headers={"X-Seed": str(params.seed), "X-Job-Id": params.job_id})

        @app.post("/v1/videos", dependencies=auth, summary="Create a video job (multipart or JSON)")
        async def create_video(request: Request) -> JSONResponse:
            fields, image, audio = await self._video_request(request)
            return JSONResponse(self.submit(fields, image, audio).model_dump(), status_code=200)

        @app.post("/v1/avatars", dependencies=auth,
                  summary="Create an avatar: base clip + lip-sync preparation (idempotent for the same inputs)")
        async def post_avatar(request: Request) -> JSONResponse:
            self._need_lipsync()
            fields, image, audio = await self._video_request(request)
            if audio is not None:
                raise ApiError(422, "audio: avatars take no audio; send it to /v1/avatars/{id}/speech", "audio")
            face_box = parse_face_box(fields.pop("face_box", None))
            avatar, created = self.create_avatar(fields, image, face_box)
            return JSONResponse(avatar.model_dump(exclude={"lipsync_id"}), status_code=201 if created else 200)

        @app.get("/v1/avatars/{avatar_id}", dependencies=auth)
        async def get_avatar(avatar_id: str) -> dict:
            return self.avatar(avatar_id).model_dump(exclude={"lipsync_id"})

        @app.delete("/v1/avatars/{avatar_id}", dependencies=auth)
        async def delete_avatar(avatar_id: str) -> dict:
            return await self.delete_avatar(avatar_id)

        @app.post("/v1/avatars/{avatar_id}/speech", dependencies=auth, response_class=StreamingResponse,
                  responses={200: {"content": {"video/mp4": {}}}},
                  summary="Audio in (multipart `audio`, or a raw audio body), lip-synced fragmented MP4 streamed out")
        async def post_speech(avatar_id: str, request: Request) -> StreamingResponse:
            self.avatar(avatar_id)
            limit = self.cfg.limits.max_audio_bytes
            ctype = request.headers.get("content-type", "")
            if ctype.startswith(("audio/", "application/octet-stream", "video/")):
                audio, fields = await read_limited(request, limit), {}
            else:
                fields, files = await self._read_form(request, {"audio": limit})
                audio = files.get("audio")
            start = fields.get("start_index", "0")
            if not str(start).isdigit():
                raise ApiError(422, "start_index: a non-negative integer", "start_index")
            first, rest = await self.speech(avatar_id, audio, int(start))

            async def body():
                yield first
                async for chunk in rest:
                    yield chunk

            return StreamingResponse(body(), media_type="video/mp4", headers={"Cache-Control": "no-cache"})

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


