"""Configuration: one root `GraphConfig` holding one sub-config per stage and the serving settings.

A profile is a YAML file in `configs/` validated into `GraphConfig` once at start-up
(deployments/profiles.py); every stage receives its own sub-config as a constructor argument and
never reads files or the environment.

This module holds the root, the stages' configs (placement, warm-up, dtypes, speed options) and the
sampler; the weights sources are in deployments/config_weights.py, the ingress's request defaults,
limits and serving settings in deployments/config_serving.py. Every field has a `description`,
so the JSON schema (`GraphConfig.model_json_schema()`) documents it.

The defaults below are one coherent set: the embedded `tiny` profile (random tiny models on the
CPU, 32x32 clips, 4 UniPC steps). A profile says only what differs, and may start from another
with `extends: NAME`; names starting with `_` are bases, not servable themselves
(`configs/_wan22-a14b.yaml` holds what every full-size profile shares).
"""

from __future__ import annotations

import os
from typing import ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from deployments.config_serving import GenerationDefaults, Limits, ServingConfig
from deployments.config_weights import RandomWeights, StartupLora, Strict, WeightsSource

DType = Literal["float32", "bfloat16", "float16"]


# ---------------------------------------------------------------- placement


class Autoscaling(Strict):
    """Ray Serve autoscaling of a deployment (its `autoscaling_config`): between `min_replicas`
    and `max_replicas`, aiming at `target_ongoing_requests` per replica."""

    min_replicas: int = Field(1, ge=0, description="Fewest replicas kept running (0: none while idle).")
    max_replicas: int = Field(1, ge=1, description="Most replicas; at least 1 and at least min_replicas.")
    target_ongoing_requests: float = Field(2.0, gt=0, description=(
        "Requests in progress per replica that Ray Serve scales towards."))
    upscale_delay_s: float = Field(5.0, ge=0, description=(
        "Seconds the load must call for more replicas before one is added."))
    downscale_delay_s: float = Field(60.0, ge=0, description=(
        "Seconds the load must call for fewer replicas before one is removed."))
    metrics_interval_s: float = Field(2.0, gt=0, description=(
        "How often, in seconds, replicas report their load."))
    look_back_period_s: float = Field(10.0, gt=0, description=(
        "Seconds of reported load averaged for each scaling decision."))

    @model_validator(mode="after")
    def _bounds(self) -> "Autoscaling":
        if self.max_replicas < max(1, self.min_replicas):
            raise ValueError("autoscaling.max_replicas must be >= min_replicas (and >= 1)")
        return self


class Placement(Strict):
    """Where and how many: maps onto `serve.deployment(...)` options in graph.py."""

    num_gpus: float = Field(0.0, ge=0, description=(
        "GPUs Ray reserves for each replica; fractions let replicas share a GPU. A `placement` "
        "preset of the profile sets it unless the stage does."))
    num_cpus: float = Field(0.1, ge=0, description=(
        "CPUs Ray reserves for each replica. Ray also sets the replica's OMP_NUM_THREADS from it; "
        "the stage's CPU work (tokenising, resizing, blending, H.264) runs on `threads` threads."))
    threads: int | None = Field(None, ge=1, le=256, description=(
        "torch's intra-op threads in the replica (and the H.264 encoder's threads in lip-sync); None: "
        "what Ray's OMP_NUM_THREADS gives, max(1, int(num_cpus))."))
    replicas: int = Field(1, ge=1, description="Replicas of the stage, when `autoscaling` is not set.")
    malloc_arena_max: int | None = Field(2, ge=1, description=(
        "glibc malloc arenas in the replica's process (MALLOC_ARENA_MAX in its environment from "
        "start). A replica runs requests on a pool of threads, and glibc gives each thread its own "
        "arena (up to 8 per core) that keeps freed memory; 2 holds about a third less memory at "
        "the same speed (bench/README.md). None leaves glibc's default."))
    max_ongoing_requests: int = Field(4, ge=1, description=(
        "Requests Ray Serve sends one replica at once; the stage runs its model work one request "
        "at a time while the rest wait (cancellable) or do CPU work."))
    accelerator_type: str | None = Field(None, description=(
        "Ray accelerator type the replica must run on (e.g. \"H100\"); None: any."))
    resources: dict[str, float] = Field(default_factory=dict, description=(
        "Ray custom resources a replica needs, e.g. {\"experts\": 1}: on a multi-node cluster, pins "
        "the stage to the nodes started with `ray start --resources '{\"experts\": 8}'` (README, "
        "Multi-node)."))
    autoscaling: Autoscaling | None = Field(None, description=(
        "Ray Serve autoscaling instead of a fixed `replicas` count (the full profiles use it for "
        "lip-sync); None: `replicas`."))

    @property
    def max_replicas(self) -> int:
        return self.autoscaling.max_replicas if self.autoscaling else self.replicas


