"""The job queue alone (deployments/api/queue.py): no FastAPI, no stages -- `work` is a plain
coroutine. Admission, running slots in order, positions, the deadline, cancellation, progress
and how a failure reads."""

from __future__ import annotations

import asyncio

import pytest

from deployments.api.protocol import ApiError, Avatar, Job
from deployments.api.queue import JobQueue


def job(i: int) -> Job:
    return Job(id=f"video_{i}", created_at=0, model="tiny", prompt="p", size="16x16", seconds="1",
               num_frames=5, fps=16, seed=i, num_inference_steps=4)


class Saves:
    """A `save` callback that remembers each status it was called with."""

    def __init__(self):
        self.seen: dict[str, list[str]] = {}

    def __call__(self, record):
        self.seen.setdefault(record.id, []).append(record.status)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 10))


async def settle(*records):
    while not all(r.final for r in records):
        await asyncio.sleep(0.005)


def test_admission_refuses_past_capacity_with_retry_after():
    async def scenario():
        q = JobQueue(max_running=1, max_queued=1, retry_after_s=7, timeout_s=5)
        gate = asyncio.Event()
        a, b = job(1), job(2)
        for r in (a, b):
            q.admit()
            q.start(r, lambda p: gate.wait(), Saves())
        with pytest.raises(ApiError) as exc:
            q.admit()
        gate.set()
        await settle(a, b)
        q.admit()  # room again
        return exc.value

    err = run(scenario())
    assert err.status == 429 and err.headers == {"Retry-After": "7"} and err.type == "rate_limit_error"


def test_slots_run_in_order_and_positions_are_announced():
    order = []

    async def scenario():
        q = JobQueue(max_running=1, max_queued=5, retry_after_s=1, timeout_s=5)
        records = [job(i) for i in range(3)]

        def work(i):
            async def go(progress):
                order.append(("start", i))
                await asyncio.sleep(0.01)
                order.append(("end", i))
            return go

        for i, r in enumerate(records):
            q.start(r, work(i), Saves())
        await asyncio.sleep(0)
        positions = [r.queue_position for r in records]
        await settle(*records)
        return q, records, positions

    q, records, positions = run(scenario())
    assert order == [("start", 0), ("end", 0), ("start", 1), ("end", 1), ("start", 2), ("end", 2)]
    assert positions == [None, 1, 2]  # the first one is already running
    queued = [e["position"] for e in q.events["video_2"].events if e["event"] == "queued"]
    assert queued == [3, 2, 1]
    assert all(r.status == "completed" and r.progress == 100 for r in records)
    assert q.running == 0 and q.waiting == []


def test_deadline_fails_with_timeout_and_frees_the_slot():
    async def scenario():
        q = JobQueue(max_running=1, max_queued=5, retry_after_s=1, timeout_s=0.05)
        slow, quick, saves = job(1), job(2), Saves()
        q.start(slow, lambda p: asyncio.sleep(10), saves)
        q.start(quick, lambda p: asyncio.sleep(0), saves)
        await settle(slow, quick)
        return slow, quick, saves

    slow, quick, saves = run(scenario())
    assert slow.status == "failed" and slow.error.code == "timeout"
    assert quick.status == "completed"
    assert saves.seen["video_1"] == ["in_progress", "failed"]


def test_cancel_a_queued_record_frees_its_place_at_once():
    async def scenario():
        q = JobQueue(max_running=1, max_queued=1, retry_after_s=1, timeout_s=5)
        gate = asyncio.Event()
        running, queued = job(1), job(2)
        q.start(running, lambda p: gate.wait(), Saves())
        q.start(queued, lambda p: asyncio.sleep(0), Saves())
        await asyncio.sleep(0)
        assert q.cancel(queued.id)
        q.admit()  # its place is free before its task has even run
        gate.set()
        await settle(running, queued)
        return running, queued, q

    running, queued, q = run(scenario())
    assert queued.status == "cancelled" and running.status == "completed"
    assert q.cancel(running.id) is False  # finished: nothing to cancel
    assert q.events[queued.id].events[-1]["event"] == "cancelled"


