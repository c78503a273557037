"""Decoder stage: Wan VAE decode of the final latents into video frames.

    latents (1, 16, T, h, w) fp32 -> denormalise -> VAE decode -> (1, 3, F, 8h, 8w) in [-1, 1]
    -> float frames (F, H, W, 3) in [0, 1] -> uint8 frames (F, H, W, 3)

The decoder also muxes the MP4 (`decode_fmp4`, streamed; `decode_mp4`, whole), so the ~100 MB of
frames of an 81-frame 480p clip never leave this process on the HTTP path; only the
few-hundred-kB file does. It decodes chunk by chunk (one latent frame -> 1, then 4 video frames,
as the VAE's own loop does) on the model thread while the caller's thread encodes H.264 into a
fragmented MP4, a fragment per second of video, each handed on as soon as it is cut: the file
costs only its tail after the last chunk, and its first bytes leave before the clip is decoded.

Concurrency: one VAE decode at a time per replica, on its one model thread (`self.model`, a
ModelLock): the Wan VAE keeps per-call feature caches on the module. The MP4's tail runs outside
the lock, so one request finishes its file while the next decodes.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time

import numpy as np
import torch
from diffusers.video_processor import VideoProcessor

from deployments.common.metrics import StageMetrics
from deployments.common.payloads import DenoiseState, Frames
from deployments.common.runtime import (
    ModelLock,
    apply_threads,
    check_resident,
    dtype_for,
    log_memory,
    placement_info,
    resolve_device,
)
from deployments.common.transport import unpack
from deployments.config import DecoderConfig
from deployments.media.fmp4 import clip_writer
from deployments.models.wan.components import load_vae, set_conv_format

log = logging.getLogger("avatar_serve.decoder")


def vae_norm_constants(vae, dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Dtype policy: the latents mean/std are cast together with the VAE weights.

    Left in fp32 they would silently upcast the bf16 latents and the decode with them.
    Returns (mean, std), each (1, z, 1, 1, 1) in the VAE's dtype.
    """
    z = vae.config.z_dim
    mean = torch.tensor(vae.config.latents_mean).view(1, z, 1, 1, 1).to(device, dtype)
    std = torch.tensor(vae.config.latents_std).view(1, z, 1, 1, 1).to(device, dtype)
    return mean, std


class _Abandoned(Exception):
    """The caller of a streamed decode stopped reading: the decode stops at its next chunk."""


def to_uint8(frames: np.ndarray) -> np.ndarray:
    """float frames in [0, 1] -> uint8, rounded as diffusers' `numpy_to_pil` does."""
    return (frames * 255).round().astype(np.uint8)


