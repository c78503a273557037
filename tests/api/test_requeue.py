"""Nothing lost across a restart: video jobs and avatar preparations an ingress left queued or
running are queued again by the next ingress over the same storage, in their order, at most once
more, within `serving.requeue_max_jobs`, and make the same MP4 as an undisturbed run.

A restart is a copy of the storage folder taken while the first ingress runs (the disk as a crash
at that moment leaves it: every file is written atomically), and a new ingress over the copy. The
first ingress goes on undisturbed: its results are what the restarted ones must equal."""

from __future__ import annotations

import asyncio
import io
import json
import shutil
import time

import numpy as np
import pytest
from fastapi.testclient import TestClient

from deployments.api.jobs import Job, JobStore, Records
from deployments.api.queue import EVENT_IDS_PER_RUN
from deployments.api.requeue import EXCESS, LOST, OFF, TWICE, Inputs, dump, keep, load, plan
from deployments.api.routes import build_app
from deployments.common.payloads import Speech
from deployments.ingress import Ingress
from deployments.local import LocalGraph
from deployments.profiles import load_profile
from helpers import HANG_S, get_dummy_image, get_dummy_params, png_bytes, wait_final, wav_bytes

IMAGE = png_bytes(get_dummy_image())
JOB = {"prompt": "a woman talks", "size": "32x16", "num_frames": "5", "num_inference_steps": "3"}


def make_graph(store, step_s=0.1, **serving):
    overrides = {"serving": {"storage_dir": str(store), "max_running_jobs": 1, **serving},
                 "stages": {r: {"simulate_step_seconds": step_s} for r in ("high", "low")}}
    return LocalGraph(load_profile("tiny", overrides))


def restarted(graph: LocalGraph, store, **serving) -> Ingress:
    """A new ingress over `store`, on the same stages (the same weights)."""
    cfg = load_profile("tiny", {"serving": {"storage_dir": str(store), "max_running_jobs": 1, **serving}})
    g = graph
    return Ingress(g.encoder, g.high, g.low, g.decoder, cfg, g.lipsync)


def submit(client, data=JOB, audio: bytes | None = None, kind="videos"):
    files = {"input_reference": ("p.png", IMAGE, "image/png")}
    if audio is not None:
        files["audio"] = ("a.wav", audio, "audio/wav")
    r = client.post(f"/v1/{kind}", data=data, files=files)
    assert r.status_code in (200, 201), r.text
    return r.json()


def crash_copy(client, record_id, store, dest, kind="videos"):
    """Wait until `record_id` is running (its first denoise step), then copy the storage folder."""
    if kind == "videos":
        with client.stream("GET", f"/v1/videos/{record_id}/events") as r:
            for line in r.iter_lines():
                if line.startswith("data: ") and json.loads(line[6:])["event"] == "step":
                    break
    else:
        deadline = time.monotonic() + HANG_S
        while client.get(f"/v1/avatars/{record_id}").json().get("step") is None:
            assert time.monotonic() < deadline, "the avatar never reached a denoise step"
            time.sleep(0.02)
    shutil.copytree(store, dest, ignore=shutil.ignore_patterns(".*.tmp"))


def until_final(ingress: Ingress, ids, timeout=HANG_S) -> dict:
    """Poll the ingress's own records (no request reaches it) until every one is final."""
    deadline = time.monotonic() + timeout
    records = {**ingress.records.jobs, **ingress.records.avatars}
    while not all(records[i].final for i in ids):
        assert time.monotonic() < deadline, {i: records[i].status for i in ids}
        time.sleep(0.02)
    return {i: records[i] for i in ids}


def events(client, job_id, last: str | None = None):
    headers = {"Last-Event-ID": last} if last is not None else {}
    with client.stream("GET", f"/v1/videos/{job_id}/events", headers=headers) as r:
        return [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]