def test_progress_maps_stages_and_steps_onto_percent_and_events():
    async def scenario():
        q = JobQueue(max_running=1, max_queued=1, retry_after_s=1, timeout_s=5)
        r = job(1)
        seen = []

        async def work(progress):
            for stage_or_step in ("encode", 1, 2, 3, 4, "decode"):
                if isinstance(stage_or_step, str):
                    progress.stage(stage_or_step)
                else:
                    progress.step(stage_or_step, "high" if stage_or_step <= 2 else "low")
                seen.append(r.progress)

        q.start(r, work, Saves(), total_steps=4)
        await settle(r)
        return q, r, seen

    q, r, seen = run(scenario())
    assert seen == [1, 26, 47, 68, 90, 90]
    kinds = [e["event"] for e in q.events[r.id].events]
    assert kinds == ["queued", "stage", "stage", "step", "step", "step", "step", "stage", "completed"]
    assert r.progress == 100 and r.stage == "decode" and r.step == 4


def test_a_failure_reads_as_its_reason_and_an_avatar_ends_ready():
    async def scenario():
        q = JobQueue(max_running=2, max_queued=1, retry_after_s=1, timeout_s=5)
        bad = job(1)
        avatar = Avatar(id="avatar_1", created_at=0, model="tiny", prompt="p", size="16x16", num_frames=5, seed=0)

        async def boom(progress):
            raise ValueError("the encoder says no\nsecond line")

        q.start(bad, boom, Saves())
        q.start(avatar, lambda p: asyncio.sleep(0), Saves())
        await settle(bad, avatar)
        return bad, avatar

    bad, avatar = run(scenario())
    assert bad.status == "failed" and bad.error.code == "stage_error"
    assert bad.error.message == "a stage failed: ValueError: the encoder says no"
    assert avatar.status == "ready" and avatar.progress == 100


def test_failures_name_their_stage_and_carry_no_ray_internals():
    from deployments.api.jobs import failure

    class RayTaskError(ValueError):  # what Ray raises in the caller: the stage's class + Ray's fields
        def __init__(self, cause, proctitle):
            super().__init__("\x1b[36mray::ServeReplica:avatar-serve:Encoder()\x1b[39m (pid=4, ip=10.0.0.1, "
                             "actor_id=abc, repr=<Encoder at 0x7f>)\nTraceback ...")
            self.cause, self.proctitle = cause, proctitle

    err = failure(RayTaskError(ValueError("\x1b[31mimage too small\x1b[0m\nmore"), "ray::ServeReplica:avatar-serve:Encoder"))
    assert err.code == "stage_error" and err.message == "the Encoder stage failed: ValueError: image too small"
    plain = failure(RuntimeError("out of memory"))
    assert plain.message == "a stage failed: RuntimeError: out of memory"
    assert failure(TimeoutError()).code == "timeout"


def test_each_record_logs_queued_started_and_its_end(caplog):
    async def scenario():
        queue = JobQueue(1, 4, 3, 5.0)
        ok, bad = job(1), job(2)

        async def fails(progress):
            raise ValueError("no such face")

        queue.start(ok, lambda progress: asyncio.sleep(0.01), Saves())
        queue.start(bad, fails, Saves())
        await settle(ok, bad)

    with caplog.at_level("INFO", logger="avatar_serve.queue"):
        run(scenario())
    lines = [r.getMessage() for r in caplog.records]
    assert [line.split(" ", 2)[2].split(" after")[0] for line in lines if "video_1" in line] == \
        ["queued at position 1 (0 running)", "started", "completed"]
    assert any(line.startswith("video video_2 failed after") and "no such face" in line for line in lines), lines
    assert any("video video_2 queued at position 2" in line for line in lines), lines
