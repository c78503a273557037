"""The admission middleware (deployments/api/admission.py) driven as ASGI in process: caps per
client (429) and in total (503) with Retry-After, what passes while they are full, the body pace
(408), and a client's leaving as one INFO line however the transport reports it. The served
flood is tests/test_floods.py."""

from __future__ import annotations

import asyncio
import json
import logging
from types import SimpleNamespace

import pytest

from deployments.api.admission import Admission, BodyTooSlow, Gate
from deployments.api.routes import build_app
from deployments.config_serving import AdmissionConfig
from deployments.profiles import load_profile

CFG = AdmissionConfig(max_event_streams=3, max_event_streams_per_client=2, max_uploads=2, max_uploads_per_client=1,
                      max_talk_turns_per_client=1, retry_after_s=7, body_min_bytes_per_s=1000, body_grace_s=0.2)


def scope(path: str, client: str = "10.0.0.1", method: str = "GET", headers=()) -> dict:
    return {"type": "http", "method": method, "path": path, "client": (client, 5000), "headers": list(headers),
            "query_string": b"", "asgi": {"version": "3.0", "spec_version": "2.3"}}


UPLOAD = [(b"content-length", b"100000"), (b"content-type", b"application/json")]


class Held:
    """An app that holds each request until released (or, with read_body, reads its body first)."""

    def __init__(self, read_body: bool = False):
        self.release, self.read_body, self.inside, self.errors = asyncio.Event(), read_body, 0, []

    async def __call__(self, scope, receive, send):
        self.inside += 1
        try:
            if self.read_body:
                more = True
                while more:
                    message = await receive()
                    more = message.get("more_body", False) and message["type"] == "http.request"
            await self.release.wait()
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"ok"})
        except BodyTooSlow as exc:
            self.errors.append(exc)
        finally:
            self.inside -= 1


async def call(app, s: dict, receive=None) -> dict:
    """Run one request -> {"status", "headers", "body"} (status None while it is held)."""
    out = {"status": None, "headers": {}, "body": b""}

    async def send(message):
        if message["type"] == "http.response.start":
            out["status"] = message["status"]
            out["headers"] = {k.decode(): v.decode() for k, v in message["headers"]}
        else:
            out["body"] += message.get("body", b"")

    async def idle():
        await asyncio.Event().wait()

    await app(s, receive or idle, send)
    return out


def test_a_gate_refuses_a_clients_extra_place_with_429_and_the_total_with_503():
    gate = Gate("event streams", total=3, per_client=2)
    assert gate.enter("a") is None and gate.enter("a") is None
    assert gate.enter("a") == 429
    assert gate.enter("b") is None
    assert gate.enter("c") == 503
    gate.leave("a")
    assert gate.enter("c") is None and gate.count == 3 and dict(gate.held) == {"a": 1, "b": 1, "c": 1}


def test_event_streams_past_the_caps_are_refused_at_once_and_health_passes():
    async def run():
        inner = Held()
        app = Admission(inner, CFG, body_timeout_s=30)
        events = "/v1/videos/video_x/events"
        held = [asyncio.create_task(call(app, scope(events, c))) for c in ("a", "a", "b")]
        await asyncio.sleep(0.01)
        assert inner.inside == 3
        mine = await asyncio.wait_for(call(app, scope(events, "a")), 1)  # a's third: its share
        full = await asyncio.wait_for(call(app, scope(events, "c")), 1)  # c's first: the total
        inner.release.set()  # /healthz passes the full gates (it is released at once now)
        health = await asyncio.wait_for(call(app, scope("/healthz", "c")), 1)
        await asyncio.gather(*held)
        again = await asyncio.wait_for(call(app, scope(events, "c")), 1)
        return mine, full, health, again, app

    mine, full, health, again, app = asyncio.run(run())
    for answer, status, kind in ((mine, 429, "rate_limit_error"), (full, 503, "service_unavailable")):
        assert answer["status"] == status
        assert answer["headers"]["retry-after"] == "7" and answer["headers"]["connection"] == "close"
        error = json.loads(answer["body"])["error"]
        assert error["type"] == kind and "event streams" in error["message"], error
    assert health["status"] == 200 and again["status"] == 200
    assert app.events.count == 0 and not app.events.held  # every place given back


