"""DitExpert stage: one Wan2.2 expert (high-noise or low-noise) and the denoise steps it owns.

One class, two deployments. The high-noise expert draws the initial noise from the request seed
and sets the sampler's timesteps; each expert runs the consecutive steps that belong to its role
(`sampler.expert_for_step`) and hands the latents plus the full sampler state to the next stage.

    per step: cat(latents (1, 16, T, h, w), condition (1, 20, T, h, w)) -> (1, 36, T, h, w)
              -> transformer -> flow prediction (1, 16, T, h, w) -> scheduler.step
"""

from __future__ import annotations

from typing import Callable

import torch

from deployments.components import load_expert
from deployments.config import ExpertConfig, SamplerConfig
from deployments.payloads import Conditioning, DenoiseState, StepRecord
from deployments.runtime import check_resident, dtype_for, placement_info, resolve_device
from deployments.sampler import export_state, expert_for_step, import_state, make_scheduler, set_timesteps
from deployments.transport import pack, unpack

StepCallback = Callable[[StepRecord, int], None]


def compute_dtype(cfg: ExpertConfig, device: torch.device) -> torch.dtype:
    """Dtype policy: the DIT's compute dtype (bf16 or fp16 on a GPU, fp32 on a CPU)."""
    return dtype_for(device, cfg.compute_dtype, cfg.compute_dtype_cpu)


def cast_context(context: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Dtype policy: the text encoder's output (bf16) becomes the DIT's compute dtype here, at
    the stage boundary, not inside the encoder."""
    return context.to(dtype)


def initial_noise(shape: tuple[int, ...], seed: int, device) -> torch.Tensor:
    """The only random draw of a generation: fp32 Gaussian noise from a CPU generator, so a seed
    gives the same video on any device (what diffusers does with a CPU `torch.Generator`)."""
    generator = torch.Generator("cpu").manual_seed(seed)
    return torch.randn(shape, generator=generator, dtype=torch.float32).to(device)


class DitExpert:
    def __init__(self, cfg: ExpertConfig, sampler: SamplerConfig):
        self.cfg = cfg
        self.role = cfg.role
        self.sampler_cfg = sampler
        self.device = resolve_device(cfg.device)
        self.dtype = compute_dtype(cfg, self.device)
        self.transformer = load_expert(cfg.weights, cfg.role, self.dtype, self.device,
                                       cfg.weights_dir)
        if cfg.attention_backend:
            self.transformer.set_attention_backend(cfg.attention_backend)
        self.steps_run = 0  # denoise steps executed since start (tests, metrics)

    def guidance(self, params) -> float:
        return params.guidance_scale if self.role == "high" else params.guidance_scale_2

    def start(self, cond: Conditioning) -> DenoiseState:
        """Initial state: seeded noise and a scheduler with its timesteps set."""
        scheduler = make_scheduler(self.sampler_cfg)
        set_timesteps(scheduler, self.sampler_cfg, cond.params.num_inference_steps, self.device)
        latents = initial_noise(cond.latent_shape, cond.params.seed, self.device)
        return DenoiseState(params=cond.params, latents=pack(latents), sampler=export_state(scheduler),
                            next_step=0, total_steps=len(scheduler.timesteps))

    @torch.no_grad()
    def denoise(self, cond: Conditioning, state: DenoiseState | None = None,
                on_step: StepCallback | None = None) -> DenoiseState:
        """Run this expert's steps from `state` (None: start a new generation) and return the
        state after them. Steps belonging to the other expert are left for it."""
        if state is None:
            state = self.start(cond)
        scheduler = import_state(state.sampler, self.device)
        latents = unpack(state.latents, self.device)
        condition = unpack(cond.condition, self.device).to(self.dtype)
        context = cast_context(unpack(cond.prompt_embeds, self.device), self.dtype)
        guidance = self.guidance(cond.params)
        cfg = guidance > 1.0
        if cfg and cond.negative_prompt_embeds is None:
            raise ValueError("guidance > 1 needs negative prompt embeddings from the encoder")
        negative = cast_context(unpack(cond.negative_prompt_embeds, self.device), self.dtype) if cfg else None
        num_train = scheduler.config.num_train_timesteps

        records = list(state.steps)
        index = state.next_step
        while index < state.total_steps:
            t = scheduler.timesteps[index]
            if expert_for_step(self.sampler_cfg, index, t, num_train) != self.role:
                break
            model_input = torch.cat([latents, condition], dim=1).to(self.dtype)
            timestep = t.expand(latents.shape[0])
            flow = self.transformer(hidden_states=model_input, timestep=timestep,
                                    encoder_hidden_states=context, return_dict=False)[0]
            if cfg:
                uncond = self.transformer(hidden_states=model_input, timestep=timestep,
                                          encoder_hidden_states=negative, return_dict=False)[0]
                flow = uncond + guidance * (flow - uncond)
            latents = scheduler.step(flow, t, latents, return_dict=False)[0]
            record = StepRecord(index=index, timestep=float(t), expert=self.role, cfg=cfg)
            records.append(record)
            self.steps_run += 1
            index += 1
            if on_step is not None:
                on_step(record, state.total_steps)
        return state.advanced(latents=pack(latents), sampler=export_state(scheduler),
                              next_step=index, steps=tuple(records))

    def check_health(self) -> None:
        check_resident(f"dit-{self.role}", self.transformer)

    def info(self) -> dict:
        return {**placement_info(self.device), "role": self.role, "steps_run": self.steps_run}
