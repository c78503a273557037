"""The job queue: admission (429 with Retry-After), running slots, the deadline, progress and the
end of every record that runs stages -- video jobs and avatar preparations alike.

    admit() -> start(record, work)  -> waiting (queue_position 1..n, a "queued" event per change)
                                    -> a running slot frees: in_progress, work(progress) under the deadline
                                    -> DONE ("completed" / "ready") | "failed" (reason) | "cancelled"

It knows nothing of stages or HTTP: `work` is any coroutine function, so the queue is tested on
its own (tests/api/test_queue.py). It runs on the ingress's event loop; nothing here is shared
with another thread.
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import asynccontextmanager
from typing import Awaitable, Callable

from deployments.api.jobs import JobEvents, failure
from deployments.api.protocol import ApiError, Queued

log = logging.getLogger("avatar_serve.queue")

# Where each stage of the video flow puts the progress bar (percent): encode starts at 1, the
# denoise steps fill 5..90, decode starts at 90 and lip-sync at 93.
STAGE_PROGRESS = {"encode": 1, "decode": 90, "lipsync": 93}
DENOISE_FROM, DENOISE_TO = 5, 90
# Event ids of a record's second run (after a restart) start here: far beyond what one run emits
# (a place in the queue per record ahead of it, the stages, the denoise steps, the end).
EVENT_IDS_PER_RUN = 1_000_000


class Progress:
    """What a running record reports: the stage it is in and each denoise step. Sets the record's
    `stage` / `step` / `progress` and emits the matching events."""

    def __init__(self, record: Queued, events: JobEvents, total_steps: int):
        self.record, self.events, self.total_steps = record, events, max(1, total_steps)

    def stage(self, stage: str) -> None:
        r = self.record
        r.stage = stage
        r.progress = max(r.progress, STAGE_PROGRESS.get(stage, 0))
        self.events.emit("stage", stage=stage, state="started", progress=r.progress)

    def step(self, step: int, expert: str) -> None:
        """Denoise step `step` (1-based) of `total_steps` finished on `expert`."""
        r = self.record
        if r.stage != "denoise":
            r.stage, r.progress = "denoise", max(r.progress, DENOISE_FROM)
            self.events.emit("stage", stage="encode", state="finished", progress=r.progress)
        r.step = step
        r.progress = DENOISE_FROM + int((DENOISE_TO - DENOISE_FROM) * step / self.total_steps)
        self.events.emit("step", step=step, total=self.total_steps, expert=expert, progress=r.progress)

    def first_fragment(self, size: int) -> None:
        """The MP4's first piece (its header and first fragment) can be streamed now."""
        self.events.emit("first_fragment", bytes=size, progress=self.record.progress)

    def retry(self, stage: str, reason: str) -> None:
        """`stage`'s replica died and the stage runs again (deployments/api/retry.py): its steps
        are reported again from its first."""
        self.events.emit("retry", stage=stage, reason=reason, progress=self.record.progress)


class NoProgress:
    """For callers that want no reports (the synchronous Python API)."""

    def stage(self, stage: str) -> None:
        pass

    def step(self, step: int, expert: str) -> None:
        pass

    def first_fragment(self, size: int) -> None:
        pass

    def retry(self, stage: str, reason: str) -> None:
        pass


Work = Callable[[Progress], Awaitable[None]]