class WarmupShape(Strict):
    """A request shape a stage runs once at start-up, before it reports ready (compiled graphs,
    cuDNN's algorithm choice and the allocator are then settled for real requests)."""

    width: int = Field(ge=16, description="Clip width in pixels.")
    height: int = Field(ge=16, description="Clip height in pixels.")
    num_frames: int = Field(1, ge=1, description="Frames of the clip.")


# ---------------------------------------------------------------- stages


class StageBase(Strict):
    weights: WeightsSource = Field(RandomWeights(), description=(
        "Where the stage's models come from, chosen by `kind`: random, diffusers, wan_safetensors, "
        "gguf or musetalk."))
    placement: Placement = Field(Placement(), description="Where the stage's replicas run, and how many.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description=(
        "`auto`: the first CUDA device the replica can see, else the CPU."))
    warmup: list[WarmupShape] = Field(default_factory=list, description=(
        "Shapes the encoder, experts and decoder run once at start-up, so no user request pays for "
        "compiling or autotuning; the replica reports ready only after them."))
    compile_cache_dir: str | None = Field(None, description=(
        "torch.compile's on-disk cache for the stage's replicas (TORCHINDUCTOR_CACHE_DIR in their "
        "environment): compiled graphs and kernels outlive a restart, so a replica that starts again "
        "on the same disk skips most of its compiling (bench/README.md). Several replicas may share "
        "it. Not set: `<serving.storage_dir>/compile-cache` (GraphConfig.compile_cache_dir); null: "
        "torch's default, a folder under /tmp that a new container does not have."))

    # The random architectures this stage's models come in.
    _random_archs: ClassVar[tuple[str, ...]] = ("tiny", "a14b")

    @model_validator(mode="after")
    def _random_arch_fits(self):
        if isinstance(self.weights, RandomWeights) and self.weights.arch not in self._random_archs:
            raise ValueError(f"random weights of arch {self.weights.arch!r} do not fit this stage; "
                             f"use one of {', '.join(self._random_archs)}")
        return self


class EncoderConfig(StageBase):
    """UMT5 text encoder + Wan VAE encode of the first frame."""

    text_encoder_dtype: DType = Field("bfloat16", description=(
        "The text encoder's dtype on a GPU: bf16 even where the experts compute in fp16, as Wan2.2's "
        "own code runs UMT5 (`t5_dtype` in its wan/configs/shared_config.py)."))
    text_encoder_dtype_cpu: DType = Field("float32", description="The text encoder's dtype on a CPU.")
    vae_dtype: DType = Field("float32", description=(
        "The dtype of the VAE that encodes the first frame, on any device."))
    channels_last: bool = Field(False, description=(
        "Channels-last 3-D convolution weights in the VAE on a GPU (no effect on a CPU): a faster "
        "encode, latents slightly different from the plain path (other cuDNN algorithms); measured "
        "in bench/README.md. As decoder.channels_last."))
    max_sequence_length: int = Field(512, ge=1, description=(
        "Tokens the text encoder reads from a prompt; longer prompts are cut."))
    prompt_cache_size: int = Field(16, ge=0, le=4096, description=(
        "How many recent prompts' embeddings the encoder keeps on its device (4 MiB each for "
        "umT5-XXL at 512 tokens); a repeated prompt skips the text encoder. 0: none."))
    condition_cache_bytes: int = Field(512 * 2**20, ge=0, description=(
        "Bytes of host memory the encoder keeps of recent portraits' image conditions (the VAE "
        "latents + first-frame mask: 10 MiB at 832x480x81, 23 MiB at 1280x720x81), keyed by the "
        "pixels' hash, size and frame count; a repeated portrait skips the VAE encode and gets the "
        "same condition. 0: none."))
    default_negative_prompt: str = Field("", max_length=20000, description=(
        "What an empty negative prompt is encoded as, when some expert runs CFG. Wan2.2's "
        "image2video.py replaces \"\" with its `sample_neg_prompt` (wan/configs/shared_config.py), "
        "which the full-size profiles set here; \"\" (the tiny profile) encodes the empty prompt."))