def test_an_upload_holds_its_place_only_while_its_body_arrives():
    def body(arrives: asyncio.Event | None = None):
        async def receive():  # the whole body in one piece, once `arrives` is set
            if arrives is not None:
                await arrives.wait()
            return {"type": "http.request", "body": b"x" * 500, "more_body": False}

        return receive

    async def run():
        inner = Held(read_body=True)
        app = Admission(inner, CFG, body_timeout_s=30)
        arrives = asyncio.Event()
        first = asyncio.create_task(call(app, scope("/v1/videos", "a", "POST", UPLOAD), body(arrives)))
        await asyncio.sleep(0.01)
        while_receiving = await asyncio.wait_for(call(app, scope("/v1/videos", "a", "POST", UPLOAD), body()), 1)
        arrives.set()
        await asyncio.sleep(0.01)
        # a's body is in and its request still runs: its upload place is free for the next one
        assert inner.inside == 1 and app.uploads.count == 0
        second = asyncio.create_task(call(app, scope("/v1/videos", "a", "POST", UPLOAD), body()))
        await asyncio.sleep(0.01)
        assert inner.inside == 2
        inner.release.set()
        return while_receiving, await first, await second

    while_receiving, first, second = asyncio.run(run())
    assert while_receiving["status"] == 429 and "uploads" in while_receiving["body"].decode()
    assert first["status"] == second["status"] == 200


@pytest.mark.parametrize("piece_every_s, expect", [(0.05, "bytes/s"), (None, "within 0.5 s")])
def test_a_trickled_or_stopped_body_is_cut_off_and_its_place_freed(piece_every_s, expect):
    """10 bytes every 50 ms (200 B/s) is cut off by the rate once the 0.2 s grace has passed; a body
    that stops after 100 bytes (with the rate lowered) by body_timeout_s."""
    cfg = CFG if piece_every_s else CFG.model_copy(update={"body_min_bytes_per_s": 1})

    async def run():
        inner = Held(read_body=True)
        app = Admission(inner, cfg, body_timeout_s=0.5)
        sent = 0

        async def receive():
            nonlocal sent
            if piece_every_s is None and sent:
                await asyncio.Event().wait()
            await asyncio.sleep(piece_every_s or 0)
            sent += 1
            return {"type": "http.request", "body": b"x" * (10 if piece_every_s else 100), "more_body": True}

        # cut off by the body's deadline, not left to run (wait_for's bound would fail it)
        await asyncio.wait_for(call(app, scope("/v1/videos", "a", "POST", UPLOAD), receive), 2)
        return inner, app

    inner, app = asyncio.run(run())
    assert len(inner.errors) == 1 and inner.errors[0].status_code == 408
    assert expect in inner.errors[0].detail, inner.errors[0].detail
    assert app.uploads.count == 0


def fake_ingress(events):
    """What the event-stream route needs of an ingress: its config and `follow`."""
    return SimpleNamespace(cfg=load_profile("tiny"), follow=lambda video_id, after: events())


def test_a_stream_whose_receive_fails_is_a_client_leaving_one_info_line(caplog):
    """Ray Serve's proxy, when many clients leave at once, makes the replica's `receive` raise
    (TaskCancelledError) instead of answering http.disconnect; here a RuntimeError stands in.
    Without the guard the app logged 'unhandled error' with a traceback for each such client."""

    async def quiet_events():
        await asyncio.Event().wait()  # a job with nothing new: the stream waits
        yield {}

    async def run():
        app = build_app(fake_ingress(quiet_events))
        calls = 0

        async def receive():
            nonlocal calls
            calls += 1
            await asyncio.sleep(0.05)
            raise RuntimeError("the proxy's side of the request is gone")

        return await asyncio.wait_for(call(app, scope("/v1/videos/video_x/events"), receive), 5)

    with caplog.at_level(logging.INFO):
        answer = asyncio.run(run())
    assert answer["status"] == 200 and answer["body"].startswith(b"retry: 2000")
    ours = [r for r in caplog.records if r.name.startswith("avatar_serve")]
    assert not [r for r in ours if r.levelno >= logging.WARNING], [r.getMessage() for r in ours]
    left = [r for r in ours if "client left" in r.getMessage()]
    assert len(left) == 1 and left[0].levelno == logging.INFO and not left[0].exc_info
    assert "GET /v1/videos/video_x/events" in left[0].getMessage()