def test_jobs_left_unfinished_run_again_in_order_with_the_same_bytes(tmp_path):
    """One job running (its seed left to the server), two queued behind it (one with audio): after
    the restart all three run again without a request arriving, in their order, each the MP4 of
    the undisturbed run; a client following one sees it re-queued, then its progress, then the end."""
    store = tmp_path / "store"
    graph = make_graph(store)
    with TestClient(graph.app()) as c:
        first = submit(c)
        second = submit(c, {**JOB, "seed": "5"}, audio=wav_bytes(0.6))
        third = submit(c, {**JOB, "seed": "9", "num_frames": "9"})
        ids = [first["id"], second["id"], third["id"]]
        crash_copy(c, first["id"], store, tmp_path / "copy")
        undisturbed = [wait_final(c, i) for i in ids]
    assert [j["status"] for j in undisturbed] == ["completed"] * 3

    again = restarted(graph, tmp_path / "copy")
    assert [(again.records.jobs[i].status, again.records.jobs[i].attempt) for i in ids] == [("queued", 2)] * 3
    assert sorted(p.stem for p in (tmp_path / "copy" / "inputs").iterdir()) == sorted(ids)
    with TestClient(build_app(again)) as c:
        done = until_final(again, ids)  # its start-up started them: no request has come
        assert [done[i].status for i in ids] == ["completed"] * 3, [done[i].error for i in ids]
        for i in ids:
            assert (tmp_path / "copy" / "results" / f"{i}.mp4").read_bytes() == \
                   (store / "results" / f"{i}.mp4").read_bytes()
            assert c.get(f"/v1/videos/{i}").json()["attempt"] == 2
        assert done[first["id"]].seed == undisturbed[0]["seed"]
        assert not list((tmp_path / "copy" / "inputs").iterdir())  # final: their inputs are gone

        streams = [events(c, i) for i in ids]
        for evs in streams:
            assert (evs[0]["event"], evs[0]["attempt"], evs[0]["reason"], evs[0]["progress"]) == ("requeued", 2, "restart", 0)
            assert evs[-1]["event"] == "completed" and any(e["event"] == "step" for e in evs)
            assert [e["id"] for e in evs] == list(range(EVENT_IDS_PER_RUN, EVENT_IDS_PER_RUN + len(evs)))
        # Their places in the new queue: the order they were submitted in.
        assert [next(e["position"] for e in evs if e["event"] == "queued") for evs in streams] == [1, 2, 3]
        # A client that followed the first run reconnects with an id it got from it: the new run's
        # events, all of them; one with an id of the new run resumes after it.
        assert events(c, ids[0], last="4") == streams[0]
        assert events(c, ids[0], last=str(streams[0][2]["id"])) == streams[0][3:]


def test_a_job_runs_again_at_most_once_and_a_lost_or_torn_input_fails_it(tmp_path):
    store = tmp_path / "store"
    graph = make_graph(store)
    with TestClient(graph.app()) as c:
        ids = [submit(c)["id"] for _ in range(3)]
        crash_copy(c, ids[0], store, tmp_path / "copy")
        for i in ids:
            wait_final(c, i)
    (tmp_path / "copy" / "inputs" / f"{ids[1]}.npz").unlink()
    (tmp_path / "copy" / "inputs" / f"{ids[2]}.npz").write_bytes(b"PK\x03\x04 not a whole file")

    again = restarted(graph, tmp_path / "copy")
    with TestClient(build_app(again)) as c:
        for i in ids[1:]:
            lost = c.get(f"/v1/videos/{i}").json()
            assert lost["status"] == "failed" and lost["error"] == {"code": "interrupted", "message": LOST}
            assert [e["event"] for e in events(c, i)] == ["failed"]
        crash_copy(c, ids[0], tmp_path / "copy", tmp_path / "copy2")  # the rerun is interrupted too
        assert wait_final(c, ids[0])["status"] == "completed"

    twice = restarted(graph, tmp_path / "copy2")
    with TestClient(build_app(twice)) as c:
        job = c.get(f"/v1/videos/{ids[0]}").json()
        assert job["status"] == "failed" and job["error"] == {"code": "interrupted", "message": TWICE}
        assert job["attempt"] == 2 and not list((tmp_path / "copy2" / "inputs").iterdir())
        assert [e["event"] for e in events(c, ids[0])] == ["failed"]
        assert wait_final(c, submit(c)["id"])["status"] == "completed"  # and new work runs


def test_the_requeue_bound_keeps_the_oldest_and_fails_the_rest_with_the_reason(tmp_path):
    store = tmp_path / "store"
    graph = make_graph(store)
    with TestClient(graph.app()) as c:
        ids = [submit(c, {**JOB, "seed": str(i)})["id"] for i in range(3)]
        crash_copy(c, ids[0], store, tmp_path / "copy")
        for i in ids:
            wait_final(c, i)
    shutil.copytree(tmp_path / "copy", tmp_path / "copy-off")

    again = restarted(graph, tmp_path / "copy", requeue_max_jobs=2)
    with TestClient(build_app(again)):
        done = until_final(again, ids)
    assert [done[i].status for i in ids] == ["completed", "completed", "failed"]
    assert done[ids[2]].error.code == "interrupted" and done[ids[2]].error.message == EXCESS.format(n=2)
    assert "2 jobs submitted before it" in EXCESS.format(n=2)

    off = restarted(graph, tmp_path / "copy-off", requeue_max_jobs=0)
    assert {off.records.jobs[i].error.message for i in ids} == {OFF}


def test_an_avatar_in_preparation_is_prepared_again_to_the_same_clip(tmp_path):
    store = tmp_path / "store"
    graph = make_graph(store)
    with TestClient(graph.app()) as c:
        avatar = submit(c, {**JOB, "size": "32x32", "face_box": "4,4,28,28"}, kind="avatars")
        crash_copy(c, avatar["id"], store, tmp_path / "copy", kind="avatars")
        assert wait_final(c, avatar["id"], kind="avatars")["status"] == "ready"
    prepared = graph.ingress.records.avatars[avatar["id"]].prepared_id

    again = restarted(graph, tmp_path / "copy")
    with TestClient(build_app(again)) as c:
        record = until_final(again, [avatar["id"]])[avatar["id"]]
        assert record.status == "ready" and record.attempt == 2
        assert record.prepared_id == prepared  # the lip-sync stage's hash of the clip: the same clip
        turn = c.post(f"/v1/avatars/{avatar['id']}/speech", files={"audio": ("a.wav", wav_bytes(0.5), "audio/wav")})
        assert turn.status_code == 200 and turn.content


