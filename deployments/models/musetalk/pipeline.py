"""MuseTalk v1.5 inference, apart from serving: the models of the lip-sync stage and what they
compute, re-implemented on diffusers / transformers components (the way diffusers keeps a
pipeline apart from its models). No Ray, no avatar store, no MP4: deployments/lipsync.py serves it.

Per avatar (once; avatar.py caches the result)
    base clip -> face boxes -> 256x256 crops (N, 256, 256, 3) uint8
        -> VAE latents [lower half masked | whole crop] (N, 8, 32, 32), x 0.18215
        -> blend masks (N, 256, 256) uint8: a face parser's jaw region, or a feathered rectangle

Per talk turn (`frames`)
    PCM 16 kHz (S,) -> 30 s pieces -> whisper-tiny encoder, all 5 hidden states
        -> (T, 5, 384), T = 50 per second, concatenated over the pieces (features.AudioFeatures)
    video frame i (25 fps) -> 10 encoder frames around it -> (50, 384) + sinusoidal positions
    UNet (timestep 0, one step) on the avatar's (B, 8, 32, 32) with audio as encoder states
        -> (B, 4, 32, 32) -> / 0.18215 -> VAE decode -> (B, 3, 256, 256) -> uint8 crops
        -> resized into the face box and blended into the base frame -> uint8 (B, H, W, 3)

Every model call goes through `run(fn, *args)`: the stage passes its ModelLock's `run`, so model
work happens one call at a time on the replica's one model thread while several turns interleave
batch by batch; by default calls run inline (scripts, tests).
"""

from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict, deque
from concurrent.futures import Future
from typing import Callable, Iterator

import numpy as np
import torch

from deployments.common.errors import MissingWeightsError
from deployments.common.metrics import TurnClock
from deployments.common.runtime import dtype_for
from deployments.config import LipSyncConfig
from deployments.config_weights import MuseTalkWeights, RandomWeights
from deployments.media.audio import SAMPLE_RATE, frames_for_samples
from deployments.models.faces.face_parsing import load_face_parser, parse_faces, parsing_region
from deployments.models.hub import resolve_file
from deployments.models.musetalk.avatar import (
    AvatarStore,
    CenterBox,
    FaceDetector,
    LandmarkFaceDetector,
    PreparedAvatar,
    blend_face,
    crops_to_pixels,
    lower_face_mask,
    masked_for_unet,
    prepare_avatar,
)
from deployments.models.musetalk.blend_mask import (
    expanded_crop_box,
    jaw_blend_mask,
    parser_inputs,
    to_crop_coordinates,
)
from deployments.models.musetalk.components import SEED_OFFSET, load_models
from deployments.models.musetalk.features import AUDIO_DIM, HIDDEN_STATES, AudioFeatures, positional_encoding
from deployments.models.musetalk.paste import PasteBack
from deployments.models.musetalk.timing import window_length


def inline(fn: Callable, *args, **kwargs):
    """Run model work in the calling thread (the pipeline's default `run`)."""
    return fn(*args, **kwargs)


def lipsync_dtype(cfg: LipSyncConfig, device: torch.device) -> torch.dtype:
    """Dtype policy: one compute dtype for whisper, UNet and VAE: `dtype` (fp16, as MuseTalk's
    `--use_float16`) on a GPU, `dtype_cpu` (fp32) on a CPU. Audio features and latents are cast
    to it at the model boundary; the positional encoding is added in fp32 first."""
    return dtype_for(device, cfg.dtype, cfg.dtype_cpu)


def face_parser_path(cfg: LipSyncConfig, weights_dir: str | None = None):
    """The BiSeNet state dict for `blend_mask: face_parsing`; None (random) for random weights."""
    weights = cfg.weights
    if isinstance(weights, RandomWeights):
        return None
    if isinstance(weights, MuseTalkWeights) and weights.face_parser:
        # Not on MuseTalk's Hub repo (its download script fetches it from Google Drive): a local
        # file path, or a file of `repo` when that is a local folder.
        if os.path.isfile(weights.face_parser):
            return weights.face_parser
        return resolve_file(weights.repo, weights.face_parser, weights_dir)
    raise ValueError("blend_mask 'face_parsing' needs weights.face_parser (the BiSeNet file)")


