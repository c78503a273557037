"""Live sessions: audio in as a voice agent produces it, one continuous lip-synced stream out.

One session per conversation (the WebSocket `GET /v1/avatars/{id}/live`, routes.py; any caller
with a `receive` and a `send` coroutine in process). The ingress keeps the session -- its audio,
its clock, its one fragmented MP4 -- and asks the lip-sync stage for frames:

    client audio (s16le / f32le, 16/24/48 kHz) -> PcmStream -> 16 kHz float, by utterance
    renderer: frames whose audio window has arrived (120 ms past each frame's start, or all of
        them once the utterance ended) -> LipSync.live_speech -> VideoChunk (a closed GOP)
    pacer: one fragment at a time, no more than `lead_s` ahead of real time:
        idle  -> LipSync.live_idle (the base clip's cycle, encoded once per avatar; no GPU) + silence
        speech -> the rendered chunks + the utterance's audio
        -> LiveMP4 (init segment once, then moof + mdat) -> the client, with JSON events between

Frame n of the session shows the base clip's cycle at position n, idle or speaking: an
utterance's first frame is fixed when its first frames are requested (`start_margin_frames`
after the frames committed so far), so speech continues the motion where idle is. The audio track
runs continuously: silence while idle, an utterance's audio with its frames (its last partial
frame of audio plays with the idle frame after it). Everything that buffers is bounded (audio not
yet played, speech rendered ahead, output the client has not read), each with its own close code.
"""

from __future__ import annotations

import asyncio
import bisect
import json
import logging
import time
from collections import deque
from statistics import median
from typing import Awaitable, Callable

import numpy as np

from deployments.common.errors import AudioError, AvatarNotFound, unwrap
from deployments.common.payloads import Speech, VideoChunk
from deployments.media.audio import SAMPLE_RATE, PcmStream, as_pcm
from deployments.media.live_mp4 import NAL_SPS, AacTrack, LiveMP4, nal_units
from deployments.models.musetalk.timing import frames_ready, lookahead_seconds

log = logging.getLogger("avatar_serve.live")

# Close codes: RFC 6455's where one fits, else 4000 + the HTTP status of the same error.
CLOSE = {"normal": 1000, "too_big": 1009, "internal": 1011, "invalid": 4400, "unauthorized": 4401,
         "not_found": 4404, "timeout": 4408, "conflict": 4409, "too_much": 4413, "busy": 4429}
MESSAGE_TYPES = ("start", "end_of_utterance", "interrupt", "close")

Receive = Callable[[], Awaitable["str | bytes | None"]]  # None: the client has gone
Send = Callable[["bytes | dict"], Awaitable[None]]


class LiveError(Exception):
    """Ends a session: an `error` event, then the close code of `kind` with the message as reason."""

    def __init__(self, kind: str, message: str, param: str | None = None, retry_after: int | None = None):
        super().__init__(message)
        self.kind, self.message, self.param, self.retry_after = kind, message, param, retry_after

    @property
    def code(self) -> int:
        return CLOSE[self.kind]

    def event(self) -> dict:
        event = {"type": "error", "message": self.message, "param": self.param, "code": self.code}
        if self.retry_after is not None:
            event["retry_after"] = self.retry_after
        return event


class Gone(Exception):
    """The client disconnected."""


class Utterance:
    """One utterance: its audio so far (16 kHz float32), when it arrived, and its frames' way
    through rendering (`requested`, `ready` chunks) and out (`sent`)."""

    def __init__(self, fps: int):
        self.fps = fps
        self._parts: list[np.ndarray] = []
        self._pcm = np.zeros(0, np.float32)
        self.samples = 0
        self.ended = False
        self.arrivals: list[tuple[int, float]] = []  # (samples so far, when)
        self.last_audio = time.monotonic()
        self.start_frame: int | None = None  # the session frame of its frame 0, fixed at its first request
        self.requested = 0  # frames asked of the stage (rendering or ready)
        self.ready: deque[tuple[int, VideoChunk]] = deque()  # (first frame, chunk)
        self.sent = 0

    def add(self, pcm: np.ndarray) -> None:
        self._parts.append(pcm)
        self.samples += len(pcm)
        self.last_audio = time.monotonic()
        self.arrivals.append((self.samples, self.last_audio))

    def audio(self) -> np.ndarray:
        if self._parts:
            self._pcm = np.concatenate([self._pcm, *self._parts])
            self._parts.clear()
        return self._pcm

    @property
    def frames(self) -> int:
        """Frames the audio so far covers (all the utterance has, once it ended)."""
        return (self.samples * self.fps) // SAMPLE_RATE

    def renderable(self) -> int:
        return frames_ready(self.samples, self.ended, self.fps)

    def arrived(self, frame_end: int) -> float | None:
        """When the audio up to the end of frame `frame_end - 1` arrived."""
        need = frame_end * SAMPLE_RATE // self.fps
        i = bisect.bisect_left(self.arrivals, (need, 0.0))
        return self.arrivals[i][1] if i < len(self.arrivals) else None

    @property
    def finished(self) -> bool:
        return self.ended and self.sent >= self.frames


