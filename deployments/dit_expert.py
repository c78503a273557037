"""DitExpert stage: one Wan2.2 expert (high-noise or low-noise) and the denoise steps it owns.

One class, two deployments. The high-noise expert draws the initial noise from the request seed
and sets the sampler's timesteps; each expert runs the consecutive steps that belong to its role
(`sampler.expert_for_step`) and hands the latents plus the full sampler state to the next stage.

    per step: cat(latents (1, 16, T, h, w), condition (1, 20, T, h, w)) -> (1, 36, T, h, w)
              -> transformer -> flow prediction (1, 16, T, h, w) -> scheduler.step

Concurrency: one denoise step at a time per replica, on its one model thread (`self.model`, a
ModelLock; the warm-up ran there too, so no request meets a thread that is new to the model), so
concurrent jobs interleave step by step: each keeps its own latents and sampler, compiled graphs
and activations are never entered twice, and peak memory is one forward's. A job waiting for the
expert stays cancellable; a LoRA change takes the same lock and is refused while a job runs.

Per-request LoRAs (a request's `params.loras`, files of `lora_dirs` by name): read into this
expert's library on first use (lora_library.py) and added unmerged for that request's steps only
(lora_runtime.py), on top of the start-up and admin LoRAs; refused on a compiled expert.

Start-up LoRAs (`cfg.loras`, e.g. the lightx2v distill LoRA of each expert in the 4-step GGUF
profiles) are applied once, after the weights load and before warm-up, and stay for the life of
the replica (deployments/models/wan/lora.py and the lora_*.py modules beside it).
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch

from deployments.common.errors import LoraBusyError, LoraError
from deployments.common.metrics import StageMetrics
from deployments.common.payloads import Conditioning, DenoiseState, StepRecord
from deployments.common.runtime import (
    ModelLock,
    apply_threads,
    check_resident,
    dtype_for,
    log_memory,
    placement_info,
    release_cached_memory,
    resolve_device,
)
from deployments.common.transport import pack, unpack
from deployments.config import ExpertConfig, SamplerConfig
from deployments.models.wan import fp8_attention
from deployments.models.wan.components import latent_shape, load_expert
from deployments.models.wan.sampler import (
    expert_for_step,
    export_state,
    import_state,
    make_scheduler,
    set_timesteps,
)

log = logging.getLogger("avatar_serve.dit_expert")  # each line names the expert: high or low

# The text context a request brings is padded to the encoder's max_sequence_length (512 for Wan).
WARMUP_TEXT_LENGTH = 512
WARMUP_FORWARDS = 2  # per warm-up shape (see DitExpert.warm_up)


@dataclass
class _Run:
    """A denoise run in progress inside one expert (tensors on the expert's device)."""

    state: DenoiseState
    scheduler: object
    latents: torch.Tensor
    condition: torch.Tensor
    context: torch.Tensor
    negative: torch.Tensor | None
    guidance: float
    records: list
    index: int
    loras: list = field(default_factory=list)  # (RuntimeLora, strength): this request's LoRAs here


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
    def __init__(self, cfg: ExpertConfig, sampler: SamplerConfig, role: str, weights_dir: str | None = None,
                 lora_dirs: list[str] | tuple = ()):
        """`role`: "high" or "low", the expert's slot in the graph (stages.high / stages.low) and
        its one name in metrics, logs and its model thread. `lora_dirs`: where the LoRAs a request
        names are (serving.lora_dirs)."""
        started = time.perf_counter()
        self.cfg = cfg
        apply_threads(cfg.placement.threads)
        if role not in ("high", "low"):
            raise ValueError(f"an expert's role is 'high' or 'low', got {role!r}")
        self.role, self.weights_dir = role, weights_dir
        self.lora_dirs = list(lora_dirs)
        self._library = None
        self._lora_runtime = None
        self.sampler_cfg = sampler
        self.device = resolve_device(cfg.device)
        self.dtype = compute_dtype(cfg, self.device)
        # Start-up LoRAs are fused into the full-precision weights, so then the expert is
        # quantised only after they are in (a higher peak while loading).
        self.transformer = load_expert(cfg.weights, role, self.dtype, self.device,
                                       weights_dir, quantize="none" if cfg.loras else cfg.quantize)
        self._loras = None
        # The profile's start-up LoRAs: every one read and checked, then their full deltas added
        # to the weights (before fp8 quantisation of ours, so the sum is what gets quantised).
        startup = self._prepare_startup_loras()
        if cfg.quantize == "fp8":
            from deployments.models.wan.fp8 import to_fp8

            to_fp8(self.transformer)
        for prepared in startup:  # their low-rank pairs: unfused adapters, always active
            self.loras.load_permanent(prepared)
        del startup
        release_cached_memory(self.device)  # what loading and quantising freed
        if cfg.attention_backend in fp8_attention.BACKENDS:
            fp8_attention.use_fp8_self_attention(self.transformer, self.device, cfg.attention_backend)
        elif cfg.attention_backend:
            self.transformer.set_attention_backend(cfg.attention_backend)
        if cfg.compile:
            self.transformer.compile_repeated_blocks(fullgraph=True)
        self.steps_run = 0  # denoise steps executed since start (tests, metrics)
        self.metrics = StageMetrics(role)
        self.model = ModelLock(self.metrics.observe_wait, name=role)
        self.active_runs = 0  # denoise runs in progress (LoRA changes wait for none)
        for shape in cfg.warmup:
            self.warm_up(shape.width, shape.height, shape.num_frames)
        self.startup_s = time.perf_counter() - started
        self.metrics.started(self.startup_s)
        log_memory(log, self.role, self.device)

    def _prepare_startup_loras(self) -> list:
        """`cfg.loras` read and checked against this expert (all of them before any is applied:
        a LoraError names what a file carries that cannot be applied), then their deltas fused.
        Returns the prepared LoRAs, whose adapters `load_permanent` loads."""
        if not self.cfg.loras:
            return []
        from deployments.models.hub import resolve_file
        from deployments.models.wan.lora_fuse import describe, fuse_deltas
        from deployments.models.wan.lora_match import prepare_lora

        prepared = [prepare_lora(self.transformer, lora.adapter_name,
                                 resolve_file(lora.repo, lora.filename, self.weights_dir),
                                 lora.strength, self.role, lora.skip_absent)
                    for lora in self.cfg.loras]
        for p in prepared:
            stats = fuse_deltas(self.transformer, p)
            (log.warning if p.skipped_allowed else log.info)("%s: %s", self.role, describe(p, stats))
            p.deltas = {}  # fused: free the file's tensors
        return prepared

    @torch.no_grad()
    def warm_up(self, width: int, height: int, num_frames: int) -> None:
        """Forwards at a request's shape on the model thread, so that compiling and autotuning
        happen now (at start-up, before the replica reports ready), not in a user's first request.

        Two of them: on an H200 the forward after a single compiled warm-up forward still took
        3.06 s against 2.22 s for the next (`bench/thread_state.py --expert`), and the first
        served request paid about that in each expert."""
        x, context = self.warmup_inputs(width, height, num_frames)
        for _ in range(WARMUP_FORWARDS):
            self.model.run(self._forward_synchronised, x, context)

    def warmup_inputs(self, width: int, height: int, num_frames: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Zero latents + condition and a full-length text context at a request's shape."""
        shape = latent_shape(width, height, num_frames)
        config = self.transformer.config
        x = torch.zeros(1, config.in_channels, *shape[2:], device=self.device, dtype=self.dtype)
        context = torch.zeros(1, WARMUP_TEXT_LENGTH, config.text_dim, device=self.device, dtype=self.dtype)
        return x, context

    def _forward_synchronised(self, x: torch.Tensor, context: torch.Tensor) -> None:
        self.transformer(hidden_states=x, timestep=torch.full((1,), 999.0, device=self.device),
                         encoder_hidden_states=context, return_dict=False)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def start(self, cond: Conditioning) -> DenoiseState:
        """Initial state: seeded noise and a scheduler with its timesteps set."""
        scheduler = make_scheduler(self.sampler_cfg, cond.params.width, cond.params.height)
        set_timesteps(scheduler, self.sampler_cfg, cond.params.num_inference_steps, self.device)
        latents = initial_noise(cond.latent_shape, cond.params.seed, self.device)
        return DenoiseState(params=cond.params, latents=pack(latents), sampler=export_state(scheduler),
                            next_step=0, total_steps=len(scheduler.timesteps))

    @contextmanager
    def _running(self):
        self.active_runs += 1
        try:
            yield
        finally:
            self.active_runs -= 1

    def _begin(self, cond: Conditioning, state: DenoiseState | None) -> "_Run":
        if state is None:
            state = self.start(cond)
        guidance = cond.params.guidance_for(self.role)
        cfg = cond.params.cfg_for(self.role)
        if cfg and cond.negative_prompt_embeds is None:
            raise ValueError("guidance > 1 needs negative prompt embeddings from the encoder")
        return _Run(
            state=state, scheduler=import_state(state.sampler, self.device),
            latents=unpack(state.latents, self.device),
            condition=unpack(cond.condition, self.device).to(self.dtype),
            context=cast_context(unpack(cond.prompt_embeds, self.device), self.dtype),
            negative=cast_context(unpack(cond.negative_prompt_embeds, self.device), self.dtype) if cfg else None,
            guidance=guidance, records=list(state.steps), index=state.next_step)

    def _request_loras(self, params) -> list:
        """This request's LoRAs on this expert, from the library (read on first use; LoraError or
        LoraNotFound for one that cannot serve here). Runs on the model thread: reading a file
        checks it against the modules, which admin changes replace there."""
        wanted = params.loras_for(self.role)
        if not wanted:
            return []
        if self.cfg.compile:
            raise LoraError(f"per-request LoRAs are off on the compiled {self.role} expert "
                            f"(stages.{self.role}.compile): they would recompile its blocks")
        if self._library is None:
            from deployments.models.wan.lora_library import LoraLibrary
            from deployments.models.wan.lora_runtime import LoraRuntime

            self._library = LoraLibrary(self.transformer, self.role, self.lora_dirs,
                                        self.cfg.lora_cache_bytes, self.device, self.dtype)
            self._lora_runtime = LoraRuntime(self.transformer)
        return [(self._library.get(name), strength) for name, strength in wanted]

    def _owns_next(self, run: "_Run") -> bool:
        if run.index >= run.state.total_steps:
            return False
        t = run.scheduler.timesteps[run.index]
        return expert_for_step(self.sampler_cfg, run.index, t, run.scheduler.config.num_train_timesteps) == self.role

    @torch.no_grad()
    def _step(self, run: "_Run") -> StepRecord:
        """One denoise step (with CFG when this expert's guidance > 1), in place on `run`."""
        started = time.perf_counter()
        t = run.scheduler.timesteps[run.index]
        model_input = torch.cat([run.latents, run.condition], dim=1).to(self.dtype)
        timestep = t.expand(run.latents.shape[0])
        with self._lora_runtime.applied(run.loras) if run.loras else nullcontext():
            flow = self.transformer(hidden_states=model_input, timestep=timestep,
                                    encoder_hidden_states=run.context, return_dict=False)[0]
            if run.negative is not None:
                uncond = self.transformer(hidden_states=model_input, timestep=timestep,
                                          encoder_hidden_states=run.negative, return_dict=False)[0]
                flow = uncond + run.guidance * (flow - uncond)
        run.latents = run.scheduler.step(flow, t, run.latents, return_dict=False)[0]
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        remaining = self.cfg.simulate_step_seconds - (time.perf_counter() - started)
        if remaining > 0:
            time.sleep(remaining)
        record = StepRecord(index=run.index, timestep=float(t), expert=self.role, cfg=run.negative is not None)
        run.records.append(record)
        run.index += 1
        self.steps_run += 1
        self.metrics.observe_step(time.perf_counter() - started)
        return record

    def _finish(self, run: "_Run") -> DenoiseState:
        return run.state.advanced(latents=pack(run.latents), sampler=export_state(run.scheduler),
                                  next_step=run.index, steps=tuple(run.records))

    def denoise(self, cond: Conditioning, state: DenoiseState | None = None) -> DenoiseState:
        """`denoise_stream` run to its end in the caller's thread (tests, scripts): this expert's
        steps from `state` (None: start a new generation); steps of the other expert are left."""

        async def last():
            async for item in self.denoise_stream(cond, state):
                pass
            return item

        return asyncio.run(last())

    async def denoise_stream(self, cond: Conditioning, state: DenoiseState | None = None):
        """As `denoise`, streamed: yields a StepRecord after each step, then the DenoiseState.

        Each step runs in a worker thread and the generator awaits between steps, so a cancelled
        request (client gone, job cancelled, deadline passed) stops before the next step.
        """
        with self.metrics.timed("denoise"), self._running():
            run = self._begin(cond, state)
            run.loras = await self.model.arun(self._request_loras, cond.params)
            while self._owns_next(run):
                record = await self.model.arun(self._step, run)
                yield record
            log.info("%s: %s ran steps up to %d of %d", cond.params.request_id, self.role,
                     run.index, run.state.total_steps)
            yield self._finish(run)

    # ------------------------------------------------------------------ LoRA (admin)

    @property
    def loras(self):
        if self._loras is None:
            from deployments.models.wan.lora import LoraManager  # peft is loaded only when LoRAs are used

            self._loras = LoraManager(self.transformer, self.role)
        return self._loras

    def _lora_change(self, change) -> dict:
        def locked():
            if self.active_runs:
                raise LoraBusyError(f"expert {self.role} is running {self.active_runs} job(s); "
                                    "LoRAs change between jobs, retry shortly")
            change()  # LoraError (bad target, no matching keys, ...) leaves the model untouched

        self.model.run(locked)
        return self.list_loras()

    def load_lora(self, name: str, path: str, strength: float = 1.0, target: str = "both") -> dict:
        """Load and activate a LoRA file on this expert if `target` names it ("high", "low",
        "both"); refused (model untouched) when its keys match nothing here or it carries deltas
        an unfused adapter cannot hold. The profile's start-up LoRAs (`cfg.loras`) stay active
        whatever these calls do."""
        return self._lora_change(lambda: self.loras.load(name, path, strength, target))

    def activate_loras(self, names: list[str], strengths: list[float] | None = None) -> dict:
        return self._lora_change(lambda: self.loras.activate(names, strengths))

    def remove_lora(self, name: str) -> dict:
        return self._lora_change(lambda: self.loras.remove(name))

    def list_loras(self) -> dict:
        if self._loras is None:
            return {"role": self.role, "active": [], "loaded": []}
        return {"role": self.role, "active": self._loras.active(), "loaded": self._loras.loaded()}

    def check_health(self) -> None:
        check_resident(self.role, self.transformer)

    def info(self) -> dict:
        return {**placement_info(self.device), "role": self.role, "steps_run": self.steps_run,
                "startup_s": self.startup_s}