class JobQueue:
    def __init__(self, max_running: int, max_queued: int, retry_after_s: int, timeout_s: float,
                 metrics=None):
        self.max_running, self.max_queued = max_running, max_queued
        self.retry_after_s, self.timeout_s = retry_after_s, timeout_s
        self.metrics = metrics
        self.waiting: list[Queued] = []  # oldest first
        self.running = 0
        self.events: dict[str, JobEvents] = {}
        self._tasks: dict[str, asyncio.Task] = {}
        self._wakeup: asyncio.Event | None = None
        self.on_finish: Callable[[Queued], None] | None = None  # told of each record that ends (webhooks)

    @property
    def capacity(self) -> int:
        return self.max_running + self.max_queued

    def admit(self) -> None:
        """Raise 429 (with Retry-After) when running + waiting work has reached the capacity."""
        if len(self.waiting) + self.running >= self.capacity:
            raise ApiError(429, f"the job queue is full ({self.capacity} jobs); retry later", None,
                           type="rate_limit_error", headers={"Retry-After": str(self.retry_after_s)})

    def start(self, record: Queued, work: Work, save: Callable[[Queued], None],
              total_steps: int = 1, first_event: dict | None = None) -> asyncio.Task:
        """Queue `record` and run `work(progress)` when it reaches a free slot. `save` writes the
        record after each change of status. Call `admit()` first. `first_event`: emitted before
        any other (a record re-queued after a restart says so). -> the task, done when the
        record is final."""
        events = self.events[record.id] = JobEvents(first_id=EVENT_IDS_PER_RUN * (record.attempt - 1))
        if first_event is not None:
            events.emit(**first_event)
        self.waiting.append(record)
        self._update()
        log.info("%s %s queued at position %d (%d running)", record.object, record.id,
                 record.queue_position, self.running)
        task = self._tasks[record.id] = asyncio.ensure_future(
            self._run(record, work, save, Progress(record, events, total_steps)))
        return task

    def cancel(self, record_id: str) -> bool:
        """Stop a queued or running record (a running one stops at the stage's next step; its end
        is recorded as cancelled). False when it has no task (finished, or never started here)."""
        task = self._tasks.get(record_id)
        if task is None:
            return False
        task.cancel()
        # A queued record leaves the line now, so its place is free at once.
        self.waiting = [r for r in self.waiting if r.id != record_id]
        self._update()
        return True

    def forget(self, record_id: str) -> None:
        self.events.pop(record_id, None)

    async def follow(self, record: Queued, after: int = -1):
        """Progress events of a record, replayed from its start (or from after event id `after`,
        for a client that reconnects); for one that finished before this ingress started (an
        interrupted one included), its final state only, so every stream ends with a final event."""
        events = self.events.get(record.id)
        if events is None:
            yield {"event": record.status, "status": record.status, "progress": record.progress,
                   **({"error": record.error.model_dump()} if record.error else {})}
            return
        async for event in events.follow(after):
            yield event

    # -------------------------------------------------------------- running

    async def _run(self, record: Queued, work: Work, save, progress: Progress) -> None:
        error = None
        try:
            async with self._slot(record, save):
                await work(progress)
            status = record.DONE
        except asyncio.CancelledError:
            status = "cancelled"
        except Exception as exc:  # noqa: BLE001 - every failure ends the record with a reason
            log.error("%s %s failed: %r", record.object, record.id, exc,
                      exc_info=not isinstance(exc, TimeoutError))
            status, error = "failed", failure(exc)
        self.finish(record, status, save, error)

    @asynccontextmanager
    async def _slot(self, record: Queued, save):
        """Wait until `record` is first in line and a running slot is free, mark it in progress,
        run the body under the deadline, and always give the slot back."""
        started, queued_at = False, time.monotonic()
        try:
            if self._wakeup is None:
                self._wakeup = asyncio.Event()
            while not (self.waiting and self.waiting[0] is record and self.running < self.max_running):
                await self._wakeup.wait()
            self.waiting.pop(0)
            self.running += 1
            started = True
            record.status, record.queue_position = "in_progress", None
            self._update()
            save(record)
            log.info("%s %s started after %.2f s in the queue", record.object, record.id,
                     time.monotonic() - queued_at)
            async with asyncio.timeout(self.timeout_s):
                yield
        finally:
            record.queue_position = None
            self.waiting = [r for r in self.waiting if r is not record]
            if started:
                self.running -= 1
            self._tasks.pop(record.id, None)
            self._update()

    def finish(self, record: Queued, status: str, save, error=None) -> None:
        """Record a final status: save, count, close the event stream, log."""
        record.status, record.error, record.completed_at = status, error, int(time.time())
        record.queue_position = None
        if status == record.DONE:
            record.progress = 100
        save(record)
        if self.metrics is not None:
            self.metrics.finished(status)
        events = self.events.get(record.id)
        if events is not None:
            data = {"status": status, "progress": record.progress}
            if error is not None:
                data["error"] = error.model_dump()
            events.emit(status, **data)
            events.close()
        log.info("%s %s %s after %d s%s", record.object, record.id, status, record.completed_at - record.created_at,
                 f": {error.message}" if error else "")
        if self.on_finish is not None:
            self.on_finish(record)

    def _update(self) -> None:
        """Renumber the line (a "queued" event for each record whose place changed), refresh the
        gauges and wake every waiter to look again."""
        for position, record in enumerate(self.waiting, start=1):
            if record.queue_position != position:
                record.queue_position = position
                events = self.events.get(record.id)
                if events is not None:
                    events.emit("queued", position=position)
        if self.metrics is not None:
            self.metrics.load(len(self.waiting), self.running)
        if self._wakeup is not None:
            self._wakeup.set()
            self._wakeup = asyncio.Event()


def dispatched(calls: list, response):
    """Note a stage call made for a request (see `cancel_on_exit`) and hand it on."""
    calls.append(response)
    return response


@asynccontextmanager
async def cancel_on_exit():
    """The stage calls dispatched for one request; when the request ends early (cancelled, past
    its deadline, failed) the ones still running are cancelled too, not left to finish for nobody."""
    calls: list = []
    try:
        yield calls
    except BaseException:
        for response in calls:
            response.cancel()  # no-op for a call that has finished
        raise