def codec_string(unit: bytes) -> str:
    """The MSE codecs string of the stream (`avc1.PPCCLL` from the SPS, AAC-LC)."""
    sps = next(u for u in nal_units(unit) if u[0] & 0x1F == NAL_SPS)
    return f'video/mp4; codecs="avc1.{sps[1]:02x}{sps[2]:02x}{sps[3]:02x}, mp4a.40.2"'


class LiveSession:
    """One live session over `receive` / `send` (see the module docstring); `run()` -> the close
    code and reason, or None when the client left."""

    def __init__(self, ingress, avatar_id: str, receive: Receive, send: Send):
        self.ingress, self.avatar_id = ingress, avatar_id
        self.receive, self.send = receive, send
        self.cfg = ingress.cfg.serving.live
        self.max_audio_s = ingress.cfg.limits.max_audio_seconds
        self.batch_frames = ingress.cfg.stages.lipsync.live_batch_frames  # what the stage is compiled for
        self.lipsync = ingress.turn_lipsync
        self.prepared_id: str | None = None
        self.fps = 25
        self.spf = SAMPLE_RATE // self.fps
        self.utterances: deque[Utterance] = deque()
        self.emitted = 0  # session frames queued for the client
        self.committed = 0  # frames the pacer has decided on (>= emitted while it prepares a fragment)
        self.carry = np.zeros(0, np.float32)  # an utterance's audio past its last whole frame
        self.out: asyncio.Queue = asyncio.Queue()
        self.queued_frames = 0  # frames in `out` the client has not taken yet
        # Wake-ups, one per waiter (each clears its own before it looks, so none is lost): the
        # renderer on audio, an end or a sent fragment; the pacer on a rendered chunk.
        self.wake_renderer = asyncio.Event()
        self.wake_pacer = asyncio.Event()
        self.idle: tuple[int, list[bytes]] | None = None  # (session frame of units[0], units left)
        self.lags: deque[float] = deque(maxlen=100)
        self.stalling = False
        self.stats = {"frames_sent": 0, "speech_frames": 0, "stalls": 0, "stalled_ms": 0, "utterances": 0}
        self.inflight = None  # the stage call rendering now
        self.epoch = 0  # interrupts so far: a render begun before one is dropped
        self.stream: PcmStream | None = None
        self.started = time.monotonic()  # the media clock's origin (reset when the session is ready)

    # ------------------------------------------------------------------ lifecycle

    async def run(self) -> tuple[int, str] | None:
        tasks: list[asyncio.Task] = []
        admitted = False
        try:
            await self._start()
            admitted = self.ingress.admit_live()
            await self._ready()
            tasks = [asyncio.create_task(self._read()), asyncio.create_task(self._pace()),
                     asyncio.create_task(self._write()), asyncio.create_task(self._render())]
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            result = next(iter(done)).result()  # the reader's "closed", or any task's error
            return await self._finish(CLOSE["normal"], result or "session closed")
        except Gone:
            return None
        except LiveError as exc:
            log.info("live %s on %s: %s", exc.kind, self.avatar_id, exc.message)
            return await self._finish(exc.code, exc.message, exc.event())
        except Exception as exc:  # noqa: BLE001 - a session's failure is one event, not a traceback to the client
            cause = unwrap(exc)
            if isinstance(cause, AvatarNotFound):
                error = LiveError("conflict", f"avatar {self.avatar_id} is no longer prepared (deleted?)", "avatar_id")
                return await self._finish(error.code, error.message, error.event())
            log.exception("live session on %s failed", self.avatar_id)
            return await self._finish(CLOSE["internal"], "internal error; see the server logs",
                                      {"type": "error", "message": "internal error", "param": None,
                                       "code": CLOSE["internal"]})
        finally:
            for task in tasks:
                task.cancel()
            if admitted:
                self.ingress.release_live()
            log.info("live session on %s ended: %s", self.avatar_id, self.stats)

    async def _finish(self, code: int, reason: str, event: dict | None = None) -> tuple[int, str] | None:
        """Send what is queued (briefly: a client that does not read gets its close anyway), then
        the event, then say how to close."""
        try:
            async with asyncio.timeout(1.0):
                while not self.out.empty():
                    await self.send(self.out.get_nowait()[0])
                if event is not None:
                    await self.send(event)
        except (TimeoutError, Gone, Exception):  # noqa: BLE001 - closing anyway
            pass
        return code, reason[:120]  # a close reason is at most 123 bytes

    async def _start(self) -> None:
        message = await self._next()
        if isinstance(message, bytes):
            raise LiveError("invalid", "send a start message before any audio", "type")
        start = self._parse(message)
        if start.get("type") != "start":
            raise LiveError("invalid", "the first message must be {\"type\": \"start\", ...}", "type")
        fmt, rate = start.get("format", "pcm_s16le"), start.get("sample_rate", SAMPLE_RATE)
        try:
            self.stream = PcmStream(fmt, rate)
        except AudioError as exc:
            raise LiveError("invalid", str(exc), "sample_rate" if "sample_rate" in str(exc) else "format") from None
        self.format, self.rate = fmt, rate
        avatar = self.ingress.live_avatar(self.avatar_id)  # LiveError: unknown, not ready
        self.prepared_id, self.fps = avatar.prepared_id, avatar.fps
        self.spf = SAMPLE_RATE // self.fps

    async def _ready(self) -> None:
        await self._idle_units(0, 0)  # the first idle GOP: the stream's size and codec
        chunk = self.idle_chunk
        self.mp4 = LiveMP4(chunk.width, chunk.height, self.fps, AacTrack())
        await self.send({"type": "ready", "avatar_id": self.avatar_id, "fps": self.fps, "width": chunk.width,
                         "height": chunk.height, "mime": codec_string(chunk.units[0]),
                         "input": {"format": self.format, "sample_rate": self.rate},
                         "lookahead_ms": round(1000 * lookahead_seconds(self.fps)),
                         "fragment_frames": self.cfg.fragment_frames})
        self.started = time.monotonic()

    # ------------------------------------------------------------------ input

    async def _next(self) -> str | bytes:
        message = await self.receive()
        if message is None:
            raise Gone()
        return message

    @staticmethod
    def _parse(text: str) -> dict:
        try:
            message = json.loads(text)
        except (ValueError, RecursionError):
            raise LiveError("invalid", "a text message must be a JSON object", "type") from None
        if not isinstance(message, dict):
            raise LiveError("invalid", "a text message must be a JSON object", "type")
        return message

    async def _read(self) -> str:
        while True:
            message = await self._next()
            if isinstance(message, bytes):
                self._audio(message)
                continue
            kind = self._parse(message).get("type")
            if kind == "end_of_utterance":
                if self.utterances and not self.utterances[-1].ended:
                    self.utterances[-1].ended = True
            elif kind == "interrupt":
                self._interrupt()
            elif kind == "close":
                return "closed by the client"
            elif kind == "start":
                raise LiveError("invalid", "the session has started already", "type")
            else:
                raise LiveError("invalid", f"unknown message type {kind!r}; expected one of "
                                           f"{', '.join(MESSAGE_TYPES[1:])}", "type")
            self.wake_renderer.set()

    def _audio(self, data: bytes) -> None:
        if len(data) > self.cfg.max_chunk_bytes:
            raise LiveError("too_big", f"an audio message is {len(data)} bytes; the limit is "
                                       f"{self.cfg.max_chunk_bytes}", "audio")
        pcm = self.stream.push(data)
        if not len(pcm):
            return
        try:
            pcm = as_pcm(pcm)
        except AudioError as exc:
            raise LiveError("invalid", f"not usable audio: {exc}", "audio") from None
        if not self.utterances or self.utterances[-1].ended:
            self.utterances.append(Utterance(self.fps))
        current = self.utterances[-1]
        current.add(pcm)
        if current.samples > self.max_audio_s * SAMPLE_RATE:
            raise LiveError("too_much", f"an utterance is longer than {self.max_audio_s:g} s; send "
                                        "end_of_utterance sooner", "audio")
        unplayed = sum(u.samples - u.sent * self.spf for u in self.utterances) / SAMPLE_RATE
        if unplayed > self.cfg.max_buffered_audio_s:
            raise LiveError("too_much", f"{unplayed:.1f} s of audio wait to be played; the limit is "
                                        f"{self.cfg.max_buffered_audio_s:g} s", "audio")
        self.wake_renderer.set()

    def _interrupt(self) -> None:
        """Stop speaking now: drop every utterance and the audio not yet played, cancel the stage
        call in flight; idle resumes with the next frame."""
        self.epoch += 1
        if self.inflight is not None:
            self.inflight.cancel()
        self.utterances.clear()
        self.carry = np.zeros(0, np.float32)
        self._event({"type": "interrupted", "frame": self.committed})

    # ------------------------------------------------------------------ rendering

    async def _render(self) -> None:
        while True:
            self.wake_renderer.clear()
            self._end_quiet_utterances()
            u = next((u for u in self.utterances if u.requested < u.renderable()), None)
            ahead = sum(u.requested - u.sent for u in self.utterances) / self.fps
            if u is None or ahead >= self.cfg.render_ahead_s:
                await _wait(self.wake_renderer, 0.25)
                continue
            if u.start_frame is None:
                before = self.utterances[self.utterances.index(u) - 1] if u is not self.utterances[0] else None
                if before is not None and not before.ended:
                    await _wait(self.wake_renderer, 0.25)  # an utterance starts after the one before it ends
                    continue
                floor = before.start_frame + before.frames if before is not None and before.start_frame is not None else 0
                u.start_frame = max(self.committed + self.cfg.start_margin_frames, floor)
            count = min(u.renderable() - u.requested, self.batch_frames)
            first, epoch = u.requested, self.epoch
            u.requested += count
            self.inflight = self.lipsync.live_speech.remote(self.prepared_id, Speech(u.audio()), first, count,
                                                            start_index=u.start_frame)
            try:
                chunk = await self.inflight
            except BaseException:
                if self.epoch == epoch or asyncio.current_task().cancelling():
                    self.inflight.cancel()
                    raise
                continue  # interrupted: the call was cancelled, its utterance dropped
            finally:
                self.inflight = None
            if self.epoch == epoch:
                u.ready.append((first, chunk))
                self.wake_pacer.set()

    def _end_quiet_utterances(self) -> None:
        now = time.monotonic()
        for u in self.utterances:
            if not u.ended and now - u.last_audio > self.cfg.utterance_gap_s:
                u.ended = True

    # ------------------------------------------------------------------ output

    async def _idle_units(self, start: int, count: int) -> list[bytes]:
        """`count` (or fewer) idle access units from session frame `start`, continuing the idle
        GOP in hand when it goes on there, else a new GOP from an IDR (aligned to idle_gop_frames,
        so later GOPs are the ones every session of the avatar asks for: cached on the stage)."""
        if self.idle is None or self.idle[0] != start or not self.idle[1]:
            gop = self.cfg.idle_gop_frames
            self.idle_chunk = await self.lipsync.live_idle.remote(self.prepared_id, start, gop - start % gop)
            self.idle = (start, list(self.idle_chunk.units))
        first, units = self.idle
        taken, rest = units[:count], units[count:]
        self.idle = (first + len(taken), rest)
        return taken

    def _event(self, event: dict) -> None:
        self.out.put_nowait((event, 0))

    def _fragment(self, units: list[bytes], pcm: np.ndarray) -> None:
        data = self.mp4.fragment(units, self.mp4.audio.push(pcm))
        self.out.put_nowait((data, len(units)))
        self.queued_frames += len(units)
        self.emitted += len(units)
        self.stats["frames_sent"] += len(units)
        if self.queued_frames / self.fps > self.cfg.send_buffer_s:
            raise LiveError("timeout", f"the client has not read {self.queued_frames / self.fps:.1f} s of "
                                       "stream: it reads more slowly than real time", None)

    async def _pace(self) -> str:
        next_stats = time.monotonic() + self.cfg.stats_every_s
        while True:
            self.wake_pacer.clear()
            now = time.monotonic()
            if self.avatar_id not in self.ingress.records.avatars:
                raise LiveError("conflict", f"avatar {self.avatar_id} was deleted", "avatar_id")
            if now - self.started > self.cfg.max_session_s:
                raise LiveError("timeout", f"the session reached its length limit of {self.cfg.max_session_s:g} s")
            if now >= next_stats:
                next_stats = now + self.cfg.stats_every_s
                self._event(self._stats())
            behind = (now - self.started) - self.emitted / self.fps
            if behind > self.cfg.lead_s:
                # The stream stalled (speech frames came late): the client's player waited too, so
                # the clock goes on from here instead of bursting idle frames to catch up, which
                # would only sit in the client's buffer and delay the next speech by as much.
                self.started += behind - self.cfg.lead_s
                self.stats["stalled_ms"] += round(1000 * (behind - self.cfg.lead_s))
            ahead = self.emitted / self.fps - (now - self.started) - self.cfg.lead_s
            if ahead > 0:
                await asyncio.sleep(min(ahead, self.cfg.stats_every_s))
                continue
            u = self.utterances[0] if self.utterances else None
            if u is not None and u.ended and u.start_frame is None and u.frames == 0:
                self.utterances.popleft()  # under a frame of audio: nothing to show, its sound plays with idle
                self.carry = np.concatenate([self.carry, u.audio()])
                continue
            if u is not None and u.start_frame is not None and self.emitted >= u.start_frame:
                if u.ready and u.ready[0][0] == u.sent:
                    self.stalling = False
                    self._speak(u)
                    continue
                if not self.stalling:  # speaking, the next frames are not rendered yet: wait for them
                    self.stalling = True
                    self.stats["stalls"] += 1
                await _wait(self.wake_pacer, 0.1)
                continue
            count = self.cfg.fragment_frames
            if u is not None and u.start_frame is not None:
                count = min(count, u.start_frame - self.emitted)
            self.committed = self.emitted + count  # an utterance's first frame is fixed after these
            units = await self._idle_units(self.emitted, count)
            pcm = np.concatenate([self.carry, np.zeros(len(units) * self.spf - len(self.carry), np.float32)]) \
                if len(self.carry) < len(units) * self.spf else self.carry[:len(units) * self.spf]
            self.carry = self.carry[len(pcm):]
            self._fragment(units, pcm)
            self.committed = self.emitted

    def _speak(self, u: Utterance) -> None:
        first, chunk = u.ready.popleft()
        n = chunk.num_frames
        if u.sent == 0:
            self.stats["utterances"] += 1
            self._event({"type": "speech_started", "frame": self.emitted})
        audio = u.audio()
        pcm = audio[u.sent * self.spf:(u.sent + n) * self.spf]
        self.committed = self.emitted + n
        self._fragment(list(chunk.units), pcm)
        self.committed = self.emitted
        u.sent += n
        self.stats["speech_frames"] += n
        arrived = u.arrived(u.sent)
        if arrived is not None:
            self.lags.append(time.monotonic() - arrived)
        self.idle = None  # idle goes on from a new IDR
        if u.finished:
            self.utterances.popleft()
            self.carry = np.concatenate([self.carry, audio[u.sent * self.spf:]])
            self._event({"type": "speech_ended", "frame": self.emitted})
        self.wake_renderer.set()

    def _stats(self) -> dict:
        unplayed = sum(u.samples - u.sent * self.spf for u in self.utterances) / SAMPLE_RATE
        return {"type": "stats", "frame": self.emitted, **self.stats,
                "lag_ms": round(1000 * median(self.lags)) if self.lags else None,
                "buffered_audio_ms": round(1000 * unplayed), "unread_frames": self.queued_frames}

    async def _write(self) -> None:
        while True:
            message, frames = await self.out.get()
            await self.send(message)
            self.queued_frames -= frames


async def _wait(event: asyncio.Event, timeout: float) -> None:
    """Until `event` is set, or `timeout` seconds (the caller looks at its state again either way)."""
    try:
        await asyncio.wait_for(event.wait(), timeout)
    except TimeoutError:
        pass