def test_without_the_http_app_the_first_submit_starts_requeued_work_ahead_of_it(tmp_path):
    """A caller of the Python API alone (no app start-up): the re-queued job takes the queue's
    first place, the new one the next; a re-queued job cancelled before that never runs."""
    store = tmp_path / "store"
    graph = make_graph(store)
    with TestClient(graph.app()) as c:
        ids = [submit(c)["id"] for _ in range(2)]
        crash_copy(c, ids[0], store, tmp_path / "copy")
        for i in ids:
            wait_final(c, i)
    again = restarted(graph, tmp_path / "copy")
    assert again.cancel_or_delete(ids[1]).status == "cancelled"
    assert not (tmp_path / "copy" / "inputs" / f"{ids[1]}.npz").exists()

    async def run():
        steps = graph.high.calls["denoise_stream"]
        new = await again.submit({"prompt": "later", "size": "32x16", "num_frames": 5, "num_inference_steps": 2},
                                 IMAGE)
        while not (again.records.jobs[ids[0]].final and new.final):
            await asyncio.sleep(0.02)
        return new, graph.high.calls["denoise_stream"] - steps

    new, runs = asyncio.run(asyncio.wait_for(run(), HANG_S))
    assert again.records.jobs[ids[0]].status == "completed" and new.status == "completed"
    started = {i: next(e["at"] for e in again.queue.events[i].events if e["event"] == "stage")
               for i in (ids[0], new.id)}
    assert started[ids[0]] < started[new.id]  # one job runs at a time: the re-queued one first
    assert again.records.jobs[ids[1]].status == "cancelled" and runs == 2  # the cancelled one never ran


def test_inputs_read_back_as_written_and_plan_sorts_by_submission(tmp_path):
    """Unit level: the inputs file round-trips bit for bit; `plan` orders by submission time,
    not by file or id order, deletes inputs no re-queued record needs, and refuses a file of
    another format."""
    pcm = Speech(np.sin(np.linspace(0, 300, 8000)).astype(np.float32) / 3)
    inputs = Inputs(get_dummy_params(seed=123456789), get_dummy_image(), pcm, (1, 2, 30, 40), queued_ns=42)
    back = load(dump(inputs))
    assert back.params == inputs.params and back.face_box == (1, 2, 30, 40) and back.queued_ns == 42
    assert back.pixels.tobytes() == inputs.pixels.tobytes() and back.audio.pcm.tobytes() == pcm.pcm.tobytes()
    other = io.BytesIO()
    np.savez(other, meta=np.frombuffer(b'{"format": 7}', np.uint8), pixels=inputs.pixels)
    with pytest.raises(ValueError, match="format"):
        load(other.getvalue())

    store = JobStore(tmp_path)
    for name, queued_ns in (("video_b", 3), ("video_a", 5), ("video_c", 1)):
        store.save(Job(id=name, status="queued", created_at=0, model="tiny", prompt="x", size="16x16",
                       seconds="1", num_frames=9, fps=16, seed=1, num_inference_steps=2))
        store.save_inputs(name, dump(Inputs(get_dummy_params(), get_dummy_image(), queued_ns=queued_ns)))
    store.save_inputs("video_orphan", dump(inputs))  # its record was never written
    kept = plan(Records(store, 3600, 10**9), 2)
    assert [r.id for r, _ in kept] == ["video_c", "video_b"]
    assert sorted(store.inputs_ids()) == ["video_b", "video_c"]
    assert Records(store, 3600, 10**9).jobs["video_a"].error.message == EXCESS.format(n=2)


def test_a_failed_inputs_write_leaves_the_job_running_and_a_late_write_is_not_kept(tmp_path, monkeypatch, caplog):
    """A disk that refuses the inputs: the job still runs (only a restart would fail it), with a
    warning. Inputs whose record ended, or went, while they were written are deleted."""
    store = tmp_path / "store"
    graph = make_graph(store, step_s=0.0)

    def refuse(record_id, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(graph.ingress.records.store, "save_inputs", refuse)
    with caplog.at_level("WARNING", logger="avatar_serve.requeue"), TestClient(graph.app()) as c:
        job = submit(c)
        assert wait_final(c, job["id"])["status"] == "completed"
    assert any("inputs not saved" in r.getMessage() and job["id"] in r.getMessage() for r in caplog.records)
    assert not list((store / "inputs").iterdir())

    records = Records(JobStore(tmp_path / "other"), 3600, 10**9)
    ended = Job(id="video_ended", status="cancelled", created_at=0, model="tiny", prompt="x", size="16x16",
                seconds="1", num_frames=9, fps=16, seed=1, num_inference_steps=2)
    records.add(ended)
    gone = ended.model_copy(update={"id": "video_gone", "status": "queued"})  # never added: deleted
    for record in (ended, gone):
        asyncio.run(keep(records, record, Inputs(get_dummy_params(), get_dummy_image())))
    assert records.store.inputs_ids() == []
