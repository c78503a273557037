"""Hostile requests at the ingress (in process, FastAPI TestClient): each is refused with a 4xx
that names the field, before any stage runs, without decoding more than the limits allow (the
pixels and samples decoded are counted), and /healthz keeps answering. The cases live in tests/hostile.py; the served tiny graph gets the same
list in tests/test_cluster.py."""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import pytest
from fastapi.testclient import TestClient

from deployments.local import LocalGraph, serve_in_thread
from deployments.profiles import load_profile
from helpers import HANG_S, health_probe, wait_ready
from hostile import FILES, LIMITS, VIDEO, WEBHOOKS, cases

CASES = cases()
SAMPLE_RATE = 16_000  # what uploads are decoded to (deployments.media.audio)
IMAGE_PIXELS = load_profile("tiny", {"limits": LIMITS}).limits.image_pixels  # the largest image decoded


@pytest.fixture(scope="module")
def graph(tmp_path_factory):
    return LocalGraph(load_profile("tiny", {
        "serving": {"storage_dir": str(tmp_path_factory.mktemp("store")), "body_timeout_s": 1.0,
                    "webhooks": WEBHOOKS},
        "limits": LIMITS}))


@pytest.fixture(scope="module")
def client(graph):
    with TestClient(graph.app(), raise_server_exceptions=False) as c:
        yield c


@pytest.fixture(scope="module")
def avatar_id(client):
    r = client.post("/v1/avatars", data=VIDEO, files=FILES)
    return wait_ready(client, r.json()["id"])["id"]


def test_there_are_enough_hostile_cases():
    assert len(CASES) >= 40 and len({c.name for c in CASES}) == len(CASES)


@pytest.fixture()
def decoded(monkeypatch):
    """What the request under test decodes: the pixel count of each image PIL loads, and the
    samples each audio decode (PyAV's resampler, which every decoded frame goes through) put out."""
    import av
    from PIL import ImageFile

    seen = {"pixels": [], "samples": []}
    load, resampler = ImageFile.ImageFile.load, av.AudioResampler

    def counted_load(image):
        seen["pixels"].append(image.size[0] * image.size[1])
        return load(image)

    class CountedResampler:
        def __init__(self, *args, **kwargs):
            self._resampler = resampler(*args, **kwargs)
            self._index = len(seen["samples"])
            seen["samples"].append(0)

        def resample(self, frame):
            out = self._resampler.resample(frame)
            seen["samples"][self._index] += sum(f.samples for f in out)
            return out

    monkeypatch.setattr(ImageFile.ImageFile, "load", counted_load)
    monkeypatch.setattr(av, "AudioResampler", CountedResampler)
    return seen


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_hostile_requests_are_refused_at_the_door(client, graph, avatar_id, decoded, case):
    calls = graph.stage_calls
    r = case.send(client, case.path.format(avatar=avatar_id))
    assert r.status_code == case.status, r.text
    error = r.json()["error"]
    assert error["param"] == case.param and error["message"] and "Traceback" not in r.text
    assert graph.stage_calls == calls
    # Bounded cost: nothing past the limits was decoded. An image's pixels are checked from its
    # header before any is decoded; audio stops decoding within a frame of the length limit (one
    # second is more than any frame holds), however long the file says it is or does not say.
    assert max(decoded["pixels"], default=0) <= IMAGE_PIXELS, decoded["pixels"]
    assert max(decoded["samples"], default=0) <= (LIMITS["max_audio_seconds"] + 1) * SAMPLE_RATE, decoded["samples"]


@pytest.fixture()
def server(graph):
    """The app on a real socket: a trickling client needs one."""
    url, stop = serve_in_thread(graph.app())
    yield url.removeprefix("http://")
    stop()