class Decoder:
    def __init__(self, cfg: DecoderConfig, weights_dir: str | None = None):
        started = time.perf_counter()
        self.cfg = cfg
        apply_threads(cfg.placement.threads)
        self.device = resolve_device(cfg.device)
        self.dtype = dtype_for(self.device, cfg.vae_dtype, cfg.vae_dtype_cpu)
        self.vae = load_vae(cfg.weights, self.dtype, self.device, weights_dir)
        if cfg.channels_last and self.device.type == "cuda":
            set_conv_format(self.vae, torch.channels_last_3d)
        # Cast once with the weights (see vae_norm_constants).
        self.latents_mean, self.latents_std = vae_norm_constants(self.vae, self.dtype, self.device)
        self.video_processor = VideoProcessor(vae_scale_factor=self.vae.config.scale_factor_spatial)
        self.metrics = StageMetrics("decoder")
        self.model = ModelLock(self.metrics.observe_wait, name="decoder")
        for shape in cfg.warmup:
            # What a request runs, at its shape: the decode (cuDNN's choices, the allocator) and the
            # MP4 encoding (x264's one-time set-up made the first 480p clip's encoding 0.25 s slower
            # on the dev box). Not timed into the stage's metrics.
            z = self.vae.config.z_dim
            t, s = self.vae.config.scale_factor_temporal, self.vae.config.scale_factor_spatial
            latents = torch.zeros(1, z, (shape.num_frames - 1) // t + 1, shape.height // s, shape.width // s,
                                  device=self.device)
            for _ in self._fmp4(latents, fps=16):
                pass
        self.startup_s = time.perf_counter() - started
        self.metrics.started(self.startup_s)
        log_memory(log, "decoder", self.device)

    def _final_latents(self, state: DenoiseState) -> torch.Tensor:
        """The denoised latents of `state` on this device (refused while steps remain)."""
        if not state.done:
            raise ValueError(f"latents are not fully denoised: step {state.next_step} of {state.total_steps}")
        return unpack(state.latents, self.device)

    @torch.no_grad()
    def decode_float(self, state: DenoiseState) -> np.ndarray:
        """-> float32 frames (F, H, W, 3) in [0, 1]."""
        return self.decode_latents(self._final_latents(state))

    def _denormalise(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents -> the VAE's latent space, in its dtype on its device."""
        return latents.to(self.device, self.dtype) * self.latents_std + self.latents_mean

    def _decode_video(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents (1, z, T, h, w) -> the VAE's frames (1, 3, F, H, W) in [-1, 1], in
        its dtype on its device. Run through `self.model`."""
        return self.vae.decode(self._denormalise(latents), return_dict=False)[0]

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> np.ndarray:
        """Normalised latents (1, z, T, h, w) -> float32 frames (F, H, W, 3) in [0, 1]."""
        video = self.model.run(self._decode_video, latents)
        return self.video_processor.postprocess_video(video, output_type="np")[0].astype(np.float32)

    @torch.no_grad()
    def decode_uint8(self, latents: torch.Tensor) -> np.ndarray:
        """Normalised latents -> uint8 frames (F, H, W, 3), equal to `to_uint8(decode_latents(..))`.

        Written out rather than through diffusers' `postprocess_video` so that it runs on the
        device: the same steps (denormalise in the VAE's dtype, then fp32, x255, round half to
        even), but half the bytes (bf16 -> uint8) cross to the host and no host thread converts the
        100 M values of an 832x480x81 clip (measured in bench/README.md).
        """
        return self.model.run(lambda: self._to_uint8(self._decode_video(latents)[0]))

    @staticmethod
    def _to_uint8(video: torch.Tensor) -> np.ndarray:
        """(3, F, H, W) in [-1, 1] on the device -> uint8 (F, H, W, 3) on the host."""
        frames = (video / 2 + 0.5).clamp(0, 1).permute(1, 2, 3, 0).float()
        return (frames * 255).round().to(torch.uint8).cpu().numpy()

    def _streams(self) -> bool:
        """Whether the chunked decode applies: the Wan 2.1 VAE untiled (the 2.2 5B VAE patchifies
        and a tiled decode has its own loop; those take the whole-clip path)."""
        return (getattr(self.vae.config, "patch_size", None) is None and not getattr(self.vae, "use_tiling", False)
                and hasattr(self.vae, "clear_cache"))

    @torch.no_grad()
    def decode_chunks(self, latents: torch.Tensor, on_chunk) -> None:
        """Decode as diffusers' `AutoencoderKLWan._decode` does -- the same decoder calls over
        the latent frames, one at a time, with the module's causal feature cache -- but hand each
        chunk's uint8 frames to `on_chunk` as soon as it is decoded instead of concatenating
        (written here because diffusers offers no per-chunk decode). Equal to `decode_uint8`.
        `on_chunk` is called on the model thread."""
        self.model.run(self._decode_chunks, latents, on_chunk)

    def _decode_chunks(self, latents: torch.Tensor, on_chunk) -> None:
        vae = self.vae
        vae.clear_cache()
        try:
            x = vae.post_quant_conv(self._denormalise(latents))
            for i in range(x.shape[2]):
                vae._conv_idx = [0]
                out = vae.decoder(x[:, :, i:i + 1], feat_cache=vae._feat_map, feat_idx=vae._conv_idx,
                                  first_chunk=i == 0)
                on_chunk(self._to_uint8(out.clamp(-1.0, 1.0)[0]))
        finally:
            vae.clear_cache()

    def decode(self, state: DenoiseState) -> Frames:
        """-> uint8 frames (F, H, W, 3)."""
        latents = self._final_latents(state)
        with self.metrics.timed("decode"):
            frames = Frames(frames=self.decode_uint8(latents), fps=state.params.fps)
        log.info("%s: decoded %d frames", state.params.request_id, frames.num_frames)
        return frames

    def decode_mp4(self, state: DenoiseState) -> bytes:
        """-> the whole clip's (fragmented) MP4 at the request's frame rate: what `decode_fmp4`
        streams, joined."""
        return b"".join(self.decode_fmp4(state))

    def decode_fmp4(self, state: DenoiseState):
        """-> fragmented MP4 bytes at the request's frame rate, yielded as they are made (a
        generator: `options(stream=True)`); their concatenation is one MP4 file. Metrics:
        `decode` until the last chunk is decoded, `mux` what is left after it."""
        pieces = 0
        for piece in self._fmp4(self._final_latents(state), state.params.fps, self.metrics.timed):
            pieces += 1
            yield piece
        log.info("%s: decoded and muxed in %d pieces", state.params.request_id, pieces)

    def _fmp4(self, latents: torch.Tensor, fps: int, timed=None):
        """Normalised latents -> fMP4 pieces: chunks decode on the model thread (queued like any
        model call) while this thread encodes the ones before. A caller that stops early (client
        gone) stops the decode at its next chunk."""
        timed = timed or (lambda _: contextlib.nullcontext())
        chunks: queue.Queue = queue.Queue()
        stop = threading.Event()
        end = object()

        def on_chunk(chunk: np.ndarray) -> None:
            if stop.is_set():
                raise _Abandoned()
            chunks.put(chunk)

        def decode() -> None:
            if self._streams():
                self._decode_chunks(latents, on_chunk)
            else:  # a tiled or patchified VAE: the whole clip, one chunk
                on_chunk(self._to_uint8(self._decode_video(latents)[0]))

        with torch.no_grad():  # the model thread takes the caller's grad mode
            work = self.model.submit(decode)
        work.add_done_callback(lambda _: chunks.put(end))
        writer = clip_writer(fps)
        try:
            with writer:
                with timed("decode"):
                    while (chunk := chunks.get()) is not end:
                        if piece := writer.write(chunk):
                            yield piece
                    work.result()  # the decode's own error, if it failed
                with timed("mux"):
                    tail = writer.close()
            if tail:
                yield tail
        finally:
            stop.set()  # stopped early: the decode ends at its next chunk
            if not work.cancel():
                with contextlib.suppress(_Abandoned):
                    work.result()  # before the next call: this one's memory is freed first

    def check_health(self) -> None:
        check_resident("decoder", self.vae)

    def info(self) -> dict:
        return {**placement_info(self.device), "startup_s": self.startup_s}
