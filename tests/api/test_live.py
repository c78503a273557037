"""Live sessions through the ingress on the in-process tiny graph (deployments/api/live.py): the
protocol and its every error and close code, idle / speech / interrupt with their frame indices,
the continuous stream's content, bounds, admission, and the WebSocket route with its keys. The
tiny models run slower than real time on a CPU, so a session here stalls while speaking; what is
checked is order, frame indices and content, never time. Served over Ray Serve: test_cluster.py."""

from __future__ import annotations

import asyncio
import io
import json

import numpy as np
import pytest
from fastapi.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from deployments.api.live import CLOSE
from deployments.local import LocalGraph
from deployments.models.musetalk.timing import frames_ready
from deployments.profiles import load_profile
from helpers import get_dummy_image, png_bytes

AVATAR = {"prompt": "a woman talks", "size": "64x64", "num_frames": 9, "seed": 3, "num_inference_steps": 2}
START = {"type": "start", "format": "pcm_s16le", "sample_rate": 16000}
SPF = 640  # samples of 16 kHz audio per frame at 25 fps


def speech(seconds: float, dtype: str = "<i2") -> np.ndarray:
    t = np.arange(int(seconds * 16000)) / 16000
    pcm = 0.3 * np.sin(2 * np.pi * 220 * t) * (1 + np.sin(2 * np.pi * 3 * t))
    return (pcm * 32767).astype(dtype) if dtype == "<i2" else pcm.astype(dtype)


def make_graph(tmp_path, live: dict | None = None, limits: dict | None = None, **serving) -> LocalGraph:
    return LocalGraph(load_profile("tiny", {"serving": {"storage_dir": str(tmp_path), "live": live or {}, **serving},
                                            "limits": limits or {}}))


async def ready_avatar(graph: LocalGraph, seed: int = 3) -> str:
    avatar, _ = await graph.ingress.create_avatar({**AVATAR, "seed": seed}, png_bytes(get_dummy_image(seed)))
    while not graph.ingress.avatar(avatar.id).final:
        await asyncio.sleep(0.02)
    assert graph.ingress.avatar(avatar.id).status == "ready"
    return avatar.id


class Client:
    """A scripted client: `put` queues messages for the session; everything it sends is kept."""

    def __init__(self):
        self.inbox: asyncio.Queue = asyncio.Queue()
        self.out: list = []
        self.changed = asyncio.Event()

    async def receive(self):
        return await self.inbox.get()

    async def send(self, message) -> None:
        self.out.append(message)
        self.changed.set()

    def put(self, message) -> None:
        self.inbox.put_nowait(message if isinstance(message, (bytes, str, type(None))) else json.dumps(message))

    def events(self, kind: str | None = None) -> list[dict]:
        return [m for m in self.out if isinstance(m, dict) and (kind is None or m["type"] == kind)]

    async def until(self, kind: str, timeout: float = 120) -> dict:
        async with asyncio.timeout(timeout):
            while not self.events(kind):
                self.changed.clear()
                await self.changed.wait()
        return self.events(kind)[0]

    async def until_frames(self, n: int, timeout: float = 120) -> None:
        async with asyncio.timeout(timeout):
            while self.frames_sent() < n:
                self.changed.clear()
                await self.changed.wait()

    def frames_sent(self) -> int:
        stats = self.events("stats")
        return stats[-1]["frames_sent"] if stats else 0

    def mp4(self) -> bytes:
        return b"".join(m for m in self.out if isinstance(m, bytes))

    def order(self) -> list[str]:
        return [m["type"] for m in self.out if isinstance(m, dict) and m["type"] != "stats"]


def open_session(graph: LocalGraph, avatar: str) -> tuple[Client, asyncio.Task]:
    """A client that has sent `start`, and the session running for it (inside a running loop)."""
    client = Client()
    client.put(START)
    return client, asyncio.create_task(graph.ingress.live(avatar, client.receive, client.send))


async def talk(client: Client, pcm: bytes, chunk_ms: int = 100, real_time: bool = True) -> None:
    step = 16000 * chunk_ms // 1000 * 2
    for i in range(0, len(pcm), step):
        client.put(pcm[i:i + step])
        await asyncio.sleep(chunk_ms / 1000 if real_time else 0)