def test_a_body_that_trickles_gets_408_and_healthz_keeps_answering(server):
    host, port = server.split(":")
    body = b'{"prompt": "a woman talks", "seed": 1}'
    health = []

    def probe():
        for _ in range(6):
            health.append(health_probe(f"http://{server}/healthz"))
            time.sleep(0.2)

    checker = threading.Thread(target=probe)
    with socket.create_connection((host, int(port))) as s:
        s.sendall(b"POST /v1/videos HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n")
        checker.start()
        s.settimeout(10)
        answer = b""
        for byte in body:  # one byte every 0.3 s: the whole body would take 12 s
            try:
                s.sendall(bytes([byte]))
            except OSError:
                break
            time.sleep(0.3)
            s.setblocking(False)
            try:
                answer += s.recv(65536)
            except BlockingIOError:
                pass
            s.setblocking(True)
            if answer:
                break
        checker.join()
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b"timeout_error" in answer
    assert len(health) == 6 and not any(health), health  # every probe answered (none hung) while the body trickled


def test_sync_requests_wait_in_the_same_queue_as_jobs(tmp_path):
    graph = LocalGraph(load_profile("tiny", {
        "serving": {"storage_dir": str(tmp_path), "max_running_jobs": 1, "max_queued_jobs": 0, "retry_after_s": 4},
        "stages": {r: {"simulate_step_seconds": 0.2} for r in ("high", "low")}}))
    with TestClient(graph.app()) as c:
        job = c.post("/v1/videos", data={**VIDEO, "num_inference_steps": "10"}, files=FILES).json()
        r = c.post("/v1/videos/sync", data=VIDEO, files=FILES)
        assert r.status_code == 429 and r.headers["retry-after"] == "4", r.text
        assert c.delete(f"/v1/videos/{job['id']}").status_code == 200
        deadline = time.monotonic() + 30
        while c.post("/v1/videos/sync", data=VIDEO, files=FILES).status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        # the sync request was not listed as a job
        assert [j["id"] for j in c.get("/v1/videos").json()["data"]] == [job["id"]]


def test_a_sync_request_past_its_deadline_is_504(tmp_path):
    graph = LocalGraph(load_profile("tiny", {
        "serving": {"storage_dir": str(tmp_path), "job_timeout_s": 0.5},
        "stages": {r: {"simulate_step_seconds": 0.3} for r in ("high", "low")}}))
    with TestClient(graph.app()) as c:
        r = c.post("/v1/videos/sync", data={**VIDEO, "num_inference_steps": "6"}, files=FILES)
    assert r.status_code == 504 and r.json()["error"]["type"] == "timeout_error", r.text
    assert json.loads(r.text)["error"]["message"].startswith("the job ran past its deadline")


def test_head_healthz_and_deleting_an_unknown_lora(client):
    assert client.head("/healthz").status_code == 200
    r = client.delete("/v1/admin/loras/never-loaded")
    assert r.status_code == 404 and r.json()["error"]["param"] == "name", r.text


def test_the_same_request_twice_gives_byte_identical_mp4s(client):
    data = {**VIDEO, "seed": "11"}
    first = client.post("/v1/videos/sync", data=data, files=FILES)
    second = client.post("/v1/videos/sync", data=data, files=FILES)
    assert first.status_code == second.status_code == 200
    assert first.content == second.content


def test_docs_follow_the_api_auth(tmp_path):
    graph = LocalGraph(load_profile("tiny", {"serving": {"storage_dir": str(tmp_path), "api_keys": ["k"]}}))
    with TestClient(graph.app()) as c:
        for path in ("/docs", "/redoc", "/openapi.json"):
            assert c.get(path).status_code == 401, path
            assert c.get(path, headers={"Authorization": "Bearer k"}).status_code == 200, path
        assert "/v1/videos" in c.get("/openapi.json", headers={"Authorization": "Bearer k"}).json()["paths"]


def test_a_client_that_leaves_mid_body_is_no_error(server, caplog):
    host, port = server.split(":")
    with caplog.at_level("INFO", logger="avatar_serve.http"):
        with socket.create_connection((host, int(port))) as s:
            s.sendall(b"POST /v1/videos HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 1000\r\n\r\n{\"prompt\": ")
            time.sleep(0.3)
        deadline = time.monotonic() + HANG_S  # only a lost log line runs into it
        while not any("client left" in r.message for r in caplog.records) and time.monotonic() < deadline:
            time.sleep(0.05)
    assert any("client left" in r.message for r in caplog.records)
    assert not any(r.levelname == "ERROR" for r in caplog.records), [r.message for r in caplog.records]
    assert httpx.get(f"http://{server}/healthz").status_code == 200