class ExpertConfig(StageBase):
    """One Wan2.2 expert: stages.high (the high-noise steps) or stages.low. The same class serves
    both; which one it is follows from the slot (the graph passes it to the stage as its role)."""

    compute_dtype: DType = Field("bfloat16", description="The expert's compute dtype on a GPU.")
    compute_dtype_cpu: DType = Field("float32", description="The expert's compute dtype on a CPU.")
    # A kernel choice is a config value, never an import side effect.
    attention_backend: str | None = Field(None, description=(
        "Attention backend for diffusers' dispatcher (`set_attention_backend`); None: its default, "
        "PyTorch's SDPA. 8-bit self-attention (deployments/models/wan/fp8_attention.py; Hopper GPUs "
        "or newer): `fa3_fp8`, FlashAttention-3's FP8 forward (package fa3-fwd), which the fp8 "
        "profiles set, or `cudnn_fp8`, cuDNN's (package nvidia-cudnn-frontend). Speed and error of "
        "each: bench/README.md."))
    quantize: Literal["none", "fp8"] = Field("none", description=(
        "`fp8`: quantise the block linears of bf16 weights at load (e4m3 with one scale per output "
        "channel, deployments/models/wan/fp8.py), halving weight memory. Files that are already fp8 "
        "load as fp8 whatever this says."))
    compile: bool = Field(False, description=(
        "torch.compile each transformer block (diffusers' compile_repeated_blocks): a compile on the "
        "first request of each shape (warm-up shapes compile before the replica is ready), then "
        "faster steps on a GPU (bench/README.md)."))
    loras: list[StartupLora] = Field(default_factory=list, description=(
        "LoRAs applied at start-up, after the weights load and before warm-up, for the life of the "
        "replica: e.g. the lightx2v distill LoRA of this expert on base weights."))
    lora_cache_bytes: int = Field(2 * 2**30, ge=0, description=(
        "Per-request LoRAs (README: Per-request LoRAs): the most bytes of LoRA factors this expert "
        "keeps on its device, least recently used dropped first; a LoRA is read from "
        "serving.lora_dirs on its first use and again after it was dropped. 0: per-request LoRAs off."))
    simulate_step_seconds: float = Field(0.0, ge=0, le=60, description=(
        "Testing and demos only: each denoising step takes at least this long, so a tiny model "
        "behaves like a slow GPU (cancellation, deadlines, queueing, progress). 0: off."))

    @model_validator(mode="after")
    def _lora_names_unique(self) -> "ExpertConfig":
        names = [lora.adapter_name for lora in self.loras]
        if len(names) != len(set(names)):
            raise ValueError("loras: two LoRAs share the name "
                             f"{next(n for n in names if names.count(n) > 1)!r}; give one a `name`")
        return self


class DecoderConfig(StageBase):
    """Wan VAE decode of the denoised latents to frames, and the MP4."""

    vae_dtype: DType = Field("bfloat16", description="The VAE's dtype on a GPU.")
    vae_dtype_cpu: DType = Field("float32", description="The VAE's dtype on a CPU.")
    channels_last: bool = Field(False, description=(
        "Channels-last 3-D convolution weights in the VAE on a GPU (no effect on a CPU): a faster "
        "decode, frames slightly different from the plain path (another cuDNN algorithm, bf16 "
        "rounding); measured in bench/README.md."))


