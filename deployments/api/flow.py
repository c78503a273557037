"""The video flow of the ingress: encode -> high -> low -> decode (+ lip-sync), over the stage
handles. A part of `Ingress` (deployments/ingress.py), which has the handles and the config.

The encoder's response is passed as an argument straight to both experts (the conditioning never
visits the ingress); the experts stream a record after every denoise step, which is how the
ingress reports progress and cancels between steps, and their final latents (4 MB at 480p) come
back through it to the next stage. A stage whose replica dies mid-job runs again from its kept
input (deployments/api/retry.py); the decoder's MP4 can stream as it is made (api/content.py).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np

from deployments.api.content import streamed_mp4
from deployments.api.queue import NoProgress, Progress, cancel_on_exit, dispatched
from deployments.api.retry import StageRetries, failed, replica_gone
from deployments.common.payloads import Speech, StepRecord, VideoParams

log = logging.getLogger("avatar_serve.ingress")


@dataclass(frozen=True)
class VideoResult:
    """What the Python API returns: MP4 bytes or uint8 frames (F, H, W, 3), and the parameters
    actually used (the seed included, when the caller left it to the server)."""

    params: VideoParams
    mp4: bytes | None = None
    frames: np.ndarray | None = None


class VideoFlow:
    """Mixed into `Ingress`: uses its stage handles (`encoder`, `high`, `low`, `decoder`,
    `lipsync`) and `cfg`."""

    async def _denoise(self, expert, cond, state, progress: Progress):
        """Stream one expert's steps; on cancellation the stage is told to stop."""
        stream = expert.options(stream=True).denoise_stream.remote(cond, state)
        try:
            async for item in stream:
                if isinstance(item, StepRecord):
                    progress.step(item.index + 1, item.expert)
                else:
                    state = item
        except BaseException:
            stream.cancel()
            raise
        return state

    async def _denoised(self, params: VideoParams, image: np.ndarray, progress: Progress, calls: list,
                        retries: StageRetries):
        """encode -> high -> low: the final DenoiseState. The conditioning and the latents after
        the high expert are kept until the job ends: a stage whose replica dies runs again from
        them (deployments/api/retry.py)."""
        log.info("%s: %dx%d, %d frames, %d steps, seed %d", params.request_id, params.width,
                 params.height, params.num_frames, params.num_inference_steps, params.seed)
        progress.stage("encode")

        def encode():
            return dispatched(calls, self.encoder.encode.remote(params, image))

        cond, state = encode(), None
        for role, expert in (("high", self.high), ("low", self.low)):
            while True:
                try:
                    state = await self._denoise(expert, cond, state, progress)
                    break
                except Exception as exc:
                    if replica_gone(exc) and await failed(cond):  # the encoder's replica died
                        if not retries.allow("encoder", exc):
                            raise
                        cond = encode()
                    elif not retries.allow(role, exc):
                        raise
        progress.stage("decode")
        return state

    async def _lipsynced(self, state, audio: Speech | None, method: str, calls: list, retries: StageRetries,
                         face_box=None):
        """decode -> lip-sync (the clip goes from the decoder to the lip-sync stage directly):
        `method` is "lipsync_mp4" / "lipsync_frames" (a talk over the clip) or "create_avatar"."""
        while True:
            clip = dispatched(calls, self.decoder.decode.remote(state))
            info = dispatched(calls, self.lipsync.create_avatar.remote(clip, face_box))
            result = info if method == "create_avatar" else dispatched(
                calls, getattr(self.lipsync, method).remote(info, audio))
            try:
                return await result
            except Exception as exc:
                stage = "decoder" if replica_gone(exc) and await failed(clip) else "lipsync"
                if not retries.allow(stage, exc):
                    raise

    async def run(self, params: VideoParams, image: np.ndarray, output: Literal["mp4", "frames"] = "mp4",
                  progress: Progress | None = None, audio: Speech | None = None,
                  on_piece: Callable[[bytes], None] | None = None) -> VideoResult:
        """encode -> high -> low -> decode (+ MP4 mux in the decoder, next to the frames); with
        `audio` (admitted speech), the decoded clip goes straight to the lip-sync stage instead.
        `on_piece`: the MP4 is streamed from the decoder and each piece handed to it as it comes."""
        progress = progress or NoProgress()
        retries = StageRetries(params.request_id, progress, self.cfg.serving.stage_retries)
        async with cancel_on_exit() as calls:
            state = await self._denoised(params, image, progress, calls, retries)
            if audio is not None:
                progress.stage("lipsync")
                method = "lipsync_frames" if output == "frames" else "lipsync_mp4"
                result = await self._lipsynced(state, audio, method, calls, retries)
                return VideoResult(params=params, **({"frames": result.frames} if output == "frames" else {"mp4": result}))
            if output == "frames":
                frames = await retries.call("decoder", lambda: dispatched(calls, self.decoder.decode.remote(state)))
                return VideoResult(params=params, frames=frames.frames)
            if on_piece is not None:
                return VideoResult(params=params, mp4=await streamed_mp4(self.decoder, state, calls, retries, on_piece))
            mp4 = await retries.call("decoder", lambda: dispatched(calls, self.decoder.decode_mp4.remote(state)))
            return VideoResult(params=params, mp4=mp4)
