"""Typed payloads passed between stages. Every tensor in them is a numpy `WireTensor`; this
module needs numpy only (no torch), so the ingress and clients can import it.

    Ingress --VideoParams--> Encoder --Conditioning--> DitExpert(high) --DenoiseState-->
    DitExpert(low) --DenoiseState--> Decoder --Frames / MP4 bytes--> Ingress
    Decoder --Frames--> LipSync --AvatarInfo / MP4 bytes--> Ingress
    Ingress --Speech--> LipSync --fMP4 pieces--> Ingress               (a talk turn)
    Ingress --utterance so far--> LipSync --VideoChunk--> Ingress      (a live session's frames)
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np


@dataclass(frozen=True)
class WireTensor:
    """A tensor in transit: a numpy array plus the torch dtype it stands for."""

    data: np.ndarray
    dtype: str

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape)

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)


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
    # The job or avatar this generation is for (its public id): it tags every stage's log lines.
    request_id: str = ""
    # Per-request LoRAs: (name, strength on the high expert, strength on the low one), each name
    # once; 0 leaves that expert without it. The ingress checks names and strengths.
    loras: tuple[tuple[str, float, float], ...] = ()

    def __post_init__(self):  # lists from JSON (a re-queued job's saved inputs) -> tuples
        object.__setattr__(self, "loras", tuple((str(n), float(h), float(lo)) for n, h, lo in self.loras))

    def loras_for(self, role: str) -> list[tuple[str, float]]:
        """(name, strength) of the LoRAs this request runs on expert `role` (strength != 0)."""
        index = 1 if role == "high" else 2
        return [(lora[0], lora[index]) for lora in self.loras if lora[index] != 0]

    def guidance_for(self, role: str) -> float:
        """The guidance scale of the expert `role`: `guidance_scale` for the high-noise expert,
        `guidance_scale_2` for the low-noise one."""
        return self.guidance_scale if role == "high" else self.guidance_scale_2

    def cfg_for(self, role: str) -> bool:
        """Classifier-free guidance runs on an expert whose own scale is > 1.

        diffusers' one-process pipeline decides CFG for both experts from the first scale alone;
        here each expert follows its own scale (the two agree whenever both are > 1 or both <= 1).
        """
        return self.guidance_for(role) > 1.0

    @property
    def needs_negative(self) -> bool:
        """Whether the encoder must embed the negative prompt (some expert runs CFG)."""
        return self.cfg_for("high") or self.cfg_for("low")


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
    would drift from the one-process result (by about 7e-4; tests/models/test_sampler.py checks
    that the exported state continues exactly and that a scheduler without the history drifts).
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


@dataclass(frozen=True)
class VideoChunk:
    """Encoded frames for a live session: H.264 access units (Annex-B bytes, one per frame), a
    closed GOP from an IDR that carries the stream's parameter sets in-band, so a chunk may follow
    any other chunk of the same avatar and be cut after any frame. A few tens of kB per frame at
    most, so it crosses handles cheaply (the frames themselves stay on the lip-sync stage)."""

    units: tuple[bytes, ...]
    width: int
    height: int
    fps: int

    @property
    def num_frames(self) -> int:
        return len(self.units)


@dataclass(frozen=True)
class AvatarInfo:
    """LipSync's answer to an avatar preparation: the stage's id for the prepared avatar (its
    content hash, `prepared_id`: not the ingress's public avatar id) and its shape (the arrays
    stay on the stage). Small, so it crosses handles cheaply."""

    prepared_id: str
    num_source_frames: int
    num_frames: int  # after retiming to `fps`
    fps: int
    height: int
    width: int


@dataclass(frozen=True)
class Speech:
    """Speech admitted by `deployments.media.audio.admit_speech`: float32 PCM (S,) at 16 kHz
    mono, finite, of sane magnitude, within the length limits. Audio is checked once, where it
    enters (the ingress, or the lip-sync stage for a caller that hands it raw PCM or a file); a
    Speech travels on as checked."""

    pcm: np.ndarray

    @property
    def num_samples(self) -> int:
        return int(self.pcm.shape[0])