class MuseTalkPipeline:
    """MuseTalk's models on one device and the computations of avatar preparation and talk turns.
    `vae_encodes` counts VAE encoder calls (preparation is the only place that encodes; a cached
    avatar adds none); `frames_generated` counts frames the UNet made."""

    def __init__(self, cfg: LipSyncConfig, device: torch.device, run: Callable = inline,
                 detector: FaceDetector | None = None, weights_dir: str | None = None, submit: Callable | None = None):
        self.cfg, self.device, self.run = cfg, device, run
        # Queues model work without waiting (the stage's ModelLock.submit); None: run it inline.
        self.submit = submit
        self._shared: deque[_SharedBatch] = deque()  # live batches waiting to be merged (see `_launch_shared`)
        self._shared_lock = threading.Lock()
        self.dtype = lipsync_dtype(cfg, device)
        self.fps = cfg.fps
        self.feature_extractor, self.whisper, self.unet, self.vae = load_models(
            cfg.weights, self.dtype, device, weights_dir)
        self.scaling_factor = float(self.vae.config.scaling_factor)
        if detector is None:
            detector = self._landmark_detector() if cfg.face_detector == "landmarks" else CenterBox(tuple(cfg.center_box))
        self.detector = detector
        self.face_parser = None
        if cfg.blend_mask == "face_parsing":
            self.face_parser = load_face_parser(face_parser_path(cfg, weights_dir), device, self.dtype,
                                                seed=getattr(cfg.weights, "seed", 0) + SEED_OFFSET["face_parser"])
        self.feathered_mask = lower_face_mask(cfg.blend_upper_ratio, cfg.blend_feather)
        self.pe = positional_encoding(window_length(cfg.fps) * HIDDEN_STATES).to(device)
        self._pastes: OrderedDict = OrderedDict()  # (prepared id, channels) -> PasteBack, through run
        self.vae_encodes = 0  # counted through run
        self.frames_generated = 0  # counted through run
        self.merged_calls = 0  # model calls that ran shared batches (several callers' at once)
        self.memory_format = torch.contiguous_format
        self.compiled = False
        if device.type == "cuda":
            self._speed_settings()

    @property
    def modules(self) -> tuple[torch.nn.Module, ...]:
        return self.whisper, self.unet, self.vae

    # ------------------------------------------------------------------ loading

    def _landmark_detector(self) -> LandmarkFaceDetector:
        """S3FD face box + FAN 68 landmarks, combined by MuseTalk's rule (avatar.box_from_landmarks).
        Random models for random weights (tests); local files for MuseTalk weights."""
        from deployments.models.faces.fan import landmarks_68, load_fan
        from deployments.models.faces.s3fd import largest_face_box, load_s3fd

        weights = self.cfg.weights
        if isinstance(weights, RandomWeights):
            s3fd_path = fan_path = None
            stacks = 1 if weights.arch == "tiny" else 4
        elif isinstance(weights, MuseTalkWeights) and weights.s3fd and weights.fan:
            for path in (weights.s3fd, weights.fan):
                if not os.path.isfile(path):
                    raise MissingWeightsError(path)
            s3fd_path, fan_path, stacks = weights.s3fd, weights.fan, 4
        else:
            raise ValueError("face_detector 'landmarks' needs weights.s3fd and weights.fan (local files)")
        seed = getattr(weights, "seed", 0)
        s3fd = load_s3fd(s3fd_path, self.device, seed=seed + SEED_OFFSET["s3fd"])
        fan = load_fan(fan_path, self.device, seed=seed + SEED_OFFSET["fan"], num_modules=stacks)
        fallback = CenterBox(tuple(self.cfg.center_box))

        def box(frame: np.ndarray):
            found = self.run(largest_face_box, s3fd, frame)
            return found if found is not None else fallback(frame)

        def landmarks(frame: np.ndarray, face_box):
            return self.run(landmarks_68, fan, frame, face_box)

        return LandmarkFaceDetector(box=box, landmarks=landmarks, model_name="s3fd+fan")

    def _speed_settings(self) -> None:
        """GPU-only settings from the config (each measured in bench/README.md), then the warm-up."""
        cfg = self.cfg
        if cfg.cudnn_benchmark:
            # Every batch has the same crop shape, so cuDNN's per-shape autotuning pays off at
            # once. Process-wide, which is fine: this replica runs this stage alone.
            torch.backends.cudnn.benchmark = True
        if cfg.channels_last:
            self.memory_format = torch.channels_last
            self.unet.to(memory_format=torch.channels_last)
            self.vae.to(memory_format=torch.channels_last)
        if cfg.compile:
            self.unet = torch.compile(self.unet, dynamic=False)
            self.vae.decoder = torch.compile(self.vae.decoder, dynamic=False)
            self.compiled = True
        # Warm up now (compiling takes minutes), not in a user's first talk turn: one pass per
        # batch size a turn uses, and one whisper piece.
        window = window_length(self.fps) * HIDDEN_STATES
        for size in self.batch_sizes:
            self.generate_on_device(torch.zeros(size, 8, 32, 32), torch.zeros(size, window, AUDIO_DIM))
        self.encode_audio_piece(np.zeros(SAMPLE_RATE, np.float32))
        torch.cuda.synchronize(self.device)

    @property
    def batch_sizes(self) -> list[int]:
        """The batch sizes the UNet runs (compiled for each; a shorter batch is padded up to one):
        a turn's (smaller) first batch and the rest, and a live session's."""
        cfg = self.cfg
        return sorted({min(cfg.first_batch_size, cfg.batch_size), cfg.batch_size, cfg.live_batch_frames})

    # ------------------------------------------------------------------ avatar preparation

    def settings(self) -> dict:
        """What the prepared latents depend on besides the frames (part of the content hash)."""
        out = {"weights": self.cfg.weights.model_dump(mode="json"), "dtype": str(self.dtype)}
        if self.cfg.blend_mask != "feathered":  # (the feathered mask's bytes are hashed already)
            out.update(blend_mask=self.cfg.blend_mask, blend_upper_ratio=self.cfg.blend_upper_ratio)
        return out

    def prepare(self, frames: np.ndarray, src_fps: float, store: AvatarStore, face_box=None) -> PreparedAvatar:
        """Base clip uint8 (N, H, W, 3) at `src_fps` -> PreparedAvatar, from `store` when the same
        frames and settings were prepared before (no VAE work then). face_box: (x1, y1, x2, y2) in
        pixels for every frame, or (N, 4); None uses the detector."""
        return prepare_avatar(frames, src_fps, self.encode_crops, store, self.settings(), self.detector,
                              face_box=face_box, extra_margin=self.cfg.extra_margin,
                              mask=self.face_parsing_masks if self.face_parser is not None else self.feathered_mask,
                              fps=self.fps)

    def face_parsing_masks(self, frames: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        """uint8 frames (N, H, W, 3) + face boxes (N, 4) -> MuseTalk v1.5's blend masks, uint8
        (N, 256, 256) in crop coordinates (blend_mask.py): the parser reads the 1.5x square crop
        around each box; its jaw region, cut to the box, cleared above the crop's centre and
        blurred, weighs the generated face."""
        crop_boxes = [expanded_crop_box(box) for box in boxes]
        size, masks = self.cfg.batch_size, []
        for i in range(0, len(frames), size):
            inputs = parser_inputs(frames[i:i + size], crop_boxes[i:i + size])
            class_map = self.run(parse_faces, self.face_parser, inputs, batch_size=size)
            for region, box, crop_box in zip(parsing_region(class_map, "jaw"), boxes[i:], crop_boxes[i:]):
                masks.append(to_crop_coordinates(jaw_blend_mask(region, box, crop_box, self.cfg.blend_upper_ratio)))
        return np.stack(masks)

    @torch.no_grad()
    def encode_crops(self, crops: np.ndarray) -> np.ndarray:
        """uint8 crops (B, 256, 256, 3) -> float32 (B, 8, 32, 32): VAE latents of the crop with
        its lower half masked, then of the whole crop, times the scaling factor.

        The posterior mean is used (MuseTalk samples; the SD VAE's posterior std is tiny, and the
        mean makes preparation deterministic).
        """
        out = []
        for i in range(0, crops.shape[0], self.cfg.batch_size):
            part = crops[i:i + self.cfg.batch_size]
            pixels = np.concatenate([masked_for_unet(part), crops_to_pixels(part)])
            masked, reference = self.run(self._encode_pixels, pixels)
            out.append(torch.cat([masked, reference], dim=1).numpy())
        return np.concatenate(out)

    def _encode_pixels(self, pixels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """`encode_crops`' model work: latents of the masked and the whole crops, on the host."""
        self.vae_encodes += 1
        x = torch.from_numpy(pixels).to(self.device, self.dtype)
        latents = self.vae.encode(x).latent_dist.mode() * self.scaling_factor
        return latents.float().cpu().chunk(2)

    def forget(self, prepared_id: str) -> None:
        """Drop the device copies of a deleted avatar's frames."""

        def drop():
            for key in [k for k in self._pastes if k[0] == prepared_id]:
                del self._pastes[key]

        self.run(drop)

    # ------------------------------------------------------------------ audio and faces

    @torch.no_grad()
    def encode_audio_piece(self, pcm: np.ndarray) -> torch.Tensor:
        """Up to 30 s of 16 kHz PCM -> (1500, 5, 384) fp32: every hidden state of the whisper
        encoder (embeddings + each layer; the last one layer-normed) over the padded piece."""
        mel = self.feature_extractor(pcm, sampling_rate=SAMPLE_RATE, return_tensors="pt").input_features
        hidden = self.run(self._whisper, mel)
        if len(hidden) != HIDDEN_STATES:
            raise RuntimeError(f"whisper gave {len(hidden)} hidden states, expected {HIDDEN_STATES}")
        return torch.stack(hidden, dim=2)[0].float()

    def _whisper(self, mel: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.whisper(mel.to(self.device, self.dtype), output_hidden_states=True).hidden_states

    def audio_features(self, pcm: np.ndarray) -> AudioFeatures:
        return AudioFeatures(self.encode_audio_piece, pcm, self.fps)

    def generate_on_device(self, latents: np.ndarray | torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
        """One MuseTalk step: latents (B, 8, 32, 32) + audio windows (B, 50, 384)
        -> uint8 face crops (B, 256, 256, 3), left on the device (queued, not waited for)."""
        return self.run(self._generate, latents, audio)

    def generate(self, latents: np.ndarray | torch.Tensor, audio: torch.Tensor) -> np.ndarray:
        """`generate_on_device`, as numpy uint8 (B, 256, 256, 3)."""
        return self.generate_on_device(latents, audio).cpu().numpy()

    @torch.no_grad()
    def _generate(self, latents: np.ndarray | torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
        latents = torch.as_tensor(latents).to(self.device, self.dtype).contiguous(memory_format=self.memory_format)
        audio = (audio.to(self.device, torch.float32) + self.pe[:audio.shape[1]]).to(self.dtype)
        n = latents.shape[0]
        sizes = self.batch_sizes
        if self.compiled and n < sizes[-1]:
            # Compiled graphs are specialised to their batch sizes: pad a short batch up to one.
            pad = next(size for size in sizes if size >= n) - n
            latents = torch.cat([latents, latents[-1:].expand(pad, -1, -1, -1)])
            audio = torch.cat([audio, audio[-1:].expand(pad, -1, -1)])
        timestep = torch.zeros(1, device=self.device, dtype=torch.long)
        pred = self.unet(latents, timestep, encoder_hidden_states=audio).sample  # (B, 4, 32, 32)
        image = self.vae.decode(pred / self.scaling_factor).sample  # (B, 3, 256, 256) in [-1, 1]
        image = ((image[:n].float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
        return image.permute(0, 2, 3, 1)

    # ------------------------------------------------------------------ talk turns

    def _paste_back(self, avatar: PreparedAvatar, channels: int) -> PasteBack | None:
        """The avatar's frames and blend weights on the device (cached, a few avatars), or None
        when faces are pasted on the CPU. Runs through `run`."""
        mode = self.cfg.paste_back
        if mode == "host" or (mode == "auto" and self.device.type != "cuda"):
            return None
        key = (avatar.prepared_id, channels)
        paste = self._pastes.pop(key, None) or PasteBack(avatar, self.device, channels)
        self._pastes[key] = paste  # most recently used last
        while len(self._pastes) > self.cfg.max_avatars_in_memory:
            self._pastes.popitem(last=False)
        return paste

    def frames(self, avatar: PreparedAvatar, pcm: np.ndarray, *, batch_size: int | None = None,
               start_index: int = 0, clock: TurnClock | None = None, rgba: bool = False,
               first: int = 0, count: int | None = None, shared: bool = False) -> Iterator[np.ndarray]:
        """Lip-sync `pcm` (float32 (S,), 16 kHz mono, already admitted) onto a prepared avatar.

        Yields uint8 frame chunks (B, H, W, 3): with `batch_size` given, B = batch_size; by
        default the first chunk has `first_batch_size` frames and the rest `batch_size` (the last
        may be shorter); floor(seconds * fps) frames in all. Output frame i shows base frame
        cycle[(i + start_index) % 2M] of the retimed clip (pass the previous turn's frame count to
        continue the cycle). `clock` notes when the first features, batch and frames are done.
        `rgba`: (B, H, W, 4) frames with an opaque alpha channel, for encoders that take RGBA.
        `first`, `count`: only frames first..first+count-1 (a live session's batch: `pcm` is its
        utterance so far, the features are whisper's over it, and frames whose window reaches past
        its end see zeros there, as the turn's last frames do past the end of its audio).
        `shared`: the UNet and VAE run this batch merged with other callers' shared batches that
        wait at the same time (live sessions), in one model call of up to the largest batch size:
        fewer, fuller GPU calls; each caller's frames match its batch alone within rounding.
        """
        if avatar.fps != self.fps:
            raise ValueError(f"avatar was prepared for {avatar.fps} fps, the pipeline runs at {self.fps}")
        clock = clock or TurnClock()
        n = frames_for_samples(pcm.shape[0], self.fps) if count is None else first + count
        first_size = batch_size or min(self.cfg.first_batch_size, self.cfg.batch_size)
        batch_size = batch_size or self.cfg.batch_size
        features = self.audio_features(pcm)
        paste = self.run(self._paste_back, avatar, 4 if rgba else 3)

        def blended(sources, host, event) -> np.ndarray:
            if event is not None:
                event.synchronize()
            clock.mark("first_batch")
            if paste is not None:  # pasted on the device already
                frames = host.numpy()
            else:
                frames = np.stack([blend_face(avatar.frames[s], crop, avatar.boxes[s], avatar.masks[s])
                                   for s, crop in zip(sources, host.numpy())])
                if rgba:
                    frames = np.concatenate([frames, np.full_like(frames[..., :1], 255)], axis=-1)
            clock.mark("first_frames")
            return frames

        pending = None  # the batch whose crops are on their way to the host
        # A smaller first batch brings the first chunk sooner; full batches after it.
        starts = [first, *range(first + first_size, n, batch_size)] if n > first else []
        for k, (lo, hi) in enumerate(zip(starts, [*starts[1:], n])):
            sources = [avatar.source_frame(i, start_index) for i in range(lo, hi)]
            windows = features.windows(range(lo, hi))  # whisper runs here when the turn needs a new piece
            clock.mark("features")
            if shared:
                host = self._launch_shared(avatar, sources, windows, paste)
            else:
                host = self.run(self._launch_batch, avatar, sources, windows, paste)
            previous, pending = pending, (sources, *host)
            if previous is not None:
                yield blended(*previous)  # the GPU is already working on this batch meanwhile
            # Computed synchronously (CPU): nothing to overlap. The first batch goes out at once
            # too: the turn's first byte must not wait for the second batch's features, its
            # launch or another turn holding the model; later batches overlap.
            if pending[2] is None or k == 0:
                yield blended(*pending)
                pending = None
        if pending is not None:
            yield blended(*pending)

    def _launch_shared(self, avatar: PreparedAvatar, sources: list[int], windows: torch.Tensor,
                       paste: PasteBack | None):
        """`_launch_batch` merged with other shared batches: the batch joins the waiting ones and a
        merge is queued on the model thread; whichever merge runs first takes every waiting batch
        (up to the largest compiled batch size) into one UNet + VAE call and hands each caller its
        rows. Written here because the batches come from separate stage calls (one per live
        session), which Ray Serve's own @serve.batch would have to wrap at the deployment, in Ray."""
        lock = getattr(self.submit, "__self__", None)
        if self.submit is None or threading.get_ident() == getattr(lock, "thread_id", None):
            return self.run(self._launch_batch, avatar, sources, windows, paste)  # nothing to merge with
        batch = _SharedBatch(avatar, sources, windows, paste)
        with self._shared_lock:
            self._shared.append(batch)
        self.submit(self._merge)
        return batch.future.result()

    def _merge(self) -> None:
        """On the model thread: the waiting shared batches, as many as fit in the largest batch
        size, through one `_generate`; each gets its own crops pasted and on their way to the host."""
        limit = self.batch_sizes[-1]
        with self._shared_lock:
            taken, total = [], 0
            while self._shared and (not taken or total + len(self._shared[0].sources) <= limit):
                taken.append(self._shared.popleft())
                total += len(taken[-1].sources)
        if not taken:
            return  # an earlier merge took them
        try:
            latents = np.concatenate([b.avatar.latents[b.sources] for b in taken])
            crops = self._generate(latents, torch.cat([b.windows for b in taken]))
            self.frames_generated += total
            self.merged_calls += 1
            at = 0
            for b in taken:
                own = crops[at:at + len(b.sources)]
                at += len(b.sources)
                b.future.set_result(_to_host(own if b.paste is None else b.paste(b.sources, own)))
            if self.cfg.simulate_batch_seconds:
                time.sleep(self.cfg.simulate_batch_seconds)
        except BaseException as exc:  # noqa: BLE001 - every caller of the merge gets the failure
            for b in taken:
                if not b.future.done():
                    b.future.set_exception(exc)

    def _launch_batch(self, avatar: PreparedAvatar, sources: list[int], windows: torch.Tensor,
                      paste: PasteBack | None):
        """One batch of a turn (through `run`): generate, paste (on the device) and start the copy
        to the host -> (tensor, event to wait on before reading it, or None)."""
        self.frames_generated += len(sources)
        crops = self._generate(avatar.latents[sources], windows)
        host = _to_host(crops if paste is None else paste(sources, crops))
        if self.cfg.simulate_batch_seconds:
            time.sleep(self.cfg.simulate_batch_seconds)
        return host


class _SharedBatch:
    """One caller's batch waiting to be merged with others (`MuseTalkPipeline._launch_shared`)."""

    def __init__(self, avatar: PreparedAvatar, sources: list[int], windows: torch.Tensor, paste: PasteBack | None):
        self.avatar, self.sources, self.windows, self.paste = avatar, sources, windows, paste
        self.future: Future = Future()


def _to_host(crops: torch.Tensor):
    """Start copying device crops to host memory -> (tensor, event to wait on before reading).
    On a GPU the copy is queued behind the batch that made them, so the CPU can blend one batch
    while the GPU computes the next."""
    if crops.device.type != "cuda":
        return crops, None
    host = torch.empty(crops.shape, dtype=crops.dtype, pin_memory=True)
    host.copy_(crops, non_blocking=True)
    event = torch.cuda.Event()
    event.record()
    return host, event
