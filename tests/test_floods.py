"""A flood of idle and slow connections on the served tiny graph (Ray Serve's proxy in front):
event-stream listeners that never read on, and uploads whose bodies trickle in, a few hundred
past the admission caps (deployments/api/admission.py). The excess is refused at once -- 429 for a
client past its share, 503 past the total, both with Retry-After -- the admitted slow uploads are
cut off (408), and /healthz keeps answering (how fast: bench/flood.py). The clients' addresses come from
X-Forwarded-For, which the proxy's uvicorn trusts from 127.0.0.1 (README, Floods). The full-size
measurement is bench/flood.py."""

from __future__ import annotations

import asyncio
import re
import time

import httpx
import pytest

from helpers import get_dummy_image, png_bytes, served_graph

pytestmark = pytest.mark.cluster

CAPS = {"max_event_streams": 30, "max_event_streams_per_client": 10, "max_uploads": 20, "max_uploads_per_client": 5,
        "retry_after_s": 3, "body_min_bytes_per_s": 4096, "body_grace_s": 2.0}
STEP_S = 0.2
UPLOAD = ("POST /v1/videos HTTP/1.1\r\nHost: t\r\n{xff}Content-Type: multipart/form-data; boundary=b\r\n"
          "Content-Length: 1000000\r\n\r\n--b\r\n")


async def connect(port: int, head: str):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head.encode())
    await writer.drain()

    async def first():  # only the first bytes: a listener that never reads on
        try:
            return await reader.read(4096)
        except OSError:
            return None

    return writer, asyncio.create_task(first())


def status(task) -> str:
    if not task.done():
        return "held"
    match = re.match(rb"HTTP/1\.1 (\d{3})", task.result() or b"")
    return match.group(1).decode() if match else "closed"


async def flood(port: int, job_id: str, url: str) -> dict:
    events = f"GET /v1/videos/{job_id}/events HTTP/1.1\r\nHost: t\r\n{{xff}}\r\n"
    loner = [events.format(xff="")] * 150  # one client (127.0.0.1): 10 admitted, the rest 429
    crowd = [events.format(xff=f"X-Forwarded-For: 10.0.{i // 250}.{i % 250 + 1}\r\n") for i in range(100)]
    uploads = [UPLOAD.format(xff="X-Forwarded-For: 10.9.9.9\r\n")] * 60  # one client: 5 admitted (then 408)
    conns = {}
    for name, heads in (("loner", loner), ("crowd", crowd), ("uploads", uploads)):
        conns[name] = await asyncio.gather(*[connect(port, h) for h in heads])
    opened = time.monotonic()

    async def trickle():
        while True:
            for writer, task in conns["uploads"]:
                if not task.done():
                    writer.write(b"x" * 64)  # 128 B/s: far under the minimum rate
            await asyncio.sleep(0.5)

    trickler = asyncio.create_task(trickle())
    refused = [t for name in ("loner", "crowd") for _, t in conns[name]] + [t for _, t in conns["uploads"]]
    while sum(status(t) in ("429", "503") for t in refused) < 140 + 80 + 55 and time.monotonic() < opened + 30:
        await asyncio.sleep(0.1)
    answered_s = time.monotonic() - opened
    probes = []
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        for _ in range(12):
            started = time.perf_counter()
            code = (await client.get("/healthz")).status_code
            probes.append((code, time.perf_counter() - started))
            await asyncio.sleep(0.3)
    await asyncio.sleep(max(0.0, opened + CAPS["body_grace_s"] + 3 - time.monotonic()))  # the uploads' cut-off
    trickler.cancel()
    out = {name: [status(t) for _, t in group] for name, group in conns.items()}
    out["retry_after"] = sum(b"retry-after: 3" in (t.result() or b"").lower()
                             for group in conns.values() for _, t in group if status(t) in ("429", "503"))
    out["refused_by"] = sorted({m.group(1).decode() for group in conns.values() for _, t in group
                                if status(t) in ("429", "503")
                                for m in [re.search(rb"x-avatar-serve-refused-by: (\w+)", (t.result() or b"").lower())]
                                if m})
    out["probes"], out["answered_s"] = probes, answered_s
    for group in conns.values():
        for writer, task in group:
            task.cancel()
            writer.close()
    return out


@pytest.mark.parametrize("place", ["ingress", "proxy"])
def test_a_flood_past_the_caps_is_refused_and_healthz_answers(place, monkeypatch):
    """`proxy`: the same caps also in Ray Serve's HTTP proxy (its middleware callback, set in the
    environment the Ray processes start with): the excess is refused there, before the ingress."""
    overrides = {"stages": {r: {"simulate_step_seconds": STEP_S} for r in ("high", "low")},
                 "limits": {"max_steps": 400}, "serving": {"admission": CAPS}}
    if place == "proxy":
        from deployments.api.admission import EDGE_ENV
        from deployments.config_serving import AdmissionConfig

        monkeypatch.setenv("RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH", "deployments.api.admission:proxy_middlewares")
        monkeypatch.setenv(EDGE_ENV, AdmissionConfig(**CAPS).model_dump_json())
    with served_graph(overrides) as url:
        files = {"input_reference": ("p.png", png_bytes(get_dummy_image()), "image/png")}
        job = httpx.post(f"{url}/v1/videos", data={"prompt": "a flood", "size": "32x16", "num_frames": "5",
                                                   "num_inference_steps": "300"}, files=files, timeout=60)
        assert job.status_code == 200, job.text
        got = asyncio.run(flood(int(url.rsplit(":", 1)[1]), job.json()["id"], url))
        after = httpx.get(f"{url}/healthz", timeout=10)

    count = lambda name, code: got[name].count(code)  # noqa: E731
    assert count("loner", "200") == 10 and count("loner", "429") == 140, got["loner"]
    assert count("crowd", "200") == 20 and count("crowd", "503") == 80, got["crowd"]  # 30 in all
    assert count("uploads", "429") == 55 and count("uploads", "408") == 5, got["uploads"]
    assert got["retry_after"] == 140 + 80 + 55
    assert got["refused_by"] == [place], got["refused_by"]
    # /healthz answers through it (how fast is bench/flood.py's: under 1 s with the gates at the edge)
    assert all(code == 200 for code, _ in got["probes"]), got["probes"]
    assert after.status_code == 200
