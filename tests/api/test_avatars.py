"""Avatars and streamed talk turns through the ingress on the in-process graph, and video jobs
with audio. The same flow over real HTTP on a Ray cluster is in tests/test_cluster.py."""

from __future__ import annotations

import re
import time

import pytest
from fastapi.testclient import TestClient

from deployments.local import LocalGraph
from deployments.media.video import decode_mp4
from deployments.profiles import load_profile
from helpers import durations, get_dummy_image, png_bytes, wait_final, wait_ready, wav_bytes

IMAGE = png_bytes(get_dummy_image())
AVATAR = {"prompt": "a woman talks", "size": "32x32", "num_frames": "5", "num_inference_steps": "2"}


@pytest.fixture(scope="module")
def graph(tmp_path_factory):
    """One graph for the module's tests on these settings; each test waits for the work it
    starts, so the next finds the stages idle."""
    return LocalGraph(load_profile("tiny", {"serving": {"storage_dir": str(tmp_path_factory.mktemp("store"))},
                                            "limits": {"max_audio_bytes": 400_000, "max_audio_seconds": 3}}))


@pytest.fixture(scope="module")
def client(graph):
    with TestClient(graph.app()) as c:
        yield c


@pytest.fixture(scope="module")
def avatar(client) -> dict:
    """A ready avatar, shared by the tests that only talk to it."""
    return wait_ready(client, create(client).json()["id"])


def create(c, data=AVATAR):
    return c.post("/v1/avatars", data=data, files={"input_reference": ("p.png", IMAGE, "image/png")})


def test_avatar_is_created_once_and_speaks_in_a_stream(graph, client):
    own = {**AVATAR, "prompt": "a woman talks, created once"}  # an avatar of its own: deleted below
    r = create(client, own)
    assert r.status_code == 201, r.text
    avatar = wait_ready(client, r.json()["id"])
    assert avatar["status"] == "ready" and avatar["fps"] == 25 and "prepared_id" not in avatar
    # 5 frames at 16 fps -> 8 frames at 25 fps, forward then backward.
    assert avatar["cycle_frames"] == 16
    encodes = graph.encoder.calls["encode"]
    again = create(client, own)
    assert again.status_code == 200 and again.json()["id"] == avatar["id"]
    assert graph.encoder.calls["encode"] == encodes  # idempotent: no second generation

    chunks = []
    with client.stream("POST", f"/v1/avatars/{avatar['id']}/speech",
                  files={"audio": ("a.wav", wav_bytes(1.3), "audio/wav")}) as s:
        assert s.status_code == 200 and s.headers["content-type"] == "video/mp4"
        chunks = list(s.iter_bytes())
    mp4 = b"".join(chunks)
    frames, video_s, audio_s = durations(mp4)
    assert frames == 32  # floor(1.3 * 25)
    assert abs(audio_s - video_s) <= 1 / 25
    assert decode_mp4(mp4)[0].shape[1:] == (32, 32, 3)

    raw = client.post(f"/v1/avatars/{avatar['id']}/speech", content=wav_bytes(0.5),
                 headers={"content-type": "audio/wav"})
    assert raw.status_code == 200 and durations(raw.content)[0] == 12

    prepared_id = graph.ingress.records.avatars[avatar["id"]].prepared_id
    assert graph.lipsync.target.store.get(prepared_id) is not None
    assert client.delete(f"/v1/avatars/{avatar['id']}").json()["deleted"] is True
    assert client.post(f"/v1/avatars/{avatar['id']}/speech",
                  files={"audio": ("a.wav", wav_bytes(0.5), "audio/wav")}).status_code == 404
    assert graph.lipsync.target.store.get(prepared_id) is None  # the stage dropped it too


BAD_SPEECH = [
    ("not audio", {"audio": ("a.wav", b"this is not audio at all", "audio/wav")}, 400, "audio"),
    ("empty audio", {"audio": ("a.wav", b"", "audio/wav")}, 400, "audio"),
    ("too long", {"audio": ("a.wav", wav_bytes(4.0, rate=8000, channels=1), "audio/wav")}, 422, "audio"),
    ("too many bytes", {"audio": ("a.wav", wav_bytes(2.9, rate=48000), "audio/wav")}, 413, "audio"),
    ("no audio", None, 422, "audio"),
]


@pytest.mark.parametrize("case,files,status,param", BAD_SPEECH, ids=[b[0] for b in BAD_SPEECH])
def test_bad_speech_is_refused_before_the_lipsync_stage(graph, client, avatar, case, files, status, param):
    calls = dict(graph.lipsync.calls)
    r = client.post(f"/v1/avatars/{avatar['id']}/speech", files=files, data={"start_index": "0"})
    assert r.status_code == status, r.text
    assert r.json()["error"]["param"] == param
    assert graph.lipsync.calls == calls  # nothing reached the stage
    # ...and the avatar still speaks.
    ok = client.post(f"/v1/avatars/{avatar['id']}/speech", files={"audio": ("a.wav", wav_bytes(0.5), "audio/wav")})
    assert ok.status_code == 200


def test_unknown_and_unready_avatars(client):
    r = client.post("/v1/avatars/avatar_nope/speech", files={"audio": ("a.wav", wav_bytes(0.5), "audio/wav")})
    assert r.status_code == 404 and r.json()["error"]["param"] == "avatar_id"
    assert client.get("/v1/avatars/avatar_nope").status_code == 404
    assert client.delete("/v1/avatars/avatar_nope").status_code == 404
    slow = create(client, {**AVATAR, "num_inference_steps": "20"}).json()
    r = client.post(f"/v1/avatars/{slow['id']}/speech", files={"audio": ("a.wav", wav_bytes(0.5), "audio/wav")})
    assert r.status_code == 409 and r.json()["error"]["type"] == "conflict_error"
    r = create(client, {**AVATAR, "face_box": "10,10,5,5"})
    assert r.status_code == 422 and r.json()["error"]["param"] == "face_box"
    wait_ready(client, slow["id"])


