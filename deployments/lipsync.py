"""LipSync stage: MuseTalk v1.5 over prepared avatars, serving the talk turn and video jobs' audio.

The models and what they compute are deployments/models/musetalk/pipeline.py; this stage holds
them resident and adds what serving needs: prepared avatars (avatar.py's store, shared by the
replicas through `avatar_cache_dir`), speech admission, fragmented MP4 out, metrics.

    create_avatar   Frames (the decoder's base clip, passed straight from it) -> AvatarInfo
    speak           prepared avatar + speech -> fragmented MP4 pieces (H.264 + AAC) as made
    stream          `speak` for DeploymentHandle callers (the talk turn, streamed)
    lipsync_mp4     `speak` whole, for video jobs with audio
    lipsync_frames  the lip-synced frames themselves (Python API)
    live_speech     a live session's batch: frames of an utterance whose audio is still arriving,
                    lip-synced and H.264-encoded as one closed GOP -> VideoChunk
    live_idle       a live session's idle frames: the base clip's cycle, encoded, no model (cached)

Concurrency: every model call (whisper, UNet + VAE decode of a batch, VAE encode, face models)
runs through `self.model`, a ModelLock (one at a time, on the replica's one model thread), so
concurrent talk turns interleave batch by batch on the GPU while their CPU work (blending into
the frames, H.264) runs in parallel outside it. The avatar store has its own lock.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from typing import Iterator

import numpy as np

from deployments.common.errors import AvatarNotFound
from deployments.common.metrics import StageMetrics, TurnClock
from deployments.common.payloads import AvatarInfo, Frames, Speech, VideoChunk
from deployments.common.runtime import (
    ModelLock,
    apply_threads,
    check_resident,
    in_threads,
    log_memory,
    placement_info,
    resolve_device,
)
from deployments.config import LipSyncConfig
from deployments.config_serving import Limits
from deployments.media.audio import admit_speech, frames_for_samples
from deployments.media.fmp4 import stream_fmp4
from deployments.media.live_mp4 import encode_gop
from deployments.models.musetalk.avatar import AvatarStore, FaceDetector, PreparedAvatar
from deployments.models.musetalk.pipeline import MuseTalkPipeline

log = logging.getLogger("avatar_serve.lipsync")

Avatar = str | PreparedAvatar | AvatarInfo  # a prepared avatar, or its `prepared_id`
Audio = Speech | np.ndarray | bytes  # admitted speech, float PCM at 16 kHz, or an audio file


class LipSync:
    def __init__(self, cfg: LipSyncConfig, detector: FaceDetector | None = None, *, weights_dir: str | None = None,
                 max_audio_seconds: float = Limits.model_fields["max_audio_seconds"].default):
        """`max_audio_seconds`: the graph's audio limit (limits.max_audio_seconds), which the stage
        applies to raw audio; `detector`: a face-box source other than the configured one."""
        started = time.perf_counter()
        self.cfg = cfg
        apply_threads(cfg.placement.threads)
        self.metrics = StageMetrics("lipsync")
        self.model = ModelLock(self.metrics.observe_wait, name="lipsync")
        self.device = resolve_device(cfg.device)
        first = min(cfg.first_batch_size, cfg.batch_size)
        if first <= cfg.mp4_keyframe_interval + 1 and self.device.type == "cuda":  # LipSyncConfig.first_batch_size
            log.warning("lip-sync: a first batch of %d frames with mp4_keyframe_interval %d: a turn's first "
                        "bytes wait for its second batch (first_batch_size %d would send them with the first)",
                        first, cfg.mp4_keyframe_interval, cfg.mp4_keyframe_interval + 2)
        # The models, warmed up on the model thread (`run`) when on a GPU.
        self.pipeline = MuseTalkPipeline(cfg, self.device, run=self.model.run, detector=detector,
                                         weights_dir=weights_dir, submit=self.model.submit)
        self.max_audio_seconds = max_audio_seconds
        self.fps = cfg.fps
        self.store = AvatarStore(cfg.avatar_cache_dir, cfg.max_avatars_in_memory)
        self._idle: OrderedDict[tuple, VideoChunk] = OrderedDict()  # (prepared id, position, count) -> GOP
        self._idle_bytes, self._idle_lock = 0, threading.Lock()
        self.startup_s = time.perf_counter() - started
        self.metrics.started(self.startup_s)
        log_memory(log, "lipsync", self.device)

    # ------------------------------------------------------------------ avatars

    def create_avatar(self, clip: Frames, face_box=None) -> AvatarInfo:
        """A base clip (uint8 frames + their fps; in the graph the decoder's response, passed here
        directly so the clip never visits the ingress) -> the prepared avatar's AvatarInfo. The
        same frames and settings give the same `prepared_id`, from the cache (no VAE work).
        face_box: (x1, y1, x2, y2) in pixels for every frame, or (N, 4); None: the detector."""
        with self.metrics.timed("create_avatar"):
            return self.pipeline.prepare(clip.frames, clip.fps, self.store, face_box).info

    def get_avatar(self, avatar: Avatar) -> PreparedAvatar:
        if isinstance(avatar, PreparedAvatar):
            return avatar
        prepared_id = avatar.prepared_id if isinstance(avatar, AvatarInfo) else avatar
        found = self.store.get(prepared_id)
        if found is None:
            raise AvatarNotFound(prepared_id)
        return found

    def delete_avatar(self, prepared_id: str) -> bool:
        self.pipeline.forget(prepared_id)
        with self._idle_lock:
            for key in [k for k in self._idle if k[0] == prepared_id]:
                self._idle_bytes -= _chunk_bytes(self._idle.pop(key))
        return self.store.delete(prepared_id)

    # ------------------------------------------------------------------ speech

    def admit(self, audio: Audio) -> Speech:
        """Speech as admitted (a Speech passes: it was checked where it entered), or raw audio
        checked now by the same rule (AudioError before any model runs)."""
        if isinstance(audio, Speech):
            return audio
        return admit_speech(audio, self.max_audio_seconds, self.fps)

    def speak(self, avatar: Avatar, audio: Audio, *, start_index: int = 0) -> Iterator[bytes]:
        """Lip-sync and mux: yields fragmented-MP4 bytes (H.264 + AAC of the same audio) as each
        fragment completes. Audio problems raise AudioError before the first byte. Output frame i
        shows the base clip's cycle at i + `start_index` (a previous turn's frame count continues
        the cycle)."""
        clock = TurnClock()
        avatar, speech = self.get_avatar(avatar), self.admit(audio)
        cfg = self.cfg
        frames = self.pipeline.frames(avatar, speech.pcm, start_index=start_index, clock=clock,
                                      rgba=cfg.mp4_codec == "h264_nvenc")  # NVENC takes RGBA
        with self.metrics.timed("speak"):
            for piece in stream_fmp4(frames, speech.pcm, fps=self.fps, keyframe_interval=cfg.mp4_keyframe_interval,
                                     crf=cfg.mp4_crf, preset=cfg.mp4_preset, codec=cfg.mp4_codec,
                                     threads=cfg.placement.threads or 0, audio_rate=cfg.aac_sample_rate):
                clock.mark("first_bytes")
                yield piece
        clock.mark("total")
        for phase, seconds in clock.marks.items():
            self.metrics.observe_phase(phase, seconds)
        log.info("turn on %s: %d frames in %.2f s (%s)", avatar.prepared_id,
                 frames_for_samples(speech.num_samples, self.fps), clock.marks["total"],
                 ", ".join(f"{k} {v:.3f} s" for k, v in clock.marks.items() if k != "total"))

    async def stream(self, avatar: Avatar, audio: Audio, *, start_index: int = 0):
        """`speak` for handle callers (`options(stream=True)`): each piece is made in a worker
        thread and the generator awaits between pieces, so a turn whose client has gone stops
        at the next piece instead of running to its end."""
        async for piece in in_threads(self.speak(avatar, audio, start_index=start_index)):
            yield piece

    def lipsync_mp4(self, avatar: Avatar, audio: Audio) -> bytes:
        """A whole lip-synced MP4 (fragmented: plays anywhere an MP4 does) for video jobs."""
        with self.metrics.timed("lipsync_mp4"):
            return b"".join(self.speak(avatar, audio))

    def lipsync_frames(self, avatar: Avatar, audio: Audio) -> Frames:
        """The lip-synced frames themselves, uint8 (F, H, W, 3) at the stage's fps (Python API)."""
        with self.metrics.timed("lipsync_frames"):
            avatar, speech = self.get_avatar(avatar), self.admit(audio)
            return Frames(frames=np.concatenate(list(self.pipeline.frames(avatar, speech.pcm))), fps=self.fps)

    # ------------------------------------------------------------------ live sessions

    def _encode(self, frames: np.ndarray) -> VideoChunk:
        cfg = self.cfg
        units = encode_gop(frames, self.fps, crf=cfg.mp4_crf, preset=cfg.mp4_preset, codec=cfg.mp4_codec,
                           threads=cfg.placement.threads or 0)
        return VideoChunk(units=tuple(units), width=int(frames.shape[2]), height=int(frames.shape[1]), fps=self.fps)

    def live_speech(self, avatar: Avatar, audio: Audio, first: int, count: int, start_index: int = 0) -> VideoChunk:
        """Frames first..first+count-1 of an utterance whose audio so far, from its start, is
        `audio`: lip-synced (whisper's features over the audio so far) and encoded as one closed
        GOP. Frame j shows the base clip's cycle at j + `start_index` (the session frame where the
        utterance began), so speech continues the motion of the idle frames before it."""
        avatar, speech = self.get_avatar(avatar), self.admit(audio)
        if first < 0 or count < 1:
            raise ValueError(f"frames {first}..{first + count - 1}: need first >= 0 and count >= 1")
        with self.metrics.timed("live_speech"):
            rgba = self.cfg.mp4_codec == "h264_nvenc"
            frames = np.concatenate(list(self.pipeline.frames(avatar, speech.pcm, first=first, count=count,
                                                              batch_size=count, start_index=start_index, rgba=rgba,
                                                              shared=True)))
            return self._encode(frames)

    def live_idle(self, avatar: Avatar, start: int, count: int) -> VideoChunk:
        """Session frames start..start+count-1 without speech: the avatar's base clip cycled
        forward and backward, as a talk turn's frames would show it, encoded as one closed GOP. No
        model runs; the same frames of the cycle are encoded once (kept by an LRU bounded in
        bytes, `live_idle_cache_mb`) for every session on the avatar."""
        avatar = self.get_avatar(avatar)
        if start < 0 or count < 1:
            raise ValueError(f"frames {start}..{start + count - 1}: need start >= 0 and count >= 1")
        key = (avatar.prepared_id, start % (2 * avatar.num_frames), count)
        with self._idle_lock:
            chunk = self._idle.get(key)
            if chunk is not None:
                self._idle.move_to_end(key)
                return chunk
        frames = avatar.frames[[avatar.source_frame(start + i) for i in range(count)]]
        if self.cfg.mp4_codec == "h264_nvenc":
            frames = np.concatenate([frames, np.full_like(frames[..., :1], 255)], axis=-1)
        chunk = self._encode(frames)
        with self._idle_lock:
            if key not in self._idle:
                self._idle[key] = chunk
                self._idle_bytes += _chunk_bytes(chunk)
            while self._idle_bytes > self.cfg.live_idle_cache_mb * 2**20 and len(self._idle) > 1:
                self._idle_bytes -= _chunk_bytes(self._idle.popitem(last=False)[1])
        return chunk

    # ------------------------------------------------------------------ health

    def check_health(self) -> None:
        check_resident("lipsync", *self.pipeline.modules)

    def info(self) -> dict:
        return {**placement_info(self.device), "startup_s": self.startup_s, "compiled": self.pipeline.compiled,
                "frames_generated": self.pipeline.frames_generated}


def _chunk_bytes(chunk: VideoChunk) -> int:
    return sum(len(u) for u in chunk.units)
