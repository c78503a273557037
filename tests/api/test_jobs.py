"""Video jobs in process (FastAPI TestClient over the in-process graph): lifecycle, progress
events, cancel, deadline, queue bound, restart over the same storage, auth, expiry. The same
behaviours run over real HTTP on a Ray cluster in tests/test_cluster.py."""

from __future__ import annotations

import json
import time

import pytest
from fastapi.testclient import TestClient

from deployments.api.jobs import Job, JobStore, Records, new_job_id
from deployments.api.protocol import ApiError, frames_for_seconds
from deployments.api.requeue import LOST
from deployments.api.routes import build_app
from deployments.ingress import Ingress
from deployments.local import LocalGraph
from deployments.media.video import decode_mp4
from deployments.profiles import load_profile
from helpers import HANG_S, get_dummy_image, png_bytes, wait_final

IMAGE = png_bytes(get_dummy_image())
FAST = {"prompt": "a woman talks", "size": "32x16", "num_frames": "5", "num_inference_steps": "2"}
SLOW = {**FAST, "num_inference_steps": "20"}


def make_graph(tmp_path, step_s=0.0, **serving):
    overrides = {"serving": {"storage_dir": str(tmp_path / "store"), **serving},
                 "stages": {r: {"simulate_step_seconds": step_s} for r in ("high", "low")}}
    return LocalGraph(load_profile("tiny", overrides))


def create(client, data=FAST, headers=None):
    return client.post("/v1/videos", data=data, files={"input_reference": ("p.png", IMAGE, "image/png")},
                       headers=headers or {})