def test_video_job_with_audio_is_lip_synced(client):
    r = client.post("/v1/videos", data={"prompt": "a man talks", "size": "32x32", "num_frames": "5",
                                   "num_inference_steps": "2"},
               files={"input_reference": ("p.png", IMAGE, "image/png"),
                      "audio": ("a.wav", wav_bytes(0.8), "audio/wav")})
    assert r.status_code == 200 and r.json()["has_audio"] is True
    job_id = r.json()["id"]
    deadline = time.monotonic() + 60
    while client.get(f"/v1/videos/{job_id}").json()["status"] not in ("completed", "failed") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert client.get(f"/v1/videos/{job_id}").json()["status"] == "completed"
    frames, video_s, audio_s = durations(client.get(f"/v1/videos/{job_id}/content").content)
    assert frames == 20 and abs(audio_s - video_s) <= 1 / 25
    # The record says what was delivered (25 fps, 20 frames, 0.8 s), not the 5-frame base clip.
    job = client.get(f"/v1/videos/{job_id}").json()
    assert (job["fps"], job["num_frames"], float(job["seconds"])) == (25, frames, 0.8)
    r = client.post("/v1/videos", data={"prompt": "x"}, files={"input_reference": ("p.png", IMAGE, "image/png"),
                                                         "audio": ("a.wav", b"junk", "audio/wav")})
    assert r.status_code == 400 and r.json()["error"]["param"] == "audio"


def test_deleting_a_queued_avatar_leaves_the_queue_working(tmp_path):
    """Delete a queued avatar and submit a job at once, before the cancelled task has run: the
    queue must not trip over the deleted entry."""
    import asyncio

    graph = LocalGraph(load_profile("tiny", {"serving": {"storage_dir": str(tmp_path), "max_running_jobs": 1},
                                            "stages": {r: {"simulate_step_seconds": 0.05} for r in ("high", "low")}}))
    ingress = graph.ingress
    request = {k: v for k, v in AVATAR.items()}

    async def scenario():
        first, _ = await ingress.create_avatar({**request, "num_inference_steps": "10"}, IMAGE)
        queued, _ = await ingress.create_avatar({**request, "seed": "5"}, IMAGE)
        assert queued.status == "queued" and queued.id in [r.id for r in ingress.queue.waiting]
        await ingress.delete_avatar(queued.id)
        job = await ingress.submit({"prompt": "x", "size": "16x16", "num_frames": 5, "num_inference_steps": 2}, IMAGE)
        while not (job.final and ingress.records.avatars[first.id].final):
            await asyncio.sleep(0.05)
        return first, job, queued

    first, job, queued = asyncio.run(scenario())
    assert ingress.records.avatars[first.id].status == "ready" and job.status == "completed"
    assert queued.id not in ingress.records.avatars and queued.id not in [r.id for r in ingress.queue.waiting]


def test_a_ready_avatar_still_talks_after_every_stage_restarts(tmp_path):
    """Avatars are stored beside the jobs by default (`<storage_dir>/avatars`): a whole new graph
    over the same storage (the ingress and lip-sync replicas restarted) answers a talk turn on an
    avatar the old one prepared, without preparing it again."""
    cfg = load_profile("tiny", {"serving": {"storage_dir": str(tmp_path)}})
    assert cfg.stages.lipsync.avatar_cache_dir == str(tmp_path / "avatars")
    with TestClient(LocalGraph(cfg).app()) as c:
        avatar = wait_ready(c, create(c).json()["id"])
    again = LocalGraph(cfg)
    with TestClient(again.app()) as c:
        assert c.get(f"/v1/avatars/{avatar['id']}").json()["status"] == "ready"
        r = c.post(f"/v1/avatars/{avatar['id']}/speech", files={"audio": ("a.wav", wav_bytes(0.5), "audio/wav")})
        assert r.status_code == 200, r.text
        assert decode_mp4(r.content)[0].shape[0] == 12  # floor(0.5 s * 25)
    assert again.encoder.calls["encode"] == 0


def test_seed_minus_one_means_a_random_seed(client):
    jobs = [client.post("/v1/videos", data={**AVATAR, "seed": "-1"},
                        files={"input_reference": ("p.png", IMAGE, "image/png")}).json() for _ in range(3)]
    seeds = {job["seed"] for job in jobs}
    assert len(seeds) > 1 and all(0 <= s < 2**31 for s in seeds)
    for job in jobs:  # the stages are shared: leave them idle
        wait_final(client, job["id"])


def test_each_turn_logs_its_first_byte_and_size_at_the_ingress(client, avatar, caplog):
    with caplog.at_level("INFO", logger="avatar_serve.ingress"):
        r = client.post(f"/v1/avatars/{avatar['id']}/speech", files={"audio": ("a.wav", wav_bytes(0.5), "audio/wav")})
    assert r.status_code == 200
    lines = [rec.getMessage() for rec in caplog.records if rec.getMessage().startswith("turn on")]
    assert len(lines) == 1, lines
    # The line's shape, not its times (a loaded machine makes any bound flaky): each field a number.
    number = r"\d+\.\d+"
    assert re.fullmatch(rf"turn on {avatar['id']}: audio decode {number} s, first byte {number} s, "
                        rf"{len(r.content)} bytes in {number} s", lines[0]), lines[0]