def decode(data: bytes):
    import av

    with av.open(io.BytesIO(data)) as c:
        video = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])
    with av.open(io.BytesIO(data)) as c:
        audio = np.concatenate([f.to_ndarray().reshape(-1) for f in c.decode(audio=0)])
    return video, audio  # audio: 48 kHz mono float


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = ((a.astype(float) - b.astype(float)) ** 2).mean()
    return float("inf") if mse == 0 else 10 * np.log10(255 ** 2 / mse)


def shows(frame: np.ndarray, wanted: np.ndarray, others: list[np.ndarray]) -> bool:
    """A decoded frame is `wanted` (a frame given to the encoder), not any of `others`: H.264 at
    CRF 20 on the random tiny clips loses too much for an absolute bound, so the test is which
    of the candidates it is closest to."""
    return all(psnr(frame, wanted) > psnr(frame, other) + 1 for other in others if not np.array_equal(other, wanted))


def base_frames(graph: LocalGraph, avatar: str):
    """n -> the base clip's cycle frame at n, and all the clip's distinct frames."""
    prepared = graph.lipsync.target.get_avatar(graph.ingress.records.avatars[avatar].prepared_id)
    return (lambda n: prepared.frames[prepared.source_frame(n)]), list(prepared.frames)


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """One graph and one ready avatar for the sessions that only read."""
    graph = make_graph(tmp_path_factory.mktemp("live"))
    avatar = asyncio.run(ready_avatar(graph))
    return graph, avatar


# ------------------------------------------------------------------ the protocol's errors

BAD_SESSIONS = [
    # (what the client sends, close code, `param` of the error event)
    ([b"\x00\x01"], "invalid", "type"),  # audio before start
    (["{not json"], "invalid", "type"),
    (["[1, 2]"], "invalid", "type"),
    ([{"type": "end_of_utterance"}], "invalid", "type"),  # the first message must be start
    ([{**START, "format": "opus"}], "invalid", "format"),
    ([{**START, "sample_rate": 44100}], "invalid", "sample_rate"),
    ([START, {"type": "dance"}], "invalid", "type"),
    ([START, START], "invalid", "type"),
    ([START, b"\x00" * 5000], "too_big", "audio"),  # max_chunk_bytes is 4096 here
    ([{**START, "format": "pcm_f32le"}, np.full(800, np.nan, "<f4").tobytes()], "invalid", "audio"),
    ([{**START, "format": "pcm_f32le"}, np.full(800, 1e12, "<f4").tobytes()], "invalid", "audio"),
    ([START, *[speech(0.1).tobytes()] * 12], "too_much", "audio"),  # an utterance over max_audio_seconds (1 s)
]


@pytest.mark.parametrize("messages, kind, param", BAD_SESSIONS)
def test_bad_input_gets_an_error_event_and_a_close_code_and_no_lipsync(tmp_path, messages, kind, param):
    graph = make_graph(tmp_path, live={"max_chunk_bytes": 4096}, limits={"max_audio_seconds": 1.0})

    async def scenario():
        avatar = await ready_avatar(graph)
        client = Client()
        for message in messages:
            client.put(message)
        return client, await graph.ingress.live(avatar, client.receive, client.send)

    client, (code, reason) = asyncio.run(scenario())
    error = client.events("error")
    assert code == CLOSE[kind] and len(error) == 1, (code, reason, client.order())
    assert error[0]["param"] == param and error[0]["code"] == code and error[0]["message"] == reason
    assert "Traceback" not in reason
    if kind != "too_much":  # (a too long utterance was fine, and rendering, until it grew too long)
        assert graph.lipsync.calls["live_speech"] == 0  # refused before any lip-sync


def test_the_avatar_must_exist_and_be_ready(tmp_path):
    graph = make_graph(tmp_path)

    async def scenario():
        client = Client()
        client.put(START)
        unknown = await graph.ingress.live("avatar_nope", client.receive, client.send)
        avatar, _ = await graph.ingress.create_avatar({**AVATAR, "num_inference_steps": 20},
                                                      png_bytes(get_dummy_image(9)))
        other = Client()
        other.put(START)
        not_ready = await graph.ingress.live(avatar.id, other.receive, other.send)
        return unknown, not_ready, client, other

    unknown, not_ready, client, other = asyncio.run(scenario())
    assert unknown[0] == CLOSE["not_found"] and client.events("error")[0]["param"] == "avatar_id"
    assert not_ready[0] == CLOSE["conflict"] and "needs it ready" in not_ready[1]
    assert not client.events("ready") and not other.events("ready")