class LipSyncConfig(StageBase):
    """MuseTalk lip-sync stage (whisper-tiny features, UNet, SD VAE); fp16 on a GPU.
    Fields are owned by deployments/lipsync.py (and deployments/models/musetalk/avatar.py and
    deployments/media/fmp4.py, which it drives).

    weights: `random` (tiny: tests; full: MuseTalk-size random models for speed) or `musetalk`.
    """

    _random_archs: ClassVar[tuple[str, ...]] = ("tiny", "full")

    dtype: DType = Field("float16", description="The models' dtype on a GPU.")
    dtype_cpu: DType = Field("float32", description="The models' dtype on a CPU.")
    fps: int = Field(25, ge=1, le=50, description=(
        "Output frame rate; MuseTalk was trained on 25 fps video with 50 whisper frames per second."))
    batch_size: int = Field(8, ge=1, le=256, description=(
        "Frames per UNet + VAE-decode batch, and per chunk a talk turn yields."))
    first_batch_size: int = Field(14, ge=1, le=256, description=(
        "Frames of a turn's first batch, smaller so that its first chunk comes sooner. The streamed "
        "MP4 cuts its first fragment when frame `mp4_keyframe_interval` (the second keyframe) leaves "
        "the muxer, which holds it until audio past it is in (AAC runs a frame behind): so "
        "mp4_keyframe_interval + 2 frames (14) is the smallest first batch whose bytes leave with "
        "it; a smaller one waits for the second batch, a larger one computes frames the first bytes "
        "do not need."))
    avatar_cache_dir: str | None = Field(None, description=(
        "Folder of prepared avatars (one .npz per content hash, written atomically), shared by the "
        "replicas that see it; None keeps them in memory only. Filled in as "
        "`<serving.storage_dir>/avatars` when the profile is loaded, so avatars outlive a restart as "
        "jobs do. Required with more than one replica."))
    max_avatars_in_memory: int = Field(4, ge=1, description=(
        "Prepared avatars kept in memory per replica, least recently used dropped first (reloaded "
        "from avatar_cache_dir when needed). Without a cache folder nothing is dropped: memory is "
        "then the only copy (about 100 MB per 81-frame 480p avatar)."))
    face_detector: Literal["center", "landmarks"] = Field("center", description=(
        "Face boxes when the caller gives none: `center` is the fixed box `center_box`; "
        "`landmarks` is MuseTalk's rule over an S3FD face box and 68 FAN landmarks (weights.s3fd and "
        "weights.fan; frames without a face fall back to `center_box`)."))
    # Other detectors plug in through deployments/models/musetalk/avatar.py FaceDetector.
    center_box: tuple[float, float, float, float] = Field((0.3, 0.15, 0.7, 0.75), description=(
        "The fixed face box (x1, y1, x2, y2), in fractions of the frame."))
    extra_margin: int = Field(10, ge=0, description=(
        "Pixels a detected face box is extended below the chin (clipped to the frame), as MuseTalk "
        "v1.5 does; boxes the caller gives are used as they are."))
    blend_upper_ratio: float = Field(0.5, ge=0, lt=1, description=(
        "Where the blend mask starts, as a fraction of the height from the top: of the face box (the "
        "256x256 crop) for `feathered`, of the parser's crop for `face_parsing` (cleared above it)."))
    blend_feather: float = Field(0.08, ge=0, le=0.25, description=(
        "`feathered` mask: its edges fade to zero at the box border over this fraction of the "
        "256x256 crop."))
    blend_mask: Literal["feathered", "face_parsing"] = Field("feathered", description=(
        "How the generated face is blended in: `feathered`, the lower face (see blend_upper_ratio) "
        "with feathered edges, needing no model; `face_parsing`, MuseTalk v1.5's mask, per frame "
        "from a BiSeNet face parser (weights.face_parser): its jaw region of the 1.5x square crop "
        "around the box, cut to the box, cleared above blend_upper_ratio, blurred "
        "(deployments/models/musetalk/blend_mask.py)."))
    channels_last: bool = Field(True, description=(
        "Channels-last convolutions on a GPU (no effect on a CPU): a little faster (bench/README.md)."))
    cudnn_benchmark: bool = Field(False, description=(
        "cuDNN autotuning on a GPU: faster for one stream, but it tunes again in every new thread, "
        "and concurrent turns ran 3x slower (bench/README.md): off."))
    compile: bool = Field(False, description=(
        "torch.compile the UNet and VAE decoder for batch_size, first_batch_size and live_batch_frames at start-up "
        "(minutes on a GPU), for more frames per second, most with concurrent turns (bench/README.md)."))
    simulate_batch_seconds: float = Field(0.0, ge=0, le=60, description=(
        "Testing and demos only: each batch of a talk turn takes at least this long, so a tiny model "
        "behaves like a busy GPU (autoscaling, admission, cancellation). 0: off."))
    mp4_keyframe_interval: int = Field(12, ge=1, description=(
        "H.264 keyframe interval of the streamed MP4 (deployments/media/fmp4.py), in frames: a "
        "fragment starts at each keyframe, so this bounds the time to the first fragment."))
    mp4_crf: int = Field(20, ge=0, le=51, description=(
        "H.264 constant rate factor of talk turns' MP4 (quality: lower is better)."))
    mp4_preset: Literal["ultrafast", "superfast", "veryfast", "faster", "fast", "medium"] = Field(
        "veryfast", description=(
            "x264's speed preset for talk turns (with `zerolatency`: no B-frames, no look-ahead)."))
    mp4_codec: Literal["libx264", "h264_nvenc"] = Field("libx264", description=(
        "`libx264` encodes H.264 on the CPU; `h264_nvenc` on the GPU's own video encoder (RGBA "
        "frames straight from the paste-back, no CPU colour conversion), on GPUs that have one "
        "(not the H100 or H200; bench/README.md)."))
    paste_back: Literal["auto", "device", "host"] = Field("auto", description=(
        "Where generated faces are pasted into the frames: `device` on the GPU "
        "(deployments/models/musetalk/paste.py), `host` on the CPU with PIL; `auto`: the GPU when "
        "the stage has one."))
    aac_sample_rate: int = Field(48000, description=(
        "Sample rate of the MP4's AAC audio, in Hz: at 48 kHz an AAC frame (1024 samples) lasts "
        "21 ms, so the audio stays within one video frame of the video."))
    live_batch_frames: int = Field(8, ge=1, le=64, description=(
        "Live sessions: most frames of one lip-sync call (a session renders as many frames as its "
        "audio allows at once, up to this). With `compile`, one more compiled batch size."))
    live_idle_cache_mb: int = Field(64, ge=1, description=(
        "Live sessions: encoded idle frames (the base clip's cycle, the same for every session on an "
        "avatar) kept per replica, least recently used dropped first, in MiB."))

    @model_validator(mode="after")
    def _replicas_share_avatars(self) -> "LipSyncConfig":
        # A talk turn may reach any replica; prepared avatars reach every replica through the
        # cache folder (a replica that has an avatar only in memory cannot lend it to another).
        if self.placement.max_replicas > 1 and self.avatar_cache_dir is None:
            raise ValueError("a lip-sync stage with more than one replica needs avatar_cache_dir: a folder "
                             "every replica reads, through which prepared avatars are shared")
        return self


