"""Video jobs: the record a client sees (OpenAI video-jobs shape), its progress events, and the
on-disk store that lets a restarted ingress serve finished results.

Layout of `storage_dir`:
    jobs/<id>.json      the job record, rewritten atomically (temp file + rename) on each change
    results/<id>.mp4    the finished video, written atomically once
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

Status = Literal["queued", "in_progress", "completed", "failed", "cancelled"]
FINAL: frozenset[str] = frozenset({"completed", "failed", "cancelled"})


class JobError(BaseModel):
    code: str
    message: str


class Job(BaseModel):
    """What GET /v1/videos/{id} returns."""

    id: str
    object: Literal["video"] = "video"
    status: Status = "queued"
    progress: int = Field(0, ge=0, le=100)
    created_at: int
    completed_at: int | None = None
    expires_at: int | None = None
    model: str
    prompt: str
    size: str
    seconds: str
    num_frames: int
    fps: int
    seed: int
    num_inference_steps: int
    stage: str | None = None
    step: int | None = None
    queue_position: int | None = None
    has_audio: bool = False
    error: JobError | None = None

    @property
    def final(self) -> bool:
        return self.status in FINAL


class Avatar(BaseModel):
    """What GET /v1/avatars/{id} returns. Its id is a content hash of the image, the generation
    settings and the profile, so creating the same avatar twice returns the first one."""

    id: str
    object: Literal["avatar"] = "avatar"
    status: Literal["queued", "in_progress", "ready", "failed", "cancelled"] = "queued"
    created_at: int
    ready_at: int | None = None
    model: str
    prompt: str
    size: str
    num_frames: int
    seed: int
    queue_position: int | None = None
    # Filled when ready: the lip-sync stage's own id for the prepared avatar and its cycle.
    lipsync_id: str | None = None
    fps: int | None = None
    cycle_frames: int | None = None
    error: JobError | None = None

    @property
    def final(self) -> bool:
        return self.status in ("ready", "failed", "cancelled")


def new_job_id() -> str:
    return f"video_{uuid.uuid4().hex}"


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


class JobStore:
    """Job records and results on disk. One ingress replica owns a storage directory."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.jobs_dir = self.root / "jobs"
        self.results_dir = self.root / "results"
        self.avatars_dir = self.root / "avatars"
        for folder in (self.jobs_dir, self.results_dir, self.avatars_dir):
            folder.mkdir(parents=True, exist_ok=True)

    def save(self, job: Job) -> None:
        _atomic_write(self.jobs_dir / f"{job.id}.json", job.model_dump_json().encode())

    def save_result(self, job_id: str, data: bytes) -> None:
        _atomic_write(self.result_path(job_id), data)

    def result_path(self, job_id: str) -> Path:
        return self.results_dir / f"{job_id}.mp4"

    def load_all(self) -> list[Job]:
        jobs = []
        for path in self.jobs_dir.glob("video_*.json"):
            try:
                jobs.append(Job.model_validate_json(path.read_bytes()))
            except (ValueError, OSError):
                continue  # a torn or foreign file: ignore it rather than refuse to start
        return jobs

    def delete(self, job_id: str) -> None:
        for path in (self.jobs_dir / f"{job_id}.json", self.result_path(job_id)):
            path.unlink(missing_ok=True)

    def recover(self) -> list[Job]:
        """Jobs from an earlier run; any that had not finished is marked failed, with a reason."""
        jobs = self.load_all()
        now = int(time.time())
        for job in jobs:
            if not job.final:
                job.status, job.completed_at, job.queue_position = "failed", now, None
                job.error = JobError(code="interrupted",
                                     message="the server restarted before this job finished")
                self.save(job)
            elif job.status == "completed" and not self.result_path(job.id).exists():
                job.status = "failed"
                job.error = JobError(code="result_lost", message="the result file is missing")
                self.save(job)
        return jobs

    def save_avatar(self, avatar: Avatar) -> None:
        _atomic_write(self.avatars_dir / f"{avatar.id}.json", avatar.model_dump_json().encode())

    def delete_avatar(self, avatar_id: str) -> None:
        (self.avatars_dir / f"{avatar_id}.json").unlink(missing_ok=True)

    def recover_avatars(self) -> list[Avatar]:
        """Avatars from an earlier run; those still being prepared are marked failed."""
        avatars = []
        for path in self.avatars_dir.glob("avatar_*.json"):
            try:
                avatar = Avatar.model_validate_json(path.read_bytes())
            except (ValueError, OSError):
                continue
            if not avatar.final:
                avatar.status, avatar.queue_position = "failed", None
                avatar.error = JobError(code="interrupted", message="the server restarted while preparing it")
                self.save_avatar(avatar)
            avatars.append(avatar)
        return avatars

    def expire(self, jobs: dict[str, Job], ttl_s: float, max_bytes: int, now: float | None = None) -> list[str]:
        """Delete finished jobs older than `ttl_s`, then the oldest finished results until the
        results fit in `max_bytes`. Returns the ids deleted."""
        now = time.time() if now is None else now
        finished = sorted((j for j in jobs.values() if j.final), key=lambda j: j.completed_at or j.created_at)
        gone = [j.id for j in finished if (j.completed_at or j.created_at) + ttl_s < now]
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


class JobEvents:
    """Progress events of one job, replayable: a late subscriber gets every event so far."""

    def __init__(self):
        self.events: list[dict[str, Any]] = []
        self._changed = asyncio.Event()
        self.closed = False

    def emit(self, event: str, **data: Any) -> None:
        self.events.append({"event": event, **data})
        self._changed.set()
        self._changed = asyncio.Event()

    def close(self) -> None:
        self.closed = True
        self._changed.set()

    async def follow(self):
        """Yield events in order until the job's final event."""
        i = 0
        while True:
            while i < len(self.events):
                yield self.events[i]
                i += 1
            if self.closed:
                return
            await self._changed.wait()


def sse(event: dict[str, Any]) -> str:
    """One server-sent event."""
    return f"event: {event['event']}\ndata: {json.dumps(event)}\n\n"