def events(client, job_id, headers=None):
    out = []
    with client.stream("GET", f"/v1/videos/{job_id}/events", headers=headers or {}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                out.append(json.loads(line[6:]))
    return out


def test_events_carry_ids_and_times_and_a_reconnect_resumes_after_the_last_id(tmp_path):
    graph = make_graph(tmp_path)
    with TestClient(graph.app()) as c:
        job = create(c).json()
        evs = events(c, job["id"])
        assert [e["id"] for e in evs] == list(range(len(evs))) and evs[-1]["event"] == "completed"
        assert all(a["at"] <= b["at"] for a, b in zip(evs, evs[1:]))
        resumed = events(c, job["id"], {"Last-Event-ID": str(evs[2]["id"])})
        assert resumed == evs[3:]
        assert events(c, job["id"], {"Last-Event-ID": "junk"}) == evs  # an id we never sent: all of them
        with c.stream("GET", f"/v1/videos/{job['id']}/events") as r:
            lines = list(r.iter_lines())
        assert lines[0] == "retry: 2000" and f"id: {evs[-1]['id']}" in lines


def test_a_stream_resumed_at_or_past_the_end_still_ends_with_the_final_event(tmp_path):
    graph = make_graph(tmp_path)
    with TestClient(graph.app()) as c:
        job = create(c).json()
        evs = events(c, job["id"])
        final = evs[-1]
        for last in (final["id"], final["id"] + 1, 999_999_999):
            assert events(c, job["id"], {"Last-Event-ID": str(last)}) == [final], last


def test_a_running_job_resumed_past_its_last_event_ends_with_its_final_one():
    """Last-Event-ID beyond anything the job has sent, while it runs: nothing until it ends, then
    its final event (not a stream that never ends or ends empty)."""
    import asyncio

    from deployments.api.jobs import JobEvents

    async def run():
        job = JobEvents()
        job.emit("queued")
        got = []

        async def listen():
            async for event in job.follow(after=50):
                got.append(event["event"])

        listener = asyncio.create_task(listen())
        await asyncio.sleep(0)
        job.emit("in_progress")
        job.emit("completed")
        job.close()
        await asyncio.wait_for(listener, HANG_S)
        return got

    assert asyncio.run(run()) == ["completed"]


def test_a_quiet_event_stream_sends_keepalives_and_loses_no_event():
    """The source stays quiet until the stream has sent three keep-alives (an event, not a
    sleep: as many as a loaded machine's timers give), then its events all arrive."""
    import asyncio

    from deployments.api.routes import with_keepalive

    keepalive = ": keep-alive\n\n"

    async def collect():
        lines, quiet = [], asyncio.Event()

        async def slow():
            await quiet.wait()
            yield {"event": "step", "id": 0}
            yield {"event": "completed", "id": 1}

        async for line in with_keepalive(slow(), 0.05):
            lines.append(line)
            if lines.count(keepalive) == 3:
                quiet.set()
        return lines

    lines = asyncio.run(collect())
    assert lines[0] == keepalive and lines.count(keepalive) >= 3
    assert [line for line in lines if not line.startswith(":")] == [
        'id: 0\nevent: step\ndata: {"event": "step", "id": 0}\n\n',
        'id: 1\nevent: completed\ndata: {"event": "completed", "id": 1}\n\n']


def test_job_lifecycle_events_content_list_delete(tmp_path):
    graph = make_graph(tmp_path)
    with TestClient(graph.app()) as c:
        r = create(c)
        assert r.status_code == 200, r.text
        job = r.json()
        assert job["object"] == "video" and job["status"] in ("queued", "in_progress")
        assert job["model"] == "tiny" and job["size"] == "32x16" and job["seconds"] == "0.3125"
        evs = events(c, job["id"])
        kinds = [e["event"] for e in evs]
        assert kinds[0] == "queued" and kinds[-1] == "completed"
        steps = [e for e in evs if e["event"] == "step"]
        assert [(s["step"], s["total"]) for s in steps] == [(1, 2), (2, 2)]
        assert [s["expert"] for s in steps] == ["high", "low"]
        assert [e["progress"] for e in evs if "progress" in e] == sorted(e["progress"] for e in evs if "progress" in e)
        done = c.get(f"/v1/videos/{job['id']}").json()
        assert done["status"] == "completed" and done["progress"] == 100 and done["completed_at"]
        content = c.get(f"/v1/videos/{job['id']}/content")
        frames, fps = decode_mp4(content.content)
        assert frames.shape == (5, 16, 32, 3) and fps == 16

        ids = [job["id"]] + [create(c).json()["id"] for _ in range(2)]
        for i in ids:
            wait_final(c, i)
        page = c.get("/v1/videos", params={"limit": 2}).json()
        assert [j["id"] for j in page["data"]] == ids[::-1][:2] and page["has_more"]
        rest = c.get("/v1/videos", params={"limit": 2, "after": page["last_id"]}).json()
        assert [j["id"] for j in rest["data"]] == [ids[0]] and not rest["has_more"]

        gone = c.delete(f"/v1/videos/{ids[0]}").json()
        assert gone == {"id": ids[0], "object": "video.deleted", "deleted": True}
        assert c.get(f"/v1/videos/{ids[0]}").status_code == 404
        assert not (tmp_path / "store" / "results" / f"{ids[0]}.mp4").exists()


def test_content_before_completion_is_409_and_cancel_stops_between_steps(tmp_path):
    graph = make_graph(tmp_path, step_s=0.1)
    high = graph.high.target
    with TestClient(graph.app()) as c:
        job = create(c, SLOW).json()
        with c.stream("GET", f"/v1/videos/{job['id']}/events") as r:
            for line in r.iter_lines():
                if line.startswith("data: ") and json.loads(line[6:])["event"] == "step":
                    assert c.get(f"/v1/videos/{job['id']}/content").status_code == 409
                    assert c.delete(f"/v1/videos/{job['id']}").json()["status"] == "cancelled"
                    break
        final = wait_final(c, job["id"])
        assert final["status"] == "cancelled"
        time.sleep(0.3)  # a step already running finishes; none starts after it
        assert high.steps_run < 20 and graph.low.target.steps_run == 0
        nxt = create(c).json()
        assert wait_final(c, nxt["id"])["status"] == "completed"


def test_deadline_fails_the_job_and_the_next_one_runs(tmp_path):
    graph = make_graph(tmp_path, step_s=0.1, job_timeout_s=0.5)
    with TestClient(graph.app()) as c:
        job = create(c, SLOW).json()
        final = wait_final(c, job["id"])
        assert final["status"] == "failed" and final["error"]["code"] == "timeout"
        assert graph.high.target.steps_run < 20
        assert wait_final(c, create(c).json()["id"])["status"] == "completed"


def test_queue_bound_gives_429_with_retry_after(tmp_path):
    graph = make_graph(tmp_path, step_s=0.05, max_running_jobs=1, max_queued_jobs=1, retry_after_s=7)
    with TestClient(graph.app()) as c:
        a, b = create(c, SLOW).json(), create(c, SLOW).json()
        assert c.get(f"/v1/videos/{b['id']}").json()["queue_position"] == 1
        r = create(c)
        assert r.status_code == 429 and r.headers["retry-after"] == "7"
        assert r.json()["error"]["type"] == "rate_limit_error"
        for j in (a, b):
            assert wait_final(c, j["id"])["status"] == "completed"
        assert create(c).status_code == 200


def test_restart_lists_jobs_serves_content_and_fails_an_unfinished_job_without_inputs(tmp_path):
    """(A job with its inputs runs again: tests/api/test_requeue.py.)"""
    graph = make_graph(tmp_path)
    with TestClient(graph.app()) as c:
        done = create(c).json()
        wait_final(c, done["id"])
    store = JobStore(tmp_path / "store")
    # A job the previous ingress was running when it died.
    store.save(Job(id="video_interrupted", status="in_progress", created_at=int(time.time()), model="tiny",
                   prompt="x", size="16x16", seconds="1", num_frames=17, fps=16, seed=1, num_inference_steps=4))
    g = graph
    again = Ingress(g.encoder, g.high, g.low, g.decoder, load_profile("tiny", {"serving": {"storage_dir": str(tmp_path / "store")}}))
    with TestClient(build_app(again)) as c:
        ids = [j["id"] for j in c.get("/v1/videos").json()["data"]]
        assert set(ids) == {done["id"], "video_interrupted"}
        frames, _ = decode_mp4(c.get(f"/v1/videos/{done['id']}/content").content)
        assert frames.shape[0] == 5
        lost = c.get("/v1/videos/video_interrupted").json()
        assert lost["status"] == "failed" and lost["error"] == {"code": "interrupted", "message": LOST}
        assert [e["event"] for e in events(c, done["id"])] == ["completed"]


def finished_job(job_id: str, created_at: int, completed_at: int | None = None) -> Job:
    return Job(id=job_id, status="completed", created_at=created_at, completed_at=completed_at or created_at,
               model="tiny", prompt="x", size="16x16", seconds="1", num_frames=17, fps=16, seed=1,
               num_inference_steps=2)


def test_jobs_created_in_one_second_keep_their_order_across_a_restart(tmp_path):
    """created_at is whole seconds: ids are made in creation order, so the listing (newest first)
    and `after=` pages are the same after a restart as before it."""
    store = JobStore(tmp_path)
    records = Records(store, result_ttl_s=3600, max_result_bytes=10**9)
    now = int(time.time())
    for _ in range(12):
        job = finished_job(new_job_id(), now)
        records.add(job)
        store.save_result(job.id, b"x")
    before = [j.id for j in records.list_jobs(limit=100).data]
    assert before == sorted(before, reverse=True)  # ids sort in creation order
    again = Records(JobStore(tmp_path), result_ttl_s=3600, max_result_bytes=10**9)
    assert [j.id for j in again.list_jobs(limit=100).data] == before
    page = again.list_jobs(limit=5, after=before[3])
    assert [j.id for j in page.data] == before[4:9]


def test_a_result_expires_on_time_without_another_job_coming(tmp_path):
    """Past result_ttl_s a job is gone when asked for (record, content, listing), and its file is
    deleted: not only when the next job is submitted."""
    store = JobStore(tmp_path)
    forgotten = []
    records = Records(store, result_ttl_s=20, max_result_bytes=10**9, on_expire=forgotten.append)
    now = int(time.time())
    old, fresh = finished_job("video_old", now - 30), finished_job("video_fresh", now - 5)
    for job in (old, fresh):
        records.add(job)
        store.save_result(job.id, b"x")
    with pytest.raises(ApiError) as exc:
        records.content_path("video_old")
    assert exc.value.status == 404 and not store.result_path("video_old").exists()
    assert forgotten == ["video_old"]
    assert records.content_path("video_fresh").exists()
    assert [j.id for j in records.list_jobs().data] == ["video_fresh"]
    with pytest.raises(ApiError):
        records.job("video_old")


@pytest.mark.parametrize("seconds,fps,frames", [(5, 16, 81), (0.1, 16, 1), (1, 25, 25), (2, 16, 33), (3.1, 16, 49)])
def test_seconds_map_to_the_nearest_valid_frame_count(seconds, fps, frames):
    assert frames_for_seconds(seconds, fps) == frames


def test_results_expire_by_age_then_by_total_size(tmp_path):
    store = JobStore(tmp_path)
    jobs = {}
    for i, age in enumerate([100, 50, 10]):
        j = Job(id=f"video_{i}", status="completed", created_at=0, completed_at=1000 - age, model="tiny",
                prompt="x", size="16x16", seconds="1", num_frames=17, fps=16, seed=i, num_inference_steps=2)
        jobs[j.id] = j
        store.save(j)
        store.save_result(j.id, b"x" * 100)
    assert store.expire(jobs, ttl_s=60, max_bytes=10_000, now=1000) == ["video_0"]
    del jobs["video_0"]
    assert store.expire(jobs, ttl_s=600, max_bytes=150, now=1000) == ["video_1"]
    assert [p.name for p in (tmp_path / "results").iterdir()] == ["video_2.mp4"]
    assert {j.id for j in store.recover()} == {"video_2"}