INGRESS_PLACEMENT = {"num_gpus": 0, "num_cpus": 0.1, "max_ongoing_requests": 1024}


class IngressConfig(Strict):
    """The ingress replica: HTTP, the job queue and turn admission (no model)."""

    placement: Placement = Field(
        Placement(**INGRESS_PLACEMENT),
        description=("Where the ingress runs: always one replica. It admits work itself (job queue, "
                     "turn admission, serving.admission's caps), so it takes many requests at once: its "
                     "max_ongoing_requests must stay at least 64 (INGRESS_RESERVE) above what open event "
                     "streams, uploads in progress, talk turns and live sessions may hold, so they never "
                     "hold every slot and starve /healthz or /readyz (checked when the profile loads)."))

    @field_validator("placement", mode="before")
    @classmethod
    def _ingress_defaults(cls, value):
        """A placement given in part (e.g. only `resources`) keeps the ingress's own defaults for
        the rest, not a model stage's (whose max_ongoing_requests is 4)."""
        return {**INGRESS_PLACEMENT, **value} if isinstance(value, dict) else value


class Stages(Strict):
    """One config per stage of the graph."""

    encoder: EncoderConfig = Field(EncoderConfig(), description="The text and first-frame encoder.")
    high: ExpertConfig = Field(ExpertConfig(), description="The high-noise expert.")
    low: ExpertConfig = Field(ExpertConfig(), description="The low-noise expert.")
    decoder: DecoderConfig = Field(DecoderConfig(), description="The VAE decoder and MP4 muxer.")
    lipsync: LipSyncConfig = Field(LipSyncConfig(), description=(
        "The MuseTalk lip-sync stage (avatars, talk turns)."))
    ingress: IngressConfig = Field(IngressConfig(), description="The HTTP ingress.")

    @model_validator(mode="after")
    def _one_ingress(self) -> "Stages":
        if self.ingress.placement.replicas != 1:
            raise ValueError("stages.ingress.placement.replicas must be 1: one ingress owns the job store")
        return self