def test_a_stream_whose_client_disconnects_is_one_info_line(caplog):
    async def quiet_events():
        await asyncio.Event().wait()
        yield {}

    async def run():
        app = build_app(fake_ingress(quiet_events))

        async def receive():
            await asyncio.sleep(0.05)
            return {"type": "http.disconnect"}

        return await asyncio.wait_for(call(app, scope("/v1/videos/video_x/events"), receive), 5)

    with caplog.at_level(logging.INFO):
        asyncio.run(run())
    ours = [r for r in caplog.records if r.name.startswith("avatar_serve")]
    assert [r.levelno for r in ours] == [logging.INFO] and "client left" in ours[0].getMessage()


def test_the_ingress_keeps_slots_beyond_what_the_caps_let_long_requests_hold():
    with pytest.raises(ValueError, match="max_ongoing_requests"):
        load_profile("tiny", {"serving": {"admission": {"max_event_streams": 1000}}})
    cfg = load_profile("tiny", {"serving": {"admission": {"max_event_streams": 1000}},
                                "stages": {"ingress": {"placement": {"max_ongoing_requests": 2048}}}})
    assert cfg.serving.admission.max_event_streams == 1000
    assert load_profile("tiny", {"serving": {"admission": {"max_uploads": None}}})  # uncapped: the operator's call


def test_the_proxys_edge_gates_refuse_the_same_way_and_name_where(monkeypatch):
    """`proxy_middlewares` (Ray Serve's proxy callback): the caps from AVATAR_SERVE_EDGE_ADMISSION,
    the same refusals, made before the request reaches the ingress; no body pace there (the
    ingress's), but an upload's place is still given back once its body is in."""
    from deployments.api.admission import EDGE_ENV, EdgeAdmission, proxy_middlewares

    monkeypatch.setenv(EDGE_ENV, CFG.model_dump_json())
    [middleware] = proxy_middlewares()
    assert middleware.cls is EdgeAdmission and middleware.kwargs["cfg"] == CFG

    async def run():
        inner = Held(read_body=True)
        app = EdgeAdmission(inner, **middleware.kwargs)
        events = "/v1/videos/video_x/stream"

        async def no_body():
            return {"type": "http.request", "body": b"", "more_body": False}

        held = [asyncio.create_task(call(app, scope(events, c), no_body)) for c in ("a", "a")]
        await asyncio.sleep(0.01)
        mine = await asyncio.wait_for(call(app, scope(events, "a")), 1)

        async def slow_body():  # a trickle the edge lets through (no pace there): one piece, later
            await asyncio.sleep(0.5)
            return {"type": "http.request", "body": b"x", "more_body": False}

        upload = asyncio.create_task(call(app, scope("/v1/videos", "b", "POST", UPLOAD), slow_body))
        await asyncio.sleep(0.3)
        while_receiving = await asyncio.wait_for(call(app, scope("/v1/videos", "b", "POST", UPLOAD)), 1)
        await asyncio.sleep(0.4)
        assert app.uploads.count == 0  # the body is in: the place is free
        inner.release.set()
        await asyncio.gather(*held, upload)
        return mine, while_receiving, inner, upload.result()

    mine, while_receiving, inner, upload = asyncio.run(run())
    assert mine["status"] == 429 and mine["headers"]["x-avatar-serve-refused-by"] == "proxy"
    assert while_receiving["status"] == 429 and upload["status"] == 200 and not inner.errors


def test_without_the_variable_the_edge_takes_the_default_caps(monkeypatch):
    from deployments.api.admission import EDGE_ENV, proxy_middlewares

    monkeypatch.delenv(EDGE_ENV, raising=False)
    assert proxy_middlewares()[0].kwargs["cfg"] == AdmissionConfig()