# ------------------------------------------------------------------ idle, speech, interrupt


def test_an_idle_session_streams_the_base_cycle_with_silence_and_no_model(shared):
    graph, avatar = shared
    before = graph.lipsync.calls["live_speech"]

    async def scenario():
        client, session = open_session(graph, avatar)
        await client.until_frames(30)
        client.put({"type": "close"})
        return client, await session

    client, closing = asyncio.run(scenario())
    assert closing == (CLOSE["normal"], "closed by the client")
    ready = client.events("ready")[0]
    assert ready["fps"] == 25 and (ready["width"], ready["height"]) == (64, 64) and ready["lookahead_ms"] == 120
    assert ready["mime"].startswith('video/mp4; codecs="avc1.') and "mp4a.40.2" in ready["mime"]
    assert client.order()[0] == "ready" and "speech_started" not in client.order()
    video, audio = decode(client.mp4())
    assert len(video) >= 30 and np.abs(audio).max() < 1e-3  # silence while idle
    assert abs(len(audio) / 48000 - len(video) / 25) < 0.1  # one continuous audio track beside the video
    base, clip = base_frames(graph, avatar)
    for n in (0, 7, 25):  # frame n is the base clip's cycle at n
        assert shows(video[n], base(n), clip)
    assert graph.lipsync.calls["live_speech"] == before  # idle costs no model call


def test_speech_starts_on_a_later_frame_continues_the_cycle_and_ends_back_in_idle(shared):
    graph, avatar = shared
    pcm = speech(0.6)

    async def scenario():
        client, session = open_session(graph, avatar)
        await client.until_frames(10)
        await talk(client, pcm.tobytes())
        client.put({"type": "end_of_utterance"})
        ended = await client.until("speech_ended")
        await client.until_frames(ended["frame"] + 8)
        client.put({"type": "close"})
        await session
        return client

    client = asyncio.run(scenario())
    started, ended = client.events("speech_started")[0]["frame"], client.events("speech_ended")[0]["frame"]
    frames = len(pcm) // SPF  # 15: the talk turn of this audio has as many
    assert client.order()[:3] == ["ready", "speech_started", "speech_ended"]
    assert started >= 10 and ended == started + frames
    video, audio = decode(client.mp4())
    # The speech frames are the talk turn's frames of the same audio, with the same start in the cycle.
    graph_avatar = graph.ingress.records.avatars[avatar]
    stage = graph.lipsync.target
    turn = b"".join(stage.speak(graph_avatar.prepared_id, pcm.astype(np.float32) / 32767, start_index=started))
    turn_video, _ = decode(turn)
    assert len(turn_video) == frames
    base, clip = base_frames(graph, avatar)
    for k in range(frames):  # lip-synced as the turn is, not the base frame under it
        assert psnr(video[started + k], turn_video[k]) > psnr(video[started + k], base(started + k))
    assert shows(video[ended], base(ended), clip) and shows(video[started - 1], base(started - 1), clip)
    # The audio: silence, the utterance from its first frame, silence again.
    at = lambda frame: int(frame * 48000 / 25)  # noqa: E731
    assert np.abs(audio[:at(started) - 2000]).max() < 1e-3
    assert np.abs(audio[at(started) + 2000:at(ended) - 2000]).mean() > 0.05
    assert np.abs(audio[at(ended) + 4000:]).max() < 1e-2