# ---------------------------------------------------------------- sampler


class SamplerConfig(Strict):
    """How the denoise loop is scheduled and split between the two experts."""

    scheduler: Literal["unipc", "euler"] = Field("unipc", description=(
        "`unipc`: UniPC multistep with flow prediction, Wan2.2's own sampler; `euler`: flow-matching "
        "Euler, for the distilled schedules (`sigmas`)."))
    flow_shift: float = Field(3.0, gt=0, description=(
        "Shift of the flow-matching schedule (of clips nearer 480p when flow_shift_720p is set)."))
    flow_shift_720p: float | None = Field(None, gt=0, description=(
        "Wan recommends a resolution-dependent shift for I2V: 3.0 at 480p, 5.0 at 720p. When set, "
        "the shift of clips nearer 720p's pixel count than 480p's; None: flow_shift at every size."))
    # The size rule: deployments/models/wan/sampler.py, flow_shift_for.
    num_inference_steps: int = Field(4, ge=1, description=(
        "Denoising steps of a request that gives none (with `sigmas`: every request's, their number)."))
    sigmas: list[float] | None = Field(None, description=(
        "An explicit sigma schedule before the shift (distilled models: [1.0, 0.75, 0.5, 0.25]), with "
        "scheduler `euler`; the number of steps is then fixed to its length. None: the scheduler's own."))
    guidance_scale: float = Field(3.5, ge=0, description=(
        "Classifier-free guidance scale of the high-noise expert for a request that gives none; "
        "an expert runs CFG only with a scale above 1."))
    guidance_scale_2: float = Field(3.0, ge=0, description=(
        "The same for the low-noise expert (a request that gives only guidance_scale uses it for both)."))
    boundary_ratio: float = Field(0.9, gt=0, le=1, description=(
        "Wan2.2's rule: the high-noise expert runs while t >= boundary_ratio x num_train_timesteps."))
    high_steps: int | None = Field(None, ge=0, description=(
        "Distilled profiles split by step index instead: the first `high_steps` steps are the "
        "high-noise expert's. None: boundary_ratio decides."))

    @model_validator(mode="after")
    def _check(self) -> "SamplerConfig":
        if self.sigmas is not None:
            if self.scheduler != "euler":
                raise ValueError("sampler.sigmas needs scheduler 'euler'")
            if len(self.sigmas) != self.num_inference_steps:
                raise ValueError("sampler.num_inference_steps must equal len(sampler.sigmas)")
        return self

    @property
    def fixed_steps(self) -> bool:
        return self.sigmas is not None


# ---------------------------------------------------------------- the root


