"""Jobs and avatars as records: in memory by id, on disk so a restarted ingress still serves
finished results, their progress events, and how a failure reads to a client.

Layout of `storage_dir`:
    jobs/<id>.json      a video job's record, rewritten atomically (temp file + rename) on each change
    results/<id>.mp4    the finished video, written atomically once
    avatars/<id>.json   an avatar's record (with the lip-sync stage's id for it)
    inputs/<id>.npz     what an unfinished job or avatar runs on, so a restart can re-queue it
                        (deployments/api/requeue.py); deleted once its record is final or deleted
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable

from pydantic import AliasChoices, Field

from deployments.api.protocol import ApiError, Avatar, Deleted, Job, JobError, Queued, VideoList
from deployments.common.errors import LoraError, unwrap


_last_id_ns = 0
_id_lock = threading.Lock()


def new_job_id() -> str:
    """`video_` + 32 hex digits: the creation time in ns (16 digits), strictly increasing within
    the process, then 16 random ones. Ids sort in creation order, so jobs created within one
    second (`created_at`'s unit) keep their order across a restart."""
    global _last_id_ns
    with _id_lock:
        _last_id_ns = max(time.time_ns(), _last_id_ns + 1)
        stamp = _last_id_ns
    return f"video_{stamp:016x}{uuid.uuid4().hex[:16]}"


class AvatarRecord(Avatar):
    """The ingress's record of an avatar: the public fields plus the lip-sync stage's own id for
    the prepared avatar, `prepared_id` (internal: `public()` leaves it out). Records written
    before it had this name carry it as `lipsync_id`: read either."""

    prepared_id: str | None = Field(None, validation_alias=AliasChoices("prepared_id", "lipsync_id"))

    def public(self) -> Avatar:
        return Avatar.model_validate(self.model_dump(exclude={"prepared_id"}))


# How a synchronous request whose job did not complete answers: (HTTP status, error type).
FAILED_JOB = {"timeout": (504, "timeout_error"), "stage_unavailable": (503, "service_unavailable"),
              "cancelled": (503, "service_unavailable"), "invalid_lora": (422, "invalid_request_error")}


def job_failed(job: Job) -> ApiError:
    code = job.error.code if job.error else job.status
    status, kind = FAILED_JOB.get(code, (500, "server_error"))
    message = job.error.message if job.error else f"the request was {job.status}"
    return ApiError(status, message, None, type=kind)


def failure(exc: BaseException) -> JobError:
    """A stage failure as the client sees it: which stage, and its reason in words -- no stack
    trace, no Ray internals (those go to the log with the job id)."""
    if isinstance(exc, TimeoutError):
        return JobError(code="timeout", message="the job ran past its deadline and was stopped")
    cause = unwrap(exc)
    name = type(cause).__name__
    stage = failed_stage(exc)
    where = f"the {stage} stage" if stage else "a stage"
    if isinstance(cause, LoraError):  # a request's LoRA file that does not fit an expert
        return JobError(code="invalid_lora", message=f"loras: {ANSI.sub('', str(cause)).strip()[:300]}")
    if _replica_gone(exc):
        return JobError(code="stage_unavailable", message=f"{where} died while running this job ({name})")
    text = ANSI.sub("", str(cause)).strip()
    text = text.splitlines()[0][:300] if text else ""
    return JobError(code="stage_error", message=f"{where} failed: {name}: {text}" if text else f"{where} failed: {name}")


ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
# Ray names a replica's process "ray::ServeReplica:<app>:<deployment>"; an error raised there keeps
# it (`proctitle`), also when it reaches the ingress through a later stage's call.
_PROCTITLE = re.compile(r"ServeReplica:[^:]+:([A-Za-z0-9_]+)")


def failed_stage(exc: BaseException) -> str | None:
    """The deployment (Encoder, DitExpertHigh, ...) where a failure was raised, when Ray says."""
    match = _PROCTITLE.search(str(getattr(exc, "proctitle", "") or ""))
    return match.group(1) if match else None


# Ray's exceptions for a replica that died or cannot be reached (RayActorError covers
# ActorDiedError and ActorUnavailableError), by module: matched as types, looked up only in the
# modules already loaded (when Ray is not loaded, no such error can exist).
_REPLICA_GONE = {"ray.exceptions": ("RayActorError",),
                 "ray.serve.exceptions": ("ReplicaUnavailableError", "DeploymentUnavailableError")}


def _replica_gone(exc: BaseException) -> bool:
    kinds = tuple(getattr(sys.modules[module], name) for module, names in _REPLICA_GONE.items()
                  if module in sys.modules for name in names if hasattr(sys.modules[module], name))
    return bool(kinds) and isinstance(exc, kinds)


# ------------------------------------------------------------------ on disk


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def outlived(job: Job, ttl_s: float, now: float) -> bool:
    """A finished job kept longer than `ttl_s` after it ended."""
    return job.final and (job.completed_at or job.created_at) + ttl_s < now


class JobStore:
    """Job and avatar records and results on disk. One ingress replica owns a storage directory."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.jobs_dir = self.root / "jobs"
        self.results_dir = self.root / "results"
        self.avatars_dir = self.root / "avatars"
        self.inputs_dir = self.root / "inputs"
        for folder in (self.jobs_dir, self.results_dir, self.avatars_dir, self.inputs_dir):
            folder.mkdir(parents=True, exist_ok=True)

    def save(self, record: Job | AvatarRecord) -> None:
        folder = self.avatars_dir if isinstance(record, AvatarRecord) else self.jobs_dir
        _atomic_write(folder / f"{record.id}.json", record.model_dump_json().encode())

    def save_result(self, job_id: str, data: bytes) -> None:
        _atomic_write(self.result_path(job_id), data)

    def result_path(self, job_id: str) -> Path:
        return self.results_dir / f"{job_id}.mp4"

    def inputs_path(self, record_id: str) -> Path:
        return self.inputs_dir / f"{record_id}.npz"

    def save_inputs(self, record_id: str, data: bytes) -> None:
        _atomic_write(self.inputs_path(record_id), data)

    def delete_inputs(self, record_id: str) -> None:
        self.inputs_path(record_id).unlink(missing_ok=True)

    def inputs_ids(self) -> list[str]:
        return [path.stem for path in self.inputs_dir.glob("*.npz")]

    def delete(self, job_id: str) -> None:
        for path in (self.jobs_dir / f"{job_id}.json", self.result_path(job_id), self.inputs_path(job_id)):
            path.unlink(missing_ok=True)

    def delete_avatar(self, avatar_id: str) -> None:
        for path in (self.avatars_dir / f"{avatar_id}.json", self.inputs_path(avatar_id)):
            path.unlink(missing_ok=True)

    def _load(self, folder: Path, pattern: str, cls):
        out = []
        for path in folder.glob(pattern):
            try:
                out.append(cls.model_validate_json(path.read_bytes()))
            except (ValueError, OSError):
                continue  # a torn or foreign file: ignore it rather than refuse to start
        return out

    def recover(self) -> list[Job]:
        """Jobs from an earlier run. Those it left unfinished stay as they were: what becomes of
        them (re-queued, or failed with the reason) is `requeue.plan`'s to decide."""
        jobs = self._load(self.jobs_dir, "video_*.json", Job)
        for job in jobs:
            if job.status == "completed" and not self.result_path(job.id).exists():
                job.status = "failed"
                job.error = JobError(code="result_lost", message="the result file is missing")
                self.save(job)
        return jobs

    def recover_avatars(self) -> list[AvatarRecord]:
        """Avatars from an earlier run (those still being prepared: as `recover`)."""
        return self._load(self.avatars_dir, "avatar_*.json", AvatarRecord)

    def expire(self, jobs: dict[str, Job], ttl_s: float, max_bytes: int, now: float | None = None) -> list[str]:
        """Delete finished jobs older than `ttl_s`, then the oldest finished results until the
        results fit in `max_bytes`. Returns the ids deleted."""
        now = time.time() if now is None else now
        finished = sorted((j for j in jobs.values() if j.final), key=lambda j: j.completed_at or j.created_at)
        gone = [j.id for j in finished if outlived(j, ttl_s, now)]
        sizes = {j.id: self.result_path(j.id).stat().st_size for j in finished
                 if j.id not in gone and self.result_path(j.id).exists()}
        total = sum(sizes.values())
        for job in finished:
            if total <= max_bytes:
                break
            if job.id in sizes:
                total -= sizes[job.id]
                gone.append(job.id)
        for job_id in gone:
            self.delete(job_id)
        return gone


# ------------------------------------------------------------------ in memory


class Records:
    """Every job and avatar this ingress knows, by id, backed by a JobStore: lookups that answer
    404, listing, deletion, result files and expiry. The records an earlier ingress left
    unfinished are loaded as they were; `requeue.plan` re-queues or fails them."""

    def __init__(self, store: JobStore, result_ttl_s: float, max_result_bytes: int,
                 on_expire: Callable[[str], None] | None = None):
        """`on_expire(job_id)`: told of each job that expiry deletes (the queue drops its events)."""
        self.store, self.on_expire = store, on_expire
        self.result_ttl_s, self.max_result_bytes = result_ttl_s, max_result_bytes
        self.jobs: dict[str, Job] = {j.id: j for j in sorted(store.recover(), key=lambda j: (j.created_at, j.id))}
        self.avatars: dict[str, AvatarRecord] = {a.id: a for a in store.recover_avatars()}

    def add(self, record: Job | AvatarRecord) -> None:
        (self.avatars if isinstance(record, AvatarRecord) else self.jobs)[record.id] = record
        self.store.save(record)

    def knows(self, record: Queued) -> bool:
        """Whether `record` is (still) this one's, not deleted or expired."""
        return (self.jobs.get(record.id) or self.avatars.get(record.id)) is record

    def save(self, record: Queued) -> None:
        """Write a record that is still known (one deleted meanwhile stays deleted). A final one
        needs its inputs no more: they go."""
        if record.id in self.jobs or record.id in self.avatars:
            self.store.save(record)
            if record.final:
                self.store.delete_inputs(record.id)

    # -------------------------------------------------------------- jobs

    def job(self, job_id: str) -> Job:
        """The job, or 404: also once it has outlived `result_ttl_s` (expired when asked for, not
        only when the next job comes)."""
        job = self.jobs.get(job_id)
        if job is not None and outlived(job, self.result_ttl_s, time.time()):
            self.expire()
            job = self.jobs.get(job_id)
        if job is None:
            raise ApiError(404, f"no video job {job_id!r}", "video_id", type="not_found_error")
        return job

    def list_jobs(self, limit: int = 20, after: str | None = None) -> VideoList:
        now = time.time()
        if any(outlived(j, self.result_ttl_s, now) for j in self.jobs.values()):
            self.expire()  # (reads the result files' sizes: only when some job is due)
        # Newest first: by creation second, then by creation order within it (dict order).
        order = {job_id: i for i, job_id in enumerate(self.jobs)}
        jobs = sorted(self.jobs.values(), key=lambda j: (j.created_at, order[j.id]), reverse=True)
        if after is not None:
            ids = [j.id for j in jobs]
            if after not in ids:
                raise ApiError(422, f"after: no video job {after!r}", "after")
            jobs = jobs[ids.index(after) + 1:]
        page = jobs[:limit]
        return VideoList(data=page, has_more=len(jobs) > limit,
                         first_id=page[0].id if page else None, last_id=page[-1].id if page else None)

    def delete_job(self, job_id: str) -> Deleted:
        self.job(job_id)
        self.jobs.pop(job_id)
        self.store.delete(job_id)
        return Deleted(id=job_id, object="video.deleted")

    def save_result(self, job: Job, mp4: bytes) -> None:
        self.store.save_result(job.id, mp4)
        job.expires_at = int(time.time() + self.result_ttl_s)

    def content_path(self, job_id: str) -> Path:
        job = self.job(job_id)
        if job.status != "completed":
            raise ApiError(409, f"video {job_id} is {job.status}; content exists once it is completed",
                           "video_id", type="conflict_error")
        path = self.store.result_path(job_id)
        if not path.exists():
            raise ApiError(404, f"the result of {job_id} has expired", "video_id", type="not_found_error")
        return path

    def expire(self) -> list[str]:
        gone = self.store.expire(self.jobs, self.result_ttl_s, self.max_result_bytes)
        for job_id in gone:
            self.jobs.pop(job_id, None)
            if self.on_expire is not None:
                self.on_expire(job_id)
        return gone

    # -------------------------------------------------------------- avatars

    def avatar(self, avatar_id: str) -> AvatarRecord:
        try:
            return self.avatars[avatar_id]
        except KeyError:
            raise ApiError(404, f"no avatar {avatar_id!r}", "avatar_id", type="not_found_error") from None

    def delete_avatar(self, avatar_id: str) -> AvatarRecord:
        avatar = self.avatars.pop(avatar_id)
        self.store.delete_avatar(avatar_id)
        return avatar

    def shares_prepared_id(self, prepared_id: str) -> bool:
        return any(a.prepared_id == prepared_id for a in self.avatars.values())


# ------------------------------------------------------------------ progress events


class JobEvents:
    """Progress events of one job, replayable: a late subscriber gets every event so far. Ids
    count from `first_id`: a run after a restart starts past every id the run before it sent, so
    a client that reconnects with one of those (`Last-Event-ID`) gets the new run's events."""

    def __init__(self, first_id: int = 0):
        self.first_id = first_id
        self.events: list[dict[str, Any]] = []
        self._changed = asyncio.Event()
        self.closed = False

    def emit(self, event: str, **data: Any) -> None:
        """Append an event; `id` (its place, for SSE resume) and `at` (unix time) are added."""
        self.events.append({"event": event, "id": self.first_id + len(self.events), "at": round(time.time(), 3),
                            **data})
        self._changed.set()
        self._changed = asyncio.Event()

    def close(self) -> None:
        self.closed = True
        self._changed.set()

    async def follow(self, after: int = -1):
        """Yield events in order (those with an id above `after`) until the job's final event.
        Every stream ends with the final event: a client that resumes at or past it (an id it
        was sent last, or one the job never reached) gets it again once the job has ended."""
        i, sent = max(0, after + 1 - self.first_id), None
        while True:
            while i < len(self.events):
                sent = self.events[i]
                yield sent
                i += 1
            if self.closed:
                if self.events and sent is not self.events[-1]:
                    yield self.events[-1]
                return
            await self._changed.wait()


def sse(event: dict[str, Any]) -> str:
    """One server-sent event, with its id when it has one (a browser's EventSource sends the last
    one back as `Last-Event-ID` when it reconnects)."""
    head = f"id: {event['id']}\n" if "id" in event else ""
    return f"{head}event: {event['event']}\ndata: {json.dumps(event)}\n\n"
