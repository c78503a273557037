"""A video job's MP4 streamed while the VAE decodes (`GET /v1/videos/{id}/stream`), in process:
the stream opened before the job runs gives, piece by piece, exactly the finished file; the
`first_fragment` event comes before the job completes; a finished job streams its file; a
failed, cancelled or unknown one is refused; a lip-synced job streams its file at the end."""

from __future__ import annotations

import json
import threading

import pytest
from fastapi.testclient import TestClient

from deployments.local import LocalGraph
from deployments.media.video import decode_mp4
from deployments.profiles import load_profile
from helpers import get_dummy_image, png_bytes, wait_final, wav_bytes

IMAGE = png_bytes(get_dummy_image())
# 33 frames at 16 fps: a fragment at frames 16 and 32, so the file comes in several pieces.
LONG_CLIP = {"prompt": "a woman talks", "size": "32x16", "num_frames": "33", "num_inference_steps": "4", "seed": "3"}


@pytest.fixture
def client(tmp_path):
    overrides = {"serving": {"storage_dir": str(tmp_path / "store")},
                 "stages": {r: {"simulate_step_seconds": 0.2} for r in ("high", "low")}}
    with TestClient(LocalGraph(load_profile("tiny", overrides)).app()) as c:
        yield c


def create(c, data=LONG_CLIP, audio=None):
    files = {"input_reference": ("p.png", IMAGE, "image/png")}
    if audio is not None:
        files["audio"] = ("a.wav", audio, "audio/wav")
    r = c.post("/v1/videos", data=data, files=files)
    assert r.status_code == 200, r.text
    return r.json()


def events(c, job_id):
    with c.stream("GET", f"/v1/videos/{job_id}/events") as r:
        return [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]


def test_the_stream_opened_before_the_job_runs_is_the_finished_file_piece_by_piece(client):
    job = create(client)
    pieces = []
    with client.stream("GET", f"/v1/videos/{job['id']}/stream") as r:
        assert r.status_code == 200 and r.headers["content-type"] == "video/mp4"
        for piece in r.iter_bytes():
            pieces.append(piece)
    final = wait_final(client, job["id"])
    assert final["status"] == "completed"
    content = client.get(f"/v1/videos/{job['id']}/content").content
    assert b"".join(pieces) == content
    frames, fps = decode_mp4(content)
    assert frames.shape == (33, 16, 32, 3) and fps == 16
    names = [e["event"] for e in events(client, job["id"])]
    assert names.index("first_fragment") < names.index("completed"), names
    assert names.count("first_fragment") == 1
    # Once completed, the stream is the saved file.
    assert client.get(f"/v1/videos/{job['id']}/stream").content == content


def test_several_followers_get_the_same_bytes(client):
    job = create(client)
    got: list[bytes] = [b"", b""]

    def follow(i):
        got[i] = client.get(f"/v1/videos/{job['id']}/stream").content

    threads = [threading.Thread(target=follow, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    content = client.get(f"/v1/videos/{job['id']}/content").content
    assert got[0] == got[1] == content


def test_an_unknown_job_is_404_and_a_cancelled_one_409(client):
    r = client.get("/v1/videos/video_nope/stream")
    assert r.status_code == 404 and r.json()["error"]["param"] == "video_id"
    job = create(client, {**LONG_CLIP, "num_inference_steps": "20"})
    client.delete(f"/v1/videos/{job['id']}")
    assert wait_final(client, job["id"])["status"] == "cancelled"
    r = client.get(f"/v1/videos/{job['id']}/stream")
    assert r.status_code == 409 and r.json()["error"]["type"] == "conflict_error"


def test_a_stream_open_when_the_job_is_cancelled_ends(client):
    job = create(client, {**LONG_CLIP, "num_inference_steps": "20"})
    opened, done = threading.Event(), threading.Event()
    got = {}

    def follow():
        with client.stream("GET", f"/v1/videos/{job['id']}/stream") as r:
            got["status"] = r.status_code
            opened.set()  # the response has started: the stream is open
            got["content"] = r.read()
        done.set()

    threading.Thread(target=follow, daemon=True).start()
    assert opened.wait(30)
    client.delete(f"/v1/videos/{job['id']}")
    assert done.wait(30), "the stream of a cancelled job did not end"
    assert got["status"] == 200 and got["content"] == b""


def test_a_lip_synced_job_streams_its_file_when_it_is_made(client):
    job = create(client, {**LONG_CLIP, "num_frames": "9"}, audio=wav_bytes(0.6))
    streamed = client.get(f"/v1/videos/{job['id']}/stream").content
    assert wait_final(client, job["id"])["status"] == "completed"
    assert streamed == client.get(f"/v1/videos/{job['id']}/content").content
    assert decode_mp4(streamed)[1] == 25