def test_interrupt_stops_speech_within_a_fragment_and_idle_resumes(shared):
    graph, avatar = shared

    async def scenario():
        client, session = open_session(graph, avatar)
        await client.until_frames(4)
        asyncio.ensure_future(talk(client, speech(1.0).tobytes(), real_time=False))  # more than it says at once
        started = await client.until("speech_started")
        client.put({"type": "interrupt"})
        interrupted = await client.until("interrupted")
        calls = graph.lipsync.calls["live_speech"]
        await client.until_frames(interrupted["frame"] + 10)
        client.put({"type": "close"})
        await session
        return client, started, interrupted, calls

    client, started, interrupted, calls = asyncio.run(scenario())
    assert client.order()[:3] == ["ready", "speech_started", "interrupted"]
    assert "speech_ended" not in client.order()  # the utterance was dropped, not finished
    assert started["frame"] < interrupted["frame"] <= started["frame"] + 8 + 2  # within one speech batch
    assert graph.lipsync.calls["live_speech"] == calls  # no lip-sync after the interrupt
    video, audio = decode(client.mp4())
    base, clip = base_frames(graph, avatar)
    n = interrupted["frame"] + 3
    assert shows(video[n], base(n), clip)  # idle, continuing the cycle
    assert np.abs(audio[int((n + 1) * 48000 / 25):]).max() < 1e-2


def test_a_client_that_leaves_mid_utterance_stops_the_stage_work(shared):
    graph, avatar = shared

    async def scenario():
        client, session = open_session(graph, avatar)
        await client.until_frames(2)
        await talk(client, speech(2.0).tobytes(), real_time=False)
        await client.until("speech_started")
        client.put(None)  # the connection dropped
        result = await session
        calls = graph.lipsync.calls["live_speech"]
        await asyncio.sleep(1.0)
        return result, calls

    result, calls = asyncio.run(scenario())
    assert result is None  # nobody to close
    assert graph.lipsync.calls["live_speech"] == calls  # nothing more was asked of the stage
    assert graph.ingress.live_sessions == 0


def test_two_sessions_on_one_avatar_share_its_idle_frames(shared):
    graph, avatar = shared
    stage = graph.lipsync.target

    async def scenario():
        clients = [Client(), Client()]
        sessions = []
        for client in clients:
            client.put(START)
            sessions.append(asyncio.create_task(graph.ingress.live(avatar, client.receive, client.send)))
        for client in clients:
            await client.until_frames(30)
            client.put({"type": "close"})
        return clients, await asyncio.gather(*sessions)

    clients, results = asyncio.run(scenario())
    assert all(r[0] == CLOSE["normal"] for r in results)
    a, b = (decode(c.mp4())[0] for c in clients)
    assert min(psnr(x, y) for x, y in zip(a[:30], b[:30])) == float("inf")  # the same cached GOPs
    assert len(stage._idle) >= 2


# ------------------------------------------------------------------ bounds and admission


def test_a_full_deployment_refuses_a_session_with_a_retry_hint(tmp_path):
    graph = make_graph(tmp_path, live={"max_sessions": 1, "retry_after_s": 7})

    async def scenario():
        avatar = await ready_avatar(graph)
        first, second = Client(), Client()
        first.put(START)
        session = asyncio.create_task(graph.ingress.live(avatar, first.receive, first.send))
        await first.until("ready")
        second.put(START)
        refused = await graph.ingress.live(avatar, second.receive, second.send)
        first.put({"type": "close"})
        await session
        third = Client()
        third.put(START)
        third.put({"type": "close"})
        again = await graph.ingress.live(avatar, third.receive, third.send)
        return refused, second, again

    refused, second, again = asyncio.run(scenario())
    assert refused[0] == CLOSE["busy"] and second.events("error")[0]["retry_after"] == 7
    assert again[0] == CLOSE["normal"]  # the slot was given back


def test_a_client_that_does_not_read_is_told_and_closed(tmp_path):
    graph = make_graph(tmp_path, live={"send_buffer_s": 0.4})

    async def scenario():
        avatar = await ready_avatar(graph)
        client = Client()
        stuck = asyncio.Event()

        async def send(message):  # the first messages arrive, then the client stops reading
            if len(client.out) >= 3:
                await stuck.wait()
            client.out.append(message)

        client.put(START)
        return await asyncio.wait_for(graph.ingress.live(avatar, client.receive, send), 60)

    code, reason = asyncio.run(scenario())
    assert code == CLOSE["timeout"] and "reads more slowly than real time" in reason


