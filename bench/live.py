"""Live sessions measured the way a voice agent uses them (bench/serve.py runs them served, over
the WebSocket through Ray Serve, and in process; this module is the client side of both).

Each session: `start`, `--live-lead-in` s of idle, then `--live-seconds` of speech sent as 16 kHz
s16le in 100 ms messages at real-time pace (as a TTS stream arrives), `end_of_utterance`, and
`close` half a second after `speech_ended` (and the last audio sent). N sessions run at once per level. Per session:

    first_frame_s   the first lip-synced fragment's arrival after the first 200 ms of audio were
                    sent (the audio's 100 ms messages go out at real-time pace)
    lag_ms          the server's median lag of speech video behind the arrival of its audio
                    (`stats`; measured at the ingress when a fragment is queued for the client)
    stalls, stalled_ms  times the stream waited for speech frames, and for how long in all
    speech_fps      speech frames over the time between the first and the last speech fragment
                    arrived: 25 when the session keeps up with real time
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time

import numpy as np

START = {"type": "start", "format": "pcm_s16le", "sample_rate": 16000}
CHUNK_S = 0.1


def speech_pcm(seconds: float) -> bytes:
    """16 kHz mono s16le: a 220 Hz tone with a 3 Hz (syllable-like) envelope."""
    t = np.arange(int(seconds * 16000)) / 16000
    return (0.3 * 32767 * np.sin(2 * np.pi * 220 * t) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t))).astype("<i2").tobytes()


async def one_session(open_session, avatar_id: str, pcm: bytes, lead_in: float, timeout: float) -> dict:
    """`open_session(avatar_id)` -> (send, recv, close): send(str | bytes), recv() -> str | bytes |
    None (closed), close(). A session that has not ended `timeout` s after it opened is closed and
    reported with what it saw (events, fragments, the server's last stats), so that a stuck level
    says where it stuck instead of holding the whole run."""
    t_open = time.perf_counter()
    send, recv, close = await open_session(avatar_id)
    seen = {"events": [], "fragments": 0, "speech_fragments": 0, "stats": {}, "chunks_sent": 0}
    try:
        return await asyncio.wait_for(_session(send, recv, close, pcm, lead_in, t_open, seen), timeout)
    except TimeoutError:
        await close()
        raise RuntimeError(f"session still open after {timeout:.0f} s: {json.dumps(seen)[:1500]}") from None


async def close_after(speaking: asyncio.Task, send) -> None:
    """`close` half a second after the speech ended and the whole audio was sent (the server may
    end an utterance early when its audio pauses for longer than `utterance_gap_s`)."""
    await asyncio.wait([speaking])
    await asyncio.sleep(0.5)
    await send(json.dumps({"type": "close"}))


async def _session(send, recv, close, pcm: bytes, lead_in: float, t_open: float, seen: dict) -> dict:
    await send(json.dumps(START))
    ready = json.loads(await recv())
    if ready.get("type") != "ready":
        raise RuntimeError(f"no ready event: {ready}")
    ready_s = time.perf_counter() - t_open
    step = int(16000 * CHUNK_S) * 2
    sent_at: list[float] = []

    async def talk():
        await asyncio.sleep(lead_in)
        for i in range(0, len(pcm), step):
            sent_at.append(time.perf_counter())
            await send(pcm[i:i + step])
            seen["chunks_sent"] += 1
            await asyncio.sleep(CHUNK_S)
        await send(json.dumps({"type": "end_of_utterance"}))
        seen["events"].append({"sent": "end_of_utterance", "at_s": round(time.perf_counter() - t_open, 3)})

    speaking = asyncio.create_task(talk())
    started = ended = None
    speech_fragments: list[float] = []
    stats: dict = {}
    closing = None
    try:
        while (message := await recv()) is not None:
            now = time.perf_counter()
            if isinstance(message, bytes):
                seen["fragments"] += 1
                if started is not None and ended is None:
                    speech_fragments.append(now)
                    seen["speech_fragments"] += 1
                continue
            event = json.loads(message)
            kind = event["type"]
            if kind == "stats":
                stats = seen["stats"] = event
                continue
            seen["events"].append({**event, "at_s": round(now - t_open, 3)})
            if kind == "speech_started" and started is None:
                started = event["frame"]
            elif kind == "speech_ended":
                ended = event["frame"]  # the last one: the server may cut the audio into utterances
                closing = closing or asyncio.create_task(close_after(speaking, send))
            elif kind == "error":
                raise RuntimeError(f"session error: {event}")
        await speaking
    finally:
        speaking.cancel()
        if closing is not None:
            closing.cancel()
    await close()
    if started is None or ended is None or len(sent_at) < 2 or not speech_fragments:
        raise RuntimeError(f"no speech in the session (started {started}, ended {ended})")
    frames = ended - started
    span = speech_fragments[-1] - speech_fragments[0]
    return {"ready_s": ready_s, "first_frame_s": speech_fragments[0] - sent_at[1], "lag_ms": stats.get("lag_ms"),
            "stalls": stats.get("stalls"), "stalled_ms": stats.get("stalled_ms"), "speech_frames": frames,
            "speech_fps": frames / span if span > 0 else None}


def spread(values: list) -> dict | None:
    values = sorted(v for v in values if v is not None)
    if not values:
        return None
    pick = lambda q: values[min(len(values) - 1, int(q * len(values)))]
    return {"n": len(values), "p50": statistics.median(values), "p95": pick(0.95), "min": values[0], "max": values[-1]}


async def live_levels(open_session, avatar_id: str, levels: list[int], seconds: float, lead_in: float,
                      failures: list[str], log=print, out: dict | None = None) -> dict:
    """Each level: that many sessions at once on the avatar -> their numbers' spreads. Fills `out`
    level by level, so that a run stopped part-way keeps the levels it finished."""
    pcm = speech_pcm(seconds)
    out = {} if out is None else out
    out.update({"seconds": seconds, "lead_in_s": lead_in, "levels": {}})
    timeout = lead_in + seconds + 60  # generous: a session that keeps up ends about 1 s after its audio
    for n in levels:
        log(f"live sessions x{n}")
        runs = await asyncio.gather(*(one_session(open_session, avatar_id, pcm, lead_in, timeout) for _ in range(n)),
                                    return_exceptions=True)
        ok = [r for r in runs if isinstance(r, dict)]
        errors = [f"{type(r).__name__}: {r}" for r in runs if not isinstance(r, dict)]
        failures += [f"live x{n}: {e}" for e in errors]
        out["levels"][str(n)] = {
            "sessions": n, "failures": n - len(ok), "errors": errors[:4],
            "first_frame_s": spread([r["first_frame_s"] for r in ok]),
            "lag_ms": spread([r["lag_ms"] for r in ok]), "stalls": spread([r["stalls"] for r in ok]),
            "stalled_ms": spread([r["stalled_ms"] for r in ok]), "speech_fps": spread([r["speech_fps"] for r in ok]),
            "ready_s": spread([r["ready_s"] for r in ok]),
            "kept_real_time": sum(1 for r in ok if (r["stalled_ms"] or 0) == 0)}
    return out


def websocket_opener(base: str, api_key: str | None):
    """Sessions over the WebSocket (the `websockets` package)."""
    import websockets

    url = base.replace("http", "ws", 1)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    async def open_session(avatar_id: str):
        ws = await websockets.connect(f"{url}/v1/avatars/{avatar_id}/live", additional_headers=headers, max_size=None)

        async def recv():
            try:
                return await ws.recv()
            except websockets.exceptions.ConnectionClosed:
                return None

        return ws.send, recv, ws.close

    return open_session


def inprocess_opener(ingress):
    """Sessions straight on an in-process ingress (no HTTP, no Ray): the same session logic."""

    async def open_session(avatar_id: str):
        inbox: asyncio.Queue = asyncio.Queue()
        outbox: asyncio.Queue = asyncio.Queue()

        async def send_to_client(message):
            await outbox.put(message if isinstance(message, bytes) else json.dumps(message))

        task = asyncio.create_task(ingress.live(avatar_id, inbox.get, send_to_client))
        task.add_done_callback(lambda _: outbox.put_nowait(None))

        async def send(message):
            await inbox.put(message)

        async def close():
            await inbox.put(None)
            await task

        return send, outbox.get, close

    return open_session