class GraphConfig(Strict):
    """A profile: every stage's config, the sampler, and the ingress's defaults, limits and serving."""

    name: str = Field(description="The profile's name (its jobs and results are stored under it).")
    description: str = Field("", description="One line on what the profile is for.")
    weights_dir: str | None = Field(None, description=(
        "Where `avatar-serve download` put the files (a huggingface_hub cache folder); None: the "
        "default Hugging Face cache. Serving reads from here and never downloads."))
    placement: Literal["per-stage", "four-gpu", "two-gpu", "single-gpu"] | None = Field(None, description=(
        "A placement preset (PLACEMENTS in deployments/profiles.py): each stage's GPU share, applied "
        "under the stages' own placement settings; it also sets serving.max_running_jobs unless the "
        "profile does. None: each stage's placement as written (tiny: all on CPUs)."))
    stages: Stages = Field(Stages(), description="One config per stage.")
    sampler: SamplerConfig = Field(SamplerConfig(), description=(
        "The denoise loop and the split between the experts."))
    defaults: GenerationDefaults = Field(GenerationDefaults(), description=(
        "What a request gets for the fields it leaves out."))
    limits: Limits = Field(Limits(), description="Bounds the ingress checks before any stage is called.")
    serving: ServingConfig = Field(ServingConfig(), description="Jobs, storage, API keys and LoRA folders.")

    def stage_arguments(self, stage: str) -> dict:
        """What the graph gives stage `stage` besides its own sub-config: values that belong to the
        graph, not to the stage, passed as constructor arguments (graph.py and local.py alike):
        where the weights are, an expert's role (its slot) and the sampler, the audio limit that the
        ingress applies too."""
        args: dict = {"weights_dir": self.weights_dir} if stage in MODEL_STAGES else {}
        if stage in ("high", "low"):
            args.update(sampler=self.sampler, role=stage, lora_dirs=list(self.serving.lora_dirs))
        if stage == "lipsync":
            args["max_audio_seconds"] = self.limits.max_audio_seconds
        return args

    def compile_cache_dir(self, stage: str) -> str | None:
        """The stage's torch.compile cache folder: its own `compile_cache_dir` when the profile
        sets it (null: torch's default), else `<serving.storage_dir>/compile-cache`."""
        stage_cfg = getattr(self.stages, stage)
        if "compile_cache_dir" in stage_cfg.model_fields_set or not self.serving.storage_dir:
            return stage_cfg.compile_cache_dir
        return os.path.join(self.serving.storage_dir, "compile-cache")

    @model_validator(mode="after")
    def _ingress_reserve(self) -> "GraphConfig":
        """The ingress's slots (max_ongoing_requests) must exceed what the admission caps let long
        requests hold by INGRESS_RESERVE, so /healthz and short requests always find one."""
        held = self.serving.admission.held_at_most(self.max_talk_turns, self.max_live_sessions)
        slots = self.stages.ingress.placement.max_ongoing_requests
        if held is not None and held + INGRESS_RESERVE > slots:
            raise ValueError(
                f"stages.ingress.placement.max_ongoing_requests ({slots}) must be at least {INGRESS_RESERVE} above "
                f"what long requests may hold ({held}: serving.admission's max_event_streams + max_uploads, "
                "the talk turns and the live sessions), so /healthz and short requests always find a slot")
        return self

    @property
    def max_live_sessions(self) -> int:
        """Concurrent live sessions the ingress admits."""
        placement = self.stages.lipsync.placement
        return self.serving.live.max_sessions or placement.max_replicas * placement.max_ongoing_requests

    @property
    def max_talk_turns(self) -> int:
        """Concurrent talk turns the ingress admits."""
        placement = self.stages.lipsync.placement
        return self.serving.max_talk_turns or placement.max_replicas * placement.max_ongoing_requests


# Ingress slots kept for /healthz, /readyz and short requests beyond what the admission caps let
# long requests hold (see GraphConfig._ingress_reserve).
INGRESS_RESERVE = 64

MODEL_STAGES = ("encoder", "high", "low", "decoder", "lipsync")