def test_a_session_ends_at_its_length_limit(tmp_path):
    graph = make_graph(tmp_path, live={"max_session_s": 0.5})

    async def scenario():
        avatar = await ready_avatar(graph)
        client = Client()
        client.put(START)
        return client, await asyncio.wait_for(graph.ingress.live(avatar, client.receive, client.send), 60)

    client, (code, reason) = asyncio.run(scenario())
    assert code == CLOSE["timeout"] and "length limit" in reason and client.events("error")


def test_deleting_the_avatar_ends_its_sessions(tmp_path):
    graph = make_graph(tmp_path)

    async def scenario():
        avatar = await ready_avatar(graph)
        client, session = open_session(graph, avatar)
        await client.until_frames(4)
        await graph.ingress.delete_avatar(avatar)
        return client, await asyncio.wait_for(session, 60)

    client, (code, reason) = asyncio.run(scenario())
    assert code == CLOSE["conflict"] and client.events("error")[0]["param"] == "avatar_id"


# ------------------------------------------------------------------ streamed = whole


def test_frames_of_audio_fed_in_100_ms_pieces_equal_the_talk_turns(shared):
    """The session's batches, as its renderer asks for them while audio arrives 100 ms at a time
    (features from whisper over the audio so far, frames once their window has arrived), against
    the talk turn of the whole audio: the same frames within 2 levels of 255 (measured: at most 1,
    mean 0.0007, on the tiny random models)."""
    graph, avatar = shared
    stage = graph.lipsync.target
    prepared = stage.get_avatar(graph.ingress.records.avatars[avatar].prepared_id)
    pcm = speech(1.2, "<f4")
    whole = np.concatenate(list(stage.pipeline.frames(prepared, pcm, start_index=5)))
    streamed, done = {}, 0
    for received in [*range(1600, len(pcm), 1600), len(pcm)]:
        ready = frames_ready(received, ended=received == len(pcm))
        while done < ready:
            count = min(ready - done, 8)
            chunk = np.concatenate(list(stage.pipeline.frames(prepared, pcm[:received], first=done, count=count,
                                                              batch_size=count, start_index=5)))
            streamed.update(zip(range(done, done + count), chunk))
            done += count
    streamed = np.stack([streamed[i] for i in range(len(streamed))])
    assert streamed.shape == whole.shape == (30, 64, 64, 3)
    assert np.abs(streamed.astype(int) - whole.astype(int)).max() <= 2


# ------------------------------------------------------------------ the WebSocket route


def test_the_websocket_route_needs_a_key_from_the_header_or_the_query(tmp_path):
    graph = make_graph(tmp_path, api_keys=["k1"])
    avatar = asyncio.run(ready_avatar(graph))
    path = f"/v1/avatars/{avatar}/live"
    with TestClient(graph.app()) as http:
        for kwargs in ({}, {"headers": {"Authorization": "Bearer nope"}}):
            with http.websocket_connect(path, **kwargs) as ws:
                assert ws.receive_json()["code"] == CLOSE["unauthorized"]
                with pytest.raises(WebSocketDisconnect) as closed:
                    ws.receive_json()
                assert closed.value.code == CLOSE["unauthorized"]
        for target, kwargs in ((path, {"headers": {"Authorization": "Bearer k1"}}), (f"{path}?access_token=k1", {})):
            with http.websocket_connect(target, **kwargs) as ws:
                ws.send_json(START)
                ready = ws.receive_json()
                assert ready["type"] == "ready" and ready["avatar_id"] == avatar
                first = ws.receive_bytes()
                assert first[4:8] == b"ftyp"  # the init segment leads the stream
                ws.send_json({"type": "close"})
                while (message := ws.receive())["type"] != "websocket.close":
                    pass  # the rest of the stream, up to the close
                assert message["code"] == CLOSE["normal"]
    assert graph.lipsync.calls["live_speech"] == 0


def test_frames_helper_counts_the_lookahead():
    """The renderer's rule: a frame is rendered once audio up to 120 ms past its start arrived."""
    assert frames_ready(3 * SPF - 1, ended=False) == 0 and frames_ready(3 * SPF, ended=False) == 1
    assert frames_ready(10 * SPF, ended=False) == 8 and frames_ready(10 * SPF, ended=True) == 10
