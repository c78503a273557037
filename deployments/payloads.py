"""Typed payloads passed between stages. Every array in them is a numpy `WireTensor`.

    Ingress --VideoParams--> Encoder --Conditioning--> DitExpert(high) --DenoiseState-->
    DitExpert(low) --DenoiseState--> Decoder --Frames / MP4 bytes--> Ingress
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from deployments.transport import WireTensor


@dataclass(frozen=True)
class VideoParams:
    """One generation, fully resolved: the ingress fills defaults and validates before any stage."""

    prompt: str
    width: int
    height: int
    num_frames: int
    seed: int
    num_inference_steps: int
    guidance_scale: float
    guidance_scale_2: float
    negative_prompt: str = ""
    fps: int = 16
    job_id: str = ""

    @property
    def needs_negative(self) -> bool:
        """Classifier-free guidance runs on an expert whose own scale is > 1.

        diffusers' one-process pipeline decides CFG for both experts from the first scale alone;
        here each expert follows its own scale (the two agree whenever both are > 1 or both <= 1).
        """
        return self.guidance_scale > 1.0 or self.guidance_scale_2 > 1.0


@dataclass(frozen=True)
class Conditioning:
    """Encoder output.

    prompt_embeds / negative_prompt_embeds: (1, L, D) in the text encoder's dtype (bf16 on GPU);
    the expert casts them to its compute dtype on arrival.
    condition: (1, 4 + z, T, h, w) fp32 -- first-frame mask (4) + normalised VAE latents (z=16).
    latent_shape: (1, z, T, h, w) of the noise the first expert draws from `params.seed`.
    """

    params: VideoParams
    prompt_embeds: WireTensor
    negative_prompt_embeds: WireTensor | None
    condition: WireTensor
    latent_shape: tuple[int, ...]


@dataclass(frozen=True)
class StepRecord:
    index: int
    timestep: float
    expert: str
    cfg: bool


@dataclass(frozen=True)
class SamplerState:
    """A diffusers scheduler in transit: its class, config and every attribute (tensors as wire).

    Multistep samplers (UniPC) keep a history of model outputs; without it the low-noise expert
    would drift from the one-process result (~7e-4, REFERENCE.md).
    """

    class_name: str
    config: dict
    attributes: dict
    cpu_attributes: tuple[str, ...] = ()


@dataclass(frozen=True)
class DenoiseState:
    """Latents between experts and after the last step.

    latents: (1, z, T, h, w) fp32. `next_step` is the index of the first step not yet run.
    """

    params: VideoParams
    latents: WireTensor
    sampler: SamplerState
    next_step: int
    total_steps: int
    steps: tuple[StepRecord, ...] = field(default_factory=tuple)

    @property
    def done(self) -> bool:
        return self.next_step >= self.total_steps

    def advanced(self, **changes) -> "DenoiseState":
        return replace(self, **changes)


@dataclass(frozen=True)
class Frames:
    """Decoder output: uint8 frames (F, H, W, 3) plus the frame rate they are meant for."""

    frames: np.ndarray
    fps: int

    @property
    def num_frames(self) -> int:
        return int(self.frames.shape[0])
