"""Encoder stage: UMT5 text encoder + Wan VAE encode of the first frame.

    prompt -> context (1, 512, D)            D = 4096 for umT5-XXL
    image  -> condition (1, 4 + 16, T, H/8, W/8)   T = (F - 1) / 4 + 1

Mirrors diffusers' `WanImageToVideoPipeline.encode_prompt` / `prepare_latents` (the reference the
tests compare against) as a stage of its own, so it can sit on its own GPU and stay resident.

Concurrency: one `encode` at a time per replica, on its one model thread (`self.model`, a
ModelLock). The Wan VAE keeps per-call feature caches on the module and fast tokenizers refuse
concurrent use, so two requests inside it at once would crash or, worse, mix their latents; other
requests wait their turn.
"""

from __future__ import annotations

import hashlib
import logging
import time

import numpy as np
import PIL.Image
import torch
from diffusers.pipelines.wan.pipeline_wan_i2v import prompt_clean
from diffusers.video_processor import VideoProcessor

from deployments.common.cache import LruCache
from deployments.common.metrics import StageMetrics
from deployments.common.payloads import Conditioning, VideoParams, WireTensor
from deployments.common.runtime import (
    ModelLock,
    apply_threads,
    check_resident,
    dtype_for,
    log_memory,
    placement_info,
    resolve_device,
)
from deployments.common.transport import pack, torch_dtype
from deployments.config import EncoderConfig
from deployments.models.wan.components import load_text_encoder, load_vae, set_conv_format

log = logging.getLogger("avatar_serve.encoder")


def text_encoder_dtype(cfg: EncoderConfig, device: torch.device) -> torch.dtype:
    """Dtype policy: the text encoder runs in bf16 on a GPU whatever the DIT computes in.

    Its output keeps this dtype across the stage boundary; the expert casts it on arrival
    (`dit_expert.cast_context`), never the encoder.
    """
    return dtype_for(device, cfg.text_encoder_dtype, cfg.text_encoder_dtype_cpu)


def first_frame_mask(num_frames: int, latent_frames: int, h: int, w: int, temporal: int) -> torch.Tensor:
    """(1, temporal, T, h, w): 1 where the pixel frame is given (frame 0), 0 elsewhere.

    The first latent frame covers one pixel frame, the others `temporal` each; the mask repeats
    frame 0 `temporal` times so every latent frame has `temporal` mask channels.
    """
    mask = torch.zeros(1, 1, num_frames, h, w)
    mask[:, :, 0] = 1
    mask = torch.cat([mask[:, :, :1].repeat_interleave(temporal, dim=2), mask[:, :, 1:]], dim=2)
    return mask.view(1, latent_frames, temporal, h, w).transpose(1, 2)


def centre_crop(image_w: int, image_h: int, width: int, height: int) -> tuple[int, int, int, int] | None:
    """The centre box (x1, y1, x2, y2) of an image_w x image_h image with the aspect of a width x
    height clip (None: the aspects already agree to 1/1000)."""
    if abs(image_w * height - image_h * width) <= 1e-3 * image_w * height:
        return None
    if image_w * height > image_h * width:  # the image is wider: trim left and right
        w = max(1, round(image_h * width / height))
        x1 = (image_w - w) // 2
        return x1, 0, x1 + w, image_h
    h = max(1, round(image_w * height / width))
    y1 = (image_h - h) // 2
    return 0, y1, image_w, y1 + h


