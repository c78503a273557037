"""Ingress: the typed Python API of the graph -- what a DeploymentHandle caller sees -- and the
orchestration of the stage DAG behind it.

The class imports nothing from Ray and nothing of HTTP or torch. It receives one handle per stage
(Ray Serve `DeploymentHandle`s in a cluster, `deployments.local.LocalHandle`s in-process) and calls
`handle.method.remote(...)`. The encoder's response is passed as an argument straight to both
experts (the conditioning never visits the ingress); the experts stream a record after every
denoise step, which is how the ingress reports progress and cancels between steps, and their
final latents (4 MB at 480p) come back through it to the next stage.

HTTP is a skin over these methods: deployments/api/routes.py, attached in graph.py. Work that
runs stages waits in one JobQueue (deployments/api/queue.py); jobs and avatars are records in
deployments/api/jobs.py. One ingress replica owns them (keep `replicas: 1` for the ingress).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import tempfile
import time
from collections.abc import AsyncIterator
from typing import Literal

import numpy as np
from pydantic import ValidationError

from deployments.api.content import GrowingContent
from deployments.api.flow import VideoFlow, VideoResult
from deployments.api.jobs import AvatarRecord, JobStore, Records, job_failed, new_job_id
from deployments.api.live import LiveError, LiveSession, Receive, Send
from deployments.api.lora_request import used_loras
from deployments.api.loras import LoraAdmin
from deployments.api.protocol import (
    ApiError,
    Avatar,
    AvatarRequest,
    Deleted,
    Job,
    ModelCard,
    ModelList,
    VideoList,
    VideoRequest,
    decode_image,
    invalid,
    resolve,
)
from deployments.api.queue import JobQueue, Progress, cancel_on_exit
from deployments.api.requeue import Inputs, keep, plan
from deployments.api.retry import StageRetries
from deployments.api.webhooks import Webhooks
from deployments.common.errors import AudioError, AudioLengthError, AvatarNotFound, unwrap
from deployments.common.metrics import IngressMetrics
from deployments.common.payloads import Speech, VideoParams
from deployments.config import GraphConfig
from deployments.media.audio import admit_speech, frames_for_samples

log = logging.getLogger("avatar_serve.ingress")

def check_face_box(box, params: VideoParams) -> None:
    """A face box must lie inside the generated clip and be big enough to hold a face."""
    if box is None:
        return
    x1, y1, x2, y2 = box
    if x2 > params.width or y2 > params.height:
        raise ApiError(422, f"face_box {x1},{y1},{x2},{y2} is outside the {params.width}x{params.height} clip",
                       "face_box")
    if min(x2 - x1, y2 - y1) < MIN_FACE_BOX:
        raise ApiError(422, f"face_box: at least {MIN_FACE_BOX} pixels wide and high", "face_box")


MIN_FACE_BOX = 8  # pixels; MuseTalk resizes the box to a 256x256 crop


async def _file_pieces(path, size: int = 1 << 20) -> AsyncIterator[bytes]:
    fh = await asyncio.to_thread(open, path, "rb")
    try:
        while piece := await asyncio.to_thread(fh.read, size):
            yield piece
    finally:
        fh.close()


class Ingress(VideoFlow, LoraAdmin):
    def __init__(self, encoder, high, low, decoder, cfg: GraphConfig, lipsync=None, turn_lipsync=None):
        self.encoder, self.high, self.low, self.decoder = encoder, high, low, decoder
        self.lipsync = lipsync  # None: a deployment without the lip-sync stage
        # The handle a talk turn streams through (graph.py gives turns their own transport, apart
        # from the stage calls that carry tensors); None: the lip-sync handle itself.
        self.turn_lipsync = turn_lipsync or lipsync
        self.cfg = cfg
        serving = cfg.serving
        self.metrics = IngressMetrics()
        store = JobStore(serving.storage_dir or tempfile.mkdtemp(prefix="avatar-serve-jobs-"))  # (profiles fill it)
        self.queue = JobQueue(serving.max_running_jobs, serving.max_queued_jobs, serving.retry_after_s,
                              serving.job_timeout_s, self.metrics)
        self.records = Records(store, serving.result_ttl_s, serving.max_result_bytes, on_expire=self.queue.forget)
        self.contents: dict[str, GrowingContent] = {}  # the MP4s of jobs running now, as they are made
        # What an earlier ingress left unfinished: re-queued or failed now, started by resume().
        # Before the webhooks' sweep: the jobs plan() fails are final without queue.finish, so
        # only that sweep sends their webhooks.
        limit = serving.requeue_max_jobs
        self._requeued = plan(self.records, self.queue.capacity if limit is None else limit)
        self.webhooks = Webhooks(serving.webhooks, self.records.save)
        self.queue.on_finish = self.webhooks.finished
        self.webhooks.resume(self.records.jobs.values())  # deliveries a restart interrupted
        self.turns = 0  # talk turns streaming now (admitted up to cfg.max_talk_turns)
        self.live_sessions = 0  # live sessions open now (admitted up to cfg.max_live_sessions)

    # ------------------------------------------------------------------ validation

    def prepare(self, request: VideoRequest | dict, image: bytes | np.ndarray,
                job_id: str = "") -> tuple[VideoParams, np.ndarray]:
        """Validate a request and its image; raises ApiError naming the field at fault."""
        request = self.video_request(request)
        if request.model is not None and request.model != self.cfg.name:
            raise ApiError(422, f"model {request.model!r} is not served here; this deployment serves "
                                f"{self.cfg.name!r}", "model")
        if isinstance(image, (bytes, bytearray)):
            limits = self.cfg.limits
            pixels = decode_image(bytes(image), limits.max_image_bytes, limits.image_pixels,
                                  fit=(2 * limits.max_width, 2 * limits.max_height))
        else:
            pixels = np.asarray(image)
            if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[-1] != 3:
                raise ApiError(422, "image must be uint8 (H, W, 3)", "input_reference")
        params = resolve(request, self.cfg, request_id=job_id or new_job_id(),
                         image_size=(pixels.shape[1], pixels.shape[0]))
        return params, pixels

    @staticmethod
    def video_request(request: VideoRequest | dict) -> VideoRequest:
        if isinstance(request, VideoRequest):
            return request
        try:
            return VideoRequest.model_validate(request)
        except ValidationError as exc:
            raise invalid(exc) from None

    def prepare_audio(self, data: bytes | None, param: str = "audio") -> Speech | None:
        """Uploaded speech -> admitted Speech (float32 PCM, 16 kHz mono), or ApiError. Decoded and
        checked here, on the CPU, stopping once it passes the limit, so a bad file never reaches
        the lip-sync stage, which takes the Speech as checked."""
        if data is None:
            return None
        if self.lipsync is None:
            raise ApiError(422, "this deployment has no lip-sync stage", param)
        limits = self.cfg.limits
        if not data:
            raise ApiError(400, "the audio file is empty", param)
        if len(data) > limits.max_audio_bytes:
            raise ApiError(413, f"the audio is {len(data)} bytes; the limit is {limits.max_audio_bytes}", param)
        try:
            return admit_speech(data, limits.max_audio_seconds, self.cfg.stages.lipsync.fps)
        except AudioLengthError as exc:
            raise ApiError(422, f"{param}: {exc}", param) from None
        except AudioError as exc:
            raise ApiError(400, f"not usable audio: {exc}", param) from None

    async def _validated(self, request: VideoRequest | dict, image: bytes | np.ndarray,
                         audio: bytes | None = None) -> tuple[VideoParams, np.ndarray, Speech | None]:
        """`prepare` and `prepare_audio` in a worker thread: decoding an upload never holds up the
        event loop (other requests, /healthz)."""
        params, pixels = await asyncio.to_thread(self.prepare, request, image)
        return params, pixels, await asyncio.to_thread(self.prepare_audio, audio)

    def _job(self, params: VideoParams, audio: Speech | None) -> Job:
        """The job's record says what it delivers: with audio, the lip-synced clip (the lip-sync
        stage's fps, as many frames as the audio covers), not the base clip it is made from."""
        fps, frames = params.fps, params.num_frames
        if audio is not None:
            fps = self.cfg.stages.lipsync.fps
            frames = frames_for_samples(audio.num_samples, fps)
        return Job(id=params.request_id, created_at=int(time.time()), model=self.cfg.name, prompt=params.prompt,
                   size=f"{params.width}x{params.height}", seconds=f"{frames / fps:g}", num_frames=frames, fps=fps,
                   seed=params.seed, num_inference_steps=params.num_inference_steps, has_audio=audio is not None,
                   loras=used_loras(params))

    def resume(self) -> None:
        """Start the work an earlier ingress left unfinished and `plan` re-queued, ahead of any new
        work; each stream's first event says so. Needs the event loop: the HTTP app's start-up
        calls it (Serve runs it once the replica is built, before any request), and so does the
        first submit of a caller without the app. Later calls do nothing."""
        requeued, self._requeued = self._requeued, []
        for record, inputs in requeued:
            if record.final or not self.records.knows(record):  # cancelled or deleted meanwhile
                continue
            note = {"event": "requeued", "reason": "restart", "attempt": record.attempt, "progress": 0}
            start = self._start_avatar if isinstance(record, AvatarRecord) else self._start_job
            start(record, inputs, note)

    async def generate(self, request: VideoRequest | dict, image: bytes | np.ndarray,
                       output: Literal["mp4", "frames"] = "mp4", audio: bytes | None = None) -> VideoResult:
        """Synchronous generation for DeploymentHandle callers and POST /v1/videos/sync:
        `await handle.generate.remote({...}, image_bytes)`; with `audio` (file bytes), lip-synced.
        It waits in the same queue as jobs (429 when full, the same deadline), unlisted."""
        self.resume()
        request = self.video_request(request)
        if request.callback_url is not None:
            raise ApiError(422, "callback_url: only a video job (POST /v1/videos, submit) takes one; this "
                                "call returns the result itself", "callback_url")
        params, pixels, pcm = await self._validated(request, image, audio)
        self.queue.admit()
        job, result = self._job(params, pcm), {}

        async def work(progress: Progress) -> None:
            result["video"] = await self.run(params, pixels, output, progress, audio=pcm)

        task = self.queue.start(job, work, lambda record: None, total_steps=params.num_inference_steps)
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:  # the caller left: so does its job
            self.queue.cancel(job.id)
            raise
        if job.status != "completed":
            raise job_failed(job)
        return result["video"]

    # ------------------------------------------------------------------ video jobs

    async def submit(self, request: VideoRequest | dict, image: bytes | np.ndarray,
                     audio: bytes | None = None) -> Job:
        """Validate and queue a video job; raises ApiError (429 when the queue is full)."""
        self.resume()
        self.webhooks.flush()
        request = self.video_request(request)
        params, pixels, pcm = await self._validated(request, image, audio)
        webhook = await self.webhooks.check(request.callback_url)  # 422 naming callback_url
        self.queue.admit()
        job, inputs = self._job(params, pcm), Inputs(params, pixels, pcm)
        job.webhook = webhook
        self.records.add(job)
        self._start_job(job, inputs)
        self.records.expire()
        await keep(self.records, job, inputs)
        return job

    def _start_job(self, job: Job, inputs: Inputs, first_event: dict | None = None) -> None:
        content = self.contents[job.id] = GrowingContent()

        async def work(progress: Progress) -> None:
            def on_piece(piece: bytes) -> None:
                if not content.pieces:
                    progress.first_fragment(len(piece))
                content.append(piece)

            try:
                result = await self.run(inputs.params, inputs.pixels, "mp4", progress, audio=inputs.audio,
                                        on_piece=on_piece)
                if inputs.audio is not None:  # lip-synced: the whole file at the end
                    on_piece(result.mp4)
                self.records.save_result(job, result.mp4)
            finally:
                # Followers end here; GET .../stream reads the saved file from now on (the record
                # turns final right after, with no await in between).
                content.end()
                self.contents.pop(job.id, None)

        self.queue.start(job, work, self.records.save, inputs.params.num_inference_steps, first_event)

    def job(self, job_id: str) -> Job:
        return self.records.job(job_id)

    def list_jobs(self, limit: int = 20, after: str | None = None) -> VideoList:
        return self.records.list_jobs(limit, after)

    def cancel_or_delete(self, job_id: str) -> Job | Deleted:
        """DELETE: cancels a queued or running job (the expert stops before its next step),
        deletes a finished one."""
        job = self.records.job(job_id)
        if not job.final:
            if self.queue.cancel(job_id):
                return job.model_copy(update={"status": "cancelled"})
            self.queue.finish(job, "cancelled", self.records.save)
            return job
        self.queue.forget(job_id)
        return self.records.delete_job(job_id)

    def content_stream(self, job_id: str) -> AsyncIterator[bytes]:
        """A job's MP4 as it is made: the pieces so far, then each new one, until it completes;
        a completed job's whole file (404 when expired; 409 failed or cancelled)."""
        job = self.records.job(job_id)
        content = self.contents.get(job_id)
        if content is not None and not job.final:
            return content.follow()
        return _file_pieces(self.records.content_path(job_id))

    def content_path(self, job_id: str):
        """The finished MP4's path on the ingress host (409 before completion, 404 when expired)."""
        return self.records.content_path(job_id)

    def follow(self, job_id: str, after: int = -1) -> AsyncIterator[dict]:
        """A job's progress events, replayed from its start (or after event id `after`), until its
        final one."""
        return self.queue.follow(self.records.job(job_id), after)

    # ------------------------------------------------------------------ avatars

    def _need_lipsync(self) -> None:
        if self.lipsync is None:
            raise ApiError(404, "this deployment has no lip-sync stage, so no avatars", None, type="not_found_error")

    @staticmethod
    def avatar_id_for(image: bytes, params: VideoParams, face_box, profile: str) -> str:
        """The public id of an avatar: a hash of everything that makes it (the same inputs give
        the same avatar). Not the lip-sync stage's `prepared_id`, a hash of the clip it prepared."""
        settings = {k: v for k, v in vars(params).items() if k != "request_id"}
        digest = hashlib.sha256(image)
        digest.update(json.dumps({"params": settings, "face_box": face_box and list(face_box),
                                  "profile": profile}, sort_keys=True).encode())
        return "avatar_" + digest.hexdigest()[:32]

    async def create_avatar(self, request: AvatarRequest | dict, image: bytes) -> tuple[Avatar, bool]:
        """Queue the base clip + lip-sync preparation; the same inputs give the same avatar.
        -> (avatar, created)."""
        self._need_lipsync()
        if not isinstance(request, AvatarRequest):
            try:
                request = AvatarRequest.model_validate(request)
            except ValidationError as exc:
                raise invalid(exc) from None
        params, pixels, _ = await self._validated(request.video(), image)
        check_face_box(request.face_box, params)
        key = self.avatar_id_for(image, params, request.face_box, self.cfg.name)
        self.resume()
        existing = self.records.avatars.get(key)
        if existing is not None and existing.status not in ("failed", "cancelled"):
            return existing.public(), False
        self.queue.admit()
        params = VideoParams(**{**vars(params), "request_id": key})
        avatar = AvatarRecord(id=key, created_at=int(time.time()), model=self.cfg.name, prompt=params.prompt,
                              size=f"{params.width}x{params.height}", num_frames=params.num_frames,
                              seed=params.seed, loras=used_loras(params))
        inputs = Inputs(params, pixels, face_box=request.face_box)
        self.records.add(avatar)
        self._start_avatar(avatar, inputs)
        await keep(self.records, avatar, inputs)
        return avatar.public(), True

    def _start_avatar(self, avatar: AvatarRecord, inputs: Inputs, first_event: dict | None = None) -> None:
        async def work(progress: Progress) -> None:
            retries = StageRetries(avatar.id, progress, self.cfg.serving.stage_retries)
            async with cancel_on_exit() as calls:
                state = await self._denoised(inputs.params, inputs.pixels, progress, calls, retries)
                progress.stage("lipsync")  # decoder -> lip-sync directly
                info = await self._lipsynced(state, None, "create_avatar", calls, retries, inputs.face_box)
            avatar.prepared_id, avatar.fps, avatar.cycle_frames = info.prepared_id, info.fps, 2 * info.num_frames
            avatar.ready_at = int(time.time())

        self.queue.start(avatar, work, self.records.save, inputs.params.num_inference_steps, first_event)

    def avatar(self, avatar_id: str) -> Avatar:
        self._need_lipsync()
        return self.records.avatar(avatar_id).public()

    async def delete_avatar(self, avatar_id: str) -> Deleted:
        """Remove an avatar from the ingress and, unless another avatar shares its preparation,
        from the lip-sync stage; a queued or running preparation is cancelled."""
        self._need_lipsync()
        self.records.avatar(avatar_id)
        self.queue.cancel(avatar_id)
        avatar = self.records.delete_avatar(avatar_id)
        self.queue.forget(avatar_id)
        if avatar.prepared_id and not self.records.shares_prepared_id(avatar.prepared_id):
            await self.lipsync.delete_avatar.remote(avatar.prepared_id)
        return Deleted(id=avatar_id, object="avatar.deleted")

    async def speak(self, avatar_id: str, audio: bytes | None, start_index: int = 0) -> AsyncIterator[bytes]:
        """A talk turn: audio file bytes in, lip-synced fragmented MP4 out as it is made (an async
        generator; handle callers use `options(stream=True)`). Validation runs before the first
        piece, so its errors come before any byte."""
        started = time.perf_counter()
        self._need_lipsync()
        avatar = self.records.avatar(avatar_id)
        if audio is None:
            raise ApiError(422, "audio: an audio file is required", "audio")
        if avatar.status != "ready":
            raise ApiError(409, f"avatar {avatar_id} is {avatar.status}; speech needs it ready", "avatar_id",
                           type="conflict_error")
        pcm = await asyncio.to_thread(self.prepare_audio, audio)  # decoded off the event loop
        decoded = time.perf_counter() - started
        self.metrics.observe_phase("audio_decode", decoded)
        if self.turns >= self.cfg.max_talk_turns:
            # A live turn that waits is no use: say when to try again instead.
            raise ApiError(429, f"{self.turns} talk turns are streaming, the most this deployment takes; "
                                "retry shortly", None, type="rate_limit_error",
                           headers={"Retry-After": str(self.cfg.serving.turn_retry_after_s)})
        self.turns += 1
        self.metrics.talk_turns(self.turns)
        stream, first_byte, sent = None, None, 0
        try:
            stream = self.turn_lipsync.options(stream=True).stream.remote(avatar.prepared_id, pcm,
                                                                          start_index=start_index)
            async for chunk in stream:
                if first_byte is None:
                    first_byte = time.perf_counter() - started
                    self.metrics.observe_phase("first_byte", first_byte)
                sent += len(chunk)
                yield chunk
        except Exception as exc:
            if isinstance(unwrap(exc), AvatarNotFound):
                raise ApiError(409, f"avatar {avatar_id} is no longer prepared on the lip-sync stage; "
                                    "delete and create it again", "avatar_id", type="conflict_error") from None
            raise
        finally:
            self.turns -= 1
            self.metrics.talk_turns(self.turns)
            if stream is not None:
                stream.cancel()  # the client left (or the turn ended): stop the stage's generator
            # Exact times per turn for operators (the metrics keep histogram buckets only); the
            # lip-sync stage logs its own phases of the same turn.
            log.info("turn on %s: audio decode %.3f s, first byte %s, %d bytes in %.2f s", avatar_id, decoded,
                     "none" if first_byte is None else f"{first_byte:.3f} s", sent, time.perf_counter() - started)

    # ------------------------------------------------------------------ live sessions

    async def live(self, avatar_id: str, receive: Receive, send: Send) -> tuple[int, str] | None:
        """A live session on a ready avatar (api/live.py): `receive()` gives the client's next
        message (JSON text or audio bytes; None once it has gone), `send(bytes | dict)` hands it
        fMP4 pieces and events. -> the close code and reason, or None when the client left. The
        WebSocket route drives it; it needs the two coroutines, so handle callers cannot."""
        return await LiveSession(self, avatar_id, receive, send).run()

    def live_avatar(self, avatar_id: str) -> AvatarRecord:
        if self.lipsync is None:
            raise LiveError("not_found", "this deployment has no lip-sync stage, so no avatars", "avatar_id")
        record = self.records.avatars.get(avatar_id)
        if record is None:
            raise LiveError("not_found", f"no avatar {avatar_id!r}", "avatar_id")
        if record.status != "ready" or not record.prepared_id:
            raise LiveError("conflict", f"avatar {avatar_id} is {record.status}; a live session needs it ready",
                            "avatar_id")
        return record

    def admit_live(self) -> bool:
        if self.live_sessions >= self.cfg.max_live_sessions:
            retry = self.cfg.serving.live.retry_after_s
            raise LiveError("busy", f"{self.live_sessions} live sessions are open, the most this deployment "
                                    f"takes; retry in {retry} s", None, retry_after=retry)
        self.live_sessions += 1
        self.metrics.live_sessions(self.live_sessions)
        return True

    def release_live(self) -> None:
        self.live_sessions -= 1
        self.metrics.live_sessions(self.live_sessions)

    async def models(self) -> ModelList:
        loras = await self.list_loras()
        return ModelList(data=[ModelCard(id=self.cfg.name, description=self.cfg.description,
                                         loras={role: info["active"] for role, info in loras.items()})])

    def stages(self) -> dict:
        handles = {"encoder": self.encoder, "high": self.high, "low": self.low, "decoder": self.decoder}
        if self.lipsync is not None:
            handles["lipsync"] = self.lipsync
        return handles

    async def ready(self, timeout_s: float = 2.0) -> tuple[bool, dict]:
        """Whether every stage has a replica that finished loading and warming up (a replica only
        takes requests then) -> (ready, {stage: its start-up seconds, or "starting"})."""

        async def probe(handle):
            try:
                info = await asyncio.wait_for(handle.info.remote(), timeout_s)
            except Exception:  # noqa: BLE001 - not up yet (or gone): not ready
                return "starting"
            return round(float(info.get("startup_s", 0.0)), 3)

        self.webhooks.flush()  # (an ingress built outside its event loop starts its deliveries here)
        names, handles = zip(*self.stages().items())
        states = dict(zip(names, await asyncio.gather(*[probe(h) for h in handles])))
        return all(s != "starting" for s in states.values()), states

    def check_health(self) -> None:
        if not self.records.store.jobs_dir.is_dir():
            raise RuntimeError(f"job storage {self.records.store.root} is gone")