class Encoder:
    def __init__(self, cfg: EncoderConfig, weights_dir: str | None = None):
        started = time.perf_counter()
        self.cfg = cfg
        apply_threads(cfg.placement.threads)
        self.device = resolve_device(cfg.device)
        self.text_dtype = text_encoder_dtype(cfg, self.device)
        self.vae_dtype = torch_dtype(cfg.vae_dtype)
        self.tokenizer, self.text_encoder = load_text_encoder(cfg.weights, self.text_dtype, self.device,
                                                              weights_dir)
        self.vae = load_vae(cfg.weights, self.vae_dtype, self.device, weights_dir)
        if cfg.channels_last and self.device.type == "cuda":
            set_conv_format(self.vae, torch.channels_last_3d)
        self.temporal = self.vae.config.scale_factor_temporal
        self.spatial = self.vae.config.scale_factor_spatial
        self.video_processor = VideoProcessor(vae_scale_factor=self.spatial)
        z = self.vae.config.z_dim
        # Normalisation runs in fp32 on the fp32 latents, multiplying by 1/std, as the reference
        # pipeline does (bit-for-bit the same condition).
        self.latents_mean = torch.tensor(self.vae.config.latents_mean, device=self.device).view(1, z, 1, 1, 1)
        self.latents_inv_std = 1.0 / torch.tensor(self.vae.config.latents_std, device=self.device).view(1, z, 1, 1, 1)
        # The embeddings of recent prompts (`prompt_cache_size`): a prompt's embedding depends on
        # its text alone, so a repeated one -- the default negative prompt of every CFG request, a
        # product's prompt template -- skips the text encoder and gets the same tensor.
        self._prompts: LruCache[torch.Tensor] = LruCache(max_items=cfg.prompt_cache_size)
        # The image conditions of recent portraits (`condition_cache_bytes`), by a hash of the
        # pixels, the clip size and frame count: an avatar's or an API caller's repeated portrait
        # skips the VAE encode. Kept packed (host memory, read-only): a hit is also no copy off
        # the device.
        self._conditions: LruCache[WireTensor] = LruCache(max_bytes=cfg.condition_cache_bytes)
        self.metrics = StageMetrics("encoder")
        self.model = ModelLock(self.metrics.observe_wait, name="encoder")
        for shape in cfg.warmup:
            self.encode(VideoParams(prompt="warm-up", width=shape.width, height=shape.height,
                                    num_frames=shape.num_frames, seed=0, num_inference_steps=1,
                                    guidance_scale=1.0, guidance_scale_2=1.0),
                        np.zeros((shape.height, shape.width, 3), np.uint8))
        self.startup_s = time.perf_counter() - started
        self.metrics.started(self.startup_s)
        log_memory(log, "encoder", self.device)

    # ------------------------------------------------------------------ text

    def encode_text(self, prompt: str) -> torch.Tensor:
        """prompt -> (1, L, D) in the text encoder's dtype, zeroed past the prompt's tokens: a
        tensor of the caller's own, from the cache when the prompt was seen lately."""
        text = prompt_clean(prompt)
        cached = self._prompts.get(text)
        if cached is not None:
            return cached.clone()
        hidden = self._encode_text(text)
        if self._prompts.enabled:
            self._prompts.put(text, hidden.clone())
        return hidden

    @property
    def prompt_cache_hits(self) -> int:
        return self._prompts.hits

    @torch.no_grad()
    def _encode_text(self, text: str) -> torch.Tensor:
        length = self.cfg.max_sequence_length
        tokens = self.tokenizer([text], padding="max_length", max_length=length,
                                truncation=True, add_special_tokens=True,
                                return_attention_mask=True, return_tensors="pt")
        ids, mask = tokens.input_ids.to(self.device), tokens.attention_mask.to(self.device)
        hidden = self.text_encoder(ids, mask).last_hidden_state.to(self.text_dtype)
        n = int(mask.gt(0).sum())
        hidden[:, n:] = 0
        return hidden

    # ------------------------------------------------------------------ image

    def preprocess(self, image: np.ndarray | PIL.Image.Image, width: int, height: int) -> torch.Tensor:
        """uint8 (H, W, 3) or PIL -> (1, 3, height, width) fp32 in [-1, 1]: centre-cropped to the
        clip's aspect, then resized, never stretched (Wan keeps the image's aspect too)."""
        if isinstance(image, np.ndarray):
            image = PIL.Image.fromarray(np.asarray(image, dtype=np.uint8)).convert("RGB")
        return self.video_processor.preprocess(
            image, height=height, width=width, crops_coords=centre_crop(image.width, image.height, width, height)
        ).to(self.device, dtype=torch.float32)

    @torch.no_grad()
    def encode_image(self, image: np.ndarray | PIL.Image.Image, width: int, height: int,
                     num_frames: int) -> torch.Tensor:
        """-> condition (1, 4 + z, T, h, w) fp32: first-frame mask + normalised VAE latents.

        The image followed by `num_frames - 1` black frames is VAE-encoded (mode of the latent
        distribution, no sampling), as Wan2.2 I2V was trained.
        """
        pixels = self.preprocess(image, width, height).unsqueeze(2)  # (1, 3, 1, H, W)
        video = torch.cat([pixels, pixels.new_zeros(1, 3, num_frames - 1, height, width)], dim=2)
        latents = self.vae.encode(video.to(self.vae_dtype)).latent_dist.mode().to(torch.float32)
        latents = (latents - self.latents_mean) * self.latents_inv_std
        _, _, t, h, w = latents.shape
        mask = first_frame_mask(num_frames, t, h, w, self.temporal).to(latents.device)
        return torch.cat([mask, latents], dim=1)

    def image_condition(self, image: np.ndarray, width: int, height: int, num_frames: int) -> WireTensor:
        """`encode_image`, packed, from the cache when this portrait was encoded at this size and
        frame count lately: the very array encoding it again gives (read-only, shared)."""
        pixels = np.ascontiguousarray(image)
        key = (hashlib.sha256(pixels.data).hexdigest(), pixels.shape, str(pixels.dtype), width, height, num_frames)
        cached = self._conditions.get(key)
        if cached is not None:
            return cached
        wire = pack(self.encode_image(pixels, width, height, num_frames))
        wire.data.setflags(write=False)  # shared by every request that repeats the portrait
        self._conditions.put(key, wire, wire.data.nbytes)
        return wire

    # ------------------------------------------------------------------ stage entry point

    def latent_shape(self, params: VideoParams) -> tuple[int, ...]:
        t = (params.num_frames - 1) // self.temporal + 1
        return (1, self.vae.config.z_dim, t, params.height // self.spatial, params.width // self.spatial)

    def encode(self, params: VideoParams, image: np.ndarray) -> Conditioning:
        """VideoParams + uint8 image (H, W, 3) -> Conditioning (numpy payload)."""
        with self.metrics.timed("encode"):
            cond = self.model.run(self._encode, params, image)
        log.info("%s: encoded prompt and first frame", params.request_id)
        return cond

    def _encode(self, params: VideoParams, image: np.ndarray) -> Conditioning:
        context = self.encode_text(params.prompt)
        # Wan2.2's image2video.py: an empty negative prompt means the model's default one.
        negative_prompt = params.negative_prompt or self.cfg.default_negative_prompt
        negative = self.encode_text(negative_prompt) if params.needs_negative else None
        condition = self.image_condition(image, params.width, params.height, params.num_frames)
        return Conditioning(params=params, prompt_embeds=pack(context),
                            negative_prompt_embeds=None if negative is None else pack(negative),
                            condition=condition, latent_shape=self.latent_shape(params))

    def check_health(self) -> None:
        check_resident("encoder", self.text_encoder, self.vae)

    def info(self) -> dict:
        return {**placement_info(self.device), "startup_s": self.startup_s,
                "prompt_cache": {"prompts": len(self._prompts), "hits": self._prompts.hits},
                "condition_cache": self._conditions.stats()}
