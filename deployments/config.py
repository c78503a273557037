"""Configuration: one root `GraphConfig` holding one sub-config per stage and the serving settings.

A profile is a YAML file in `configs/` validated into `GraphConfig` once at start-up (deployments/profiles.py); every stage
receives its own sub-config as a constructor argument and never reads files or the environment.

The defaults below are one coherent set: the embedded `tiny` profile (random tiny models on the
CPU, 32x32 clips, 4 UniPC steps). A profile says only what differs, and may start from another
with `extends: NAME`; names starting with `_` are bases, not servable themselves
(`configs/_wan22-a14b.yaml` holds what every full-size profile shares).
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal, Union

import re

from pydantic import BaseModel, ConfigDict, Field, model_validator

DType = Literal["float32", "bfloat16", "float16"]
# What an API key may hold: visible ASCII, no spaces or commas (commas separate keys in a variable).
KEY_CHARS = re.compile(r"[\x21-\x2b\x2d-\x7e]+")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# ---------------------------------------------------------------- weights sources


class RandomWeights(_Strict):
    """Random weights built in code (no files): `tiny` for tests and the demo; full size for speed
    measurements (speed does not depend on weight values): `a14b` for the Wan2.2 stages, `full`
    (MuseTalk's published sizes) for lip-sync."""

    kind: Literal["random"] = "random"
    arch: Literal["tiny", "a14b", "full"] = "tiny"
    seed: int = 0


class DiffusersWeights(_Strict):
    """A diffusers-format repository: a Hub repo id (read from the local cache / `weights_dir`,
    never downloaded while serving) or a local folder. `subfolder` overrides the component's
    usual folder (`text_encoder`, `vae`, `transformer`, `transformer_2`)."""

    kind: Literal["diffusers"] = "diffusers"
    path: str
    subfolder: str | None = None


# diffusers' folders of the two experts in a Wan2.2 repository (and of their configs).
EXPERT_SUBFOLDERS = {"high": "transformer", "low": "transformer_2"}


def expert_subfolder(role: str) -> str:
    """diffusers names the high-noise expert `transformer` and the low-noise one `transformer_2`."""
    try:
        return EXPERT_SUBFOLDERS[role]
    except KeyError:
        raise ValueError(f"expert role must be 'high' or 'low', got {role!r}") from None


class WanSafetensorsWeights(_Strict):
    """One expert as a single safetensors file with original Wan key names
    (`blocks.N.self_attn.q.weight`, ...): the lightx2v distilled bf16 files, or fp8 e4m3 files
    with a per-output-channel `X.weight_scale` next to each quantised `X.weight`.
    `config` names the diffusers repo/folder whose `transformer/config.json` describes it."""

    kind: Literal["wan_safetensors"] = "wan_safetensors"
    repo: str | None = None
    filename: str
    config: str


class GGUFWeights(_Strict):
    """One expert as a GGUF file (QuantStack layout, original Wan key names), loaded through
    diffusers' GGUF quantization with the diffusers config passed explicitly (`config`)."""

    kind: Literal["gguf"] = "gguf"
    repo: str | None = None
    filename: str
    config: str


class MuseTalkWeights(_Strict):
    """The MuseTalk lip-sync models in their published layout: the v1.5 UNet as a plain torch
    state dict (`unet`) plus its diffusers config (`unet_config`), both files of `repo` (a Hub
    repo id or a local folder), the SD VAE (`vae`) and whisper-tiny (`whisper`), each a Hub repo
    id or a local diffusers / transformers folder. Resolved through deployments.models.hub, never
    downloaded while serving."""

    kind: Literal["musetalk"] = "musetalk"
    repo: str = "TMElyralab/MuseTalk"
    unet: str = "musetalkV15/unet.pth"
    unet_config: str = "musetalkV15/musetalk.json"
    vae: str = "stabilityai/sd-vae-ft-mse"
    whisper: str = "openai/whisper-tiny"
    # BiSeNet face parser (`79999_iter.pth`) for `blend_mask: face_parsing`: a local file path, or a
    # path inside `repo` when that is a local folder. It is not on MuseTalk's Hub repo (MuseTalk's
    # own script fetches it elsewhere), so `avatar-serve download` cannot fetch it; None: not set.
    face_parser: str | None = None
    # Face detector and landmark models for `face_detector: landmarks` (local paths: face_alignment's
    # `s3fd-619a316812.pth` and `2DFAN4-11f355bf06.pth.tar`, not on MuseTalk's Hub repo either).
    s3fd: str | None = None
    fan: str | None = None


WeightsSource = Annotated[Union[RandomWeights, DiffusersWeights, WanSafetensorsWeights, GGUFWeights,
                                MuseTalkWeights],
                          Field(discriminator="kind")]


# ---------------------------------------------------------------- placement


class Autoscaling(_Strict):
    """Ray Serve autoscaling of a deployment (its `autoscaling_config`): between `min_replicas`
    and `max_replicas`, aiming at `target_ongoing_requests` per replica."""

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    target_ongoing_requests: float = Field(2.0, gt=0)
    upscale_delay_s: float = Field(5.0, ge=0)
    downscale_delay_s: float = Field(60.0, ge=0)
    metrics_interval_s: float = Field(2.0, gt=0)
    look_back_period_s: float = Field(10.0, gt=0)

    @model_validator(mode="after")
    def _bounds(self) -> "Autoscaling":
        if self.max_replicas < max(1, self.min_replicas):
            raise ValueError("autoscaling.max_replicas must be >= min_replicas (and >= 1)")
        return self


class Placement(_Strict):
    """Where and how many: maps onto `serve.deployment(...)` options in graph.py."""

    num_gpus: float = Field(0.0, ge=0)
    # CPUs Ray reserves for each replica. CPU work of a stage (tokenising, resizing, blending,
    # H.264) runs on `threads` threads; Ray also sets OMP_NUM_THREADS from num_cpus.
    num_cpus: float = Field(0.1, ge=0)
    # torch's intra-op threads in the replica (and the H.264 encoder's threads in lip-sync);
    # None: what Ray's OMP_NUM_THREADS gives (max(1, int(num_cpus))).
    threads: int | None = Field(None, ge=1, le=256)
    replicas: int = Field(1, ge=1)
    # glibc malloc arenas in the replica's process (MALLOC_ARENA_MAX, set in its environment at
    # start through Ray's runtime_env). A replica runs requests on a pool of threads, and glibc
    # gives each thread its own arena (up to 8 per core) that keeps freed memory: the tiny
    # lip-sync stage under 8 concurrent turns settles at 1430 MiB with glibc's default, 965 with 2,
    # equally fast (bench/host_memory.py). None leaves glibc's default.
    malloc_arena_max: int | None = Field(2, ge=1)
    # Ray Serve sends a replica at most this many requests at once; the stage's ModelLock then
    # runs its model work one at a time while the rest wait (cancellable) or do CPU work.
    max_ongoing_requests: int = Field(4, ge=1)
    accelerator_type: str | None = None
    # Ray custom resources a replica needs, e.g. {"experts": 1}: on a multi-node cluster, pins a
    # stage to the nodes started with `ray start --resources '{"experts": 8}'` (README, Multi-node).
    resources: dict[str, float] = Field(default_factory=dict)
    # Instead of a fixed `replicas` count (used for the lip-sync stage in the full profiles).
    autoscaling: Autoscaling | None = None

    @property
    def max_replicas(self) -> int:
        return self.autoscaling.max_replicas if self.autoscaling else self.replicas


class WarmupShape(_Strict):
    """A request shape a stage runs once at start-up, before it reports ready (compiled graphs,
    cuDNN's algorithm choice and the allocator are then settled for real requests)."""

    width: int = Field(ge=16)
    height: int = Field(ge=16)
    num_frames: int = Field(1, ge=1)


# ---------------------------------------------------------------- stages


class StageBase(_Strict):
    weights: WeightsSource = RandomWeights()
    placement: Placement = Placement()
    # "auto": the first CUDA device the replica can see, else CPU.
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # Copied from GraphConfig.weights_dir by `load_profile`.
    weights_dir: str | None = None
    # Shapes run once at start-up (Encoder, DitExpert, Decoder), so no user request pays for
    # compiling or autotuning; the replica reports ready only after them.
    warmup: list[WarmupShape] = Field(default_factory=list)
    # torch.compile's on-disk cache for this stage's replicas (TORCHINDUCTOR_CACHE_DIR in their
    # environment, set by graph.py): compiled graphs and kernels outlive a restart, so a replica
    # that starts again on the same disk skips most of its compile (one H200, the fp8 profile:
    # ready in 74 s with a warm cache against 250 s cold; bench/README.md). `load_profile`
    # defaults it to `<serving.storage_dir>/compile-cache`; None leaves torch's default, a folder
    # under /tmp that a new container does not have. Several replicas may share it.
    compile_cache_dir: str | None = None

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

    # The text encoder runs in bf16 on a GPU even where the DIT computes in fp16 (DESIGN.md);
    # CPUs may run it in fp32.
    text_encoder_dtype: DType = "bfloat16"
    text_encoder_dtype_cpu: DType = "float32"
    vae_dtype: DType = "float32"
    # Channels-last 3-D convolution weights on a GPU (no effect on a CPU), as `decoder.channels_last`.
    # Measured on H200s (random full-size VAE, 832x480x81, fp32): encode 1.72 s -> 1.54 s (1.16 s
    # in one run), the latents 0.1% from the plain path (other cuDNN algorithms; bench/README.md).
    channels_last: bool = False
    max_sequence_length: int = Field(512, ge=1)
    # How many recent prompts' embeddings the encoder keeps (on its device: 4 MiB each for
    # umT5-XXL at 512 tokens); a repeated prompt skips the text encoder. 0 = none.
    prompt_cache_size: int = Field(16, ge=0, le=4096)
    # What an empty negative prompt is encoded as, when some expert runs CFG. Wan2.2's
    # image2video.py replaces "" with its `sample_neg_prompt` (wan/configs/shared_config.py), which
    # the full-size profiles set here; "" (the tiny profile) encodes the empty prompt.
    default_negative_prompt: str = Field("", max_length=20000)


class StartupLora(_Strict):
    """A LoRA an expert applies at start-up and keeps for the life of the replica: part of the
    profile's recipe (the lightx2v 4-step distill LoRAs on base Wan2.2 experts), not an admin
    LoRA. `filename` is a file of `repo` (a Hub repo id, fetched by `avatar-serve download`, or a
    local folder); with `repo` None it is itself a local path.

    Applied after the weights load and before warm-up (deployments/models/wan/lora_match.py
    `prepare_lora`, lora_fuse.py `fuse_deltas`): low-rank pairs become an unfused adapter kept
    active at `strength`; full deltas (`diff` on a weight, `diff_b` on a bias, `diff_m` on a
    modulation, norm `diff`s) are added to the weights they name (times `strength`, as LightX2V
    does). Every tensor of the file is applied, or skipped and logged (`skip_absent` below), or
    start-up fails naming it; admin LoRA calls can neither deactivate nor remove it."""

    repo: str | None = None
    filename: str = Field(min_length=1)
    strength: float = Field(1.0, ge=-10, le=10)
    # The adapter's name in /v1/admin/loras listings; None: the file name without its extension.
    name: str | None = Field(None, min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    # fnmatch patterns of the file's keys that may name parts this expert does not have: those
    # are skipped (logged as a warning with their count) instead of stopping start-up. For Wan2.1's
    # image cross-attention (`*.k_img.*`, `*.v_img.*`, `*.norm_k_img.*`), which Wan2.2 I2V experts
    # lack and LightX2V skips too. A matching key that names a part the expert has is applied as
    # usual; all-zero tensors for absent parts are skipped without a pattern (they change nothing).
    skip_absent: list[str] = Field(default_factory=list)

    @property
    def adapter_name(self) -> str:
        """`name`, else the file's stem with characters outside [A-Za-z0-9_-] made `_` (peft's
        adapter names become module names, which may not contain dots)."""
        if self.name:
            return self.name
        stem = self.filename.replace("\\", "/").rsplit("/", 1)[-1].rsplit(".", 1)[0]
        return "".join(c if c.isascii() and (c.isalnum() or c in "_-") else "_" for c in stem)[:64] or "lora"


class ExpertConfig(StageBase):
    """One Wan2.2 expert; the same class serves the `high` and `low` roles."""

    role: Literal["high", "low"]
    compute_dtype: DType = "bfloat16"
    compute_dtype_cpu: DType = "float32"
    # Attention backend for diffusers' dispatcher (`set_attention_backend`); None keeps the default
    # (plain SDPA). A kernel choice is a config value, never an import side effect. 8-bit
    # self-attention (deployments/models/wan/fp8_attention.py; Hopper or newer): "fa3_fp8",
    # FlashAttention-3's FP8 forward (package fa3-fwd; the fp8 profiles set it: an H200 step 2.43 s
    # -> 1.89 s compiled), or "cudnn_fp8", cuDNN's (nvidia-cudnn-frontend; 2.01 s, the expert's
    # output 1.65% from bf16 attention; fa3_fp8's 1.4% from it; bench/README.md).
    attention_backend: str | None = None
    # "fp8": quantise the block linears of bf16 weights at load (rowwise e4m3, deployments/fp8.py),
    # halving weight memory; files that are already fp8 load as fp8 whatever this says.
    quantize: Literal["none", "fp8"] = "none"
    # torch.compile each transformer block (diffusers' compile_repeated_blocks): ~20 s of warm-up
    # on the first request of each shape, then faster steps on a GPU (bench/README.md).
    compile: bool = False
    # LoRAs applied at start-up, after the weights and before warm-up, for the life of the replica
    # (StartupLora): e.g. the lightx2v distill LoRA of this expert on base weights.
    loras: list[StartupLora] = Field(default_factory=list)
    # Testing and demos only: sleep so that each denoise step takes at least this long, to make a
    # tiny model behave like a slow GPU (cancellation, deadlines, queueing, progress). 0 = off.
    simulate_step_seconds: float = Field(0.0, ge=0, le=60)

    @model_validator(mode="after")
    def _lora_names_unique(self) -> "ExpertConfig":
        names = [lora.adapter_name for lora in self.loras]
        if len(names) != len(set(names)):
            raise ValueError(f"stages.{self.role}.loras: two LoRAs share the name "
                             f"{next(n for n in names if names.count(n) > 1)!r}; give one a `name`")
        return self


class DecoderConfig(StageBase):
    vae_dtype: DType = "bfloat16"
    vae_dtype_cpu: DType = "float32"
    # Channels-last 3-D convolution weights on a GPU (no effect on a CPU). Measured on an H200
    # (random full-size VAE, 832x480x81, bf16): decode 1.83 s -> 1.52 s; the frames differ from
    # the plain path by 2.2% relative (another cuDNN algorithm, bf16 rounding); cuDNN autotuning
    # alone gained nothing (bench/README.md, bench/gpu_paths.py).
    channels_last: bool = False


class LipSyncConfig(StageBase):
    """MuseTalk lip-sync stage (whisper-tiny features, UNet, SD VAE); fp16 on a GPU.
    Fields are owned by deployments/lipsync.py (and avatar.py / fmp4.py, which it drives).

    weights: `random` (tiny: tests; full: MuseTalk-size random models for speed) or `musetalk`.
    """

    _random_archs: ClassVar[tuple[str, ...]] = ("tiny", "full")

    @model_validator(mode="after")
    def _replicas_share_avatars(self) -> "LipSyncConfig":
        # A talk turn may reach any replica; prepared avatars reach every replica through the
        # cache folder (a replica that has an avatar only in memory cannot lend it to another).
        if self.placement.max_replicas > 1 and self.avatar_cache_dir is None:
            raise ValueError("a lip-sync stage with more than one replica needs avatar_cache_dir: a folder "
                             "every replica reads, through which prepared avatars are shared")
        return self

    dtype: DType = "float16"
    dtype_cpu: DType = "float32"
    # Output frame rate; MuseTalk was trained on 25 fps video with 50 whisper frames per second.
    fps: int = Field(25, ge=1, le=50)
    # Frames per UNet + VAE-decode batch, and per chunk `speak` yields; a turn's first batch is
    # smaller so its first chunk (time to first frame) comes sooner. The streamed MP4 cuts its
    # first fragment when frame `mp4_keyframe_interval` (the second keyframe) leaves the muxer,
    # which holds it until audio past it is in (AAC runs a frame behind): so a first batch of
    # mp4_keyframe_interval + 2 frames (14) is the smallest whose bytes leave with it; a smaller
    # one waits for the second batch, a larger one computes frames the first bytes do not need.
    batch_size: int = Field(8, ge=1, le=256)
    first_batch_size: int = Field(14, ge=1, le=256)
    # A talk turn's audio is refused beyond this (AudioError before any model runs). Copied from
    # `limits.max_audio_seconds` by `load_profile`: profiles set it there, once.
    max_audio_seconds: float = Field(30.0, gt=0)
    # Prepared avatars are stored here (one .npz per content hash, written atomically); None keeps
    # them in memory only. Several replicas on one host may share the folder. Profiles default it
    # to `<serving.storage_dir>/avatars`, so avatars outlive a restart as jobs do.
    avatar_cache_dir: str | None = None
    # Prepared avatars kept in memory per replica, least recently used dropped first (reloaded
    # from `avatar_cache_dir` when needed). Without a cache folder nothing is dropped: memory is
    # then the only copy (about 100 MB per 81-frame 480p avatar).
    max_avatars_in_memory: int = Field(4, ge=1)
    # Face boxes when the caller gives none: "center" is a fixed box, `center_box`, in fractions
    # of the frame (x1, y1, x2, y2); "landmarks" is MuseTalk's rule over an S3FD face box and 68
    # FAN landmarks (weights.s3fd / weights.fan; frames without a face fall back to `center_box`).
    # Other detectors plug in through avatar.FaceDetector.
    face_detector: Literal["center", "landmarks"] = "center"
    center_box: tuple[float, float, float, float] = (0.3, 0.15, 0.7, 0.75)
    # MuseTalk v1.5 extends a detected face box this many pixels below the chin (clipped to the
    # frame); boxes the caller gives are used as they are.
    extra_margin: int = Field(10, ge=0)
    # Fallback blend mask without a face parser (in the 256x256 crop): the lower face from
    # `blend_upper_ratio` of the box height down, its edges feathered over `blend_feather` of the
    # crop size so it fades to zero at the box border.
    blend_upper_ratio: float = Field(0.5, ge=0, lt=1)
    blend_feather: float = Field(0.08, ge=0, le=0.25)
    # "face_parsing": MuseTalk v1.5's mask instead, per frame from a BiSeNet face parser: its "jaw"
    # region of the 1.5x square crop around the box, cut to the box, cleared above the crop's
    # `blend_upper_ratio`, blurred (deployments/models/musetalk/blend_mask.py).
    blend_mask: Literal["feathered", "face_parsing"] = "feathered"
    # GPU speed settings (no effect on a CPU), measured in bench/README.md: channels-last
    # convolutions (+5% on an H100); cuDNN autotuning (faster for one stream, but it re-tunes in
    # every new thread and concurrent turns ran 3x slower: off); torch.compile of the UNet and VAE
    # decoder for the two batch sizes above, at start-up (about 2 minutes on an H100; then +23%
    # frames/s for one turn, nearly 2x for four concurrent turns).
    channels_last: bool = True
    cudnn_benchmark: bool = False
    compile: bool = False
    # Streaming MP4 (deployments/media/fmp4.py): H.264 keyframe interval in frames (a fragment starts at
    # each keyframe, so this bounds time to first fragment), CRF, and the AAC sample rate (48 kHz:
    # 1024-sample AAC frames of 21 ms keep the audio within one video frame of the video).
    # Testing and demos only: each batch of a talk turn takes at least this long (a tiny model then
    # behaves like a busy GPU: autoscaling, admission, cancellation). 0 = off.
    simulate_batch_seconds: float = Field(0.0, ge=0, le=60)
    mp4_keyframe_interval: int = Field(12, ge=1)
    mp4_crf: int = Field(20, ge=0, le=51)
    # x264's speed preset for talk turns (with `zerolatency`: no B-frames, no look-ahead).
    mp4_preset: Literal["ultrafast", "superfast", "veryfast", "faster", "fast", "medium"] = "veryfast"
    # "h264_nvenc": the GPU's own H.264 encoder (RGBA frames straight from the paste-back, no CPU
    # colour conversion); "libx264" encodes on the CPU. Measured in bench/README.md.
    mp4_codec: Literal["libx264", "h264_nvenc"] = "libx264"
    # Where generated faces are pasted into the frames: "auto" = on the GPU when the stage has one
    # (deployments/models/musetalk/paste.py), else on the CPU with PIL (avatar.blend_face).
    paste_back: Literal["auto", "device", "host"] = "auto"
    aac_sample_rate: int = 48000


class IngressConfig(_Strict):
    # The ingress is async and admits work itself (job queue, turn admission), so Serve's cap on
    # its requests is set high: open event streams, talk turns and slow uploads (bounded by
    # serving.body_timeout_s) then never hold every slot and starve /healthz or /readyz.
    placement: Placement = Placement(num_gpus=0, num_cpus=0.1, max_ongoing_requests=1024)


class Stages(_Strict):
    encoder: EncoderConfig = EncoderConfig()
    high: ExpertConfig = ExpertConfig(role="high")
    low: ExpertConfig = ExpertConfig(role="low")
    decoder: DecoderConfig = DecoderConfig()
    lipsync: LipSyncConfig = LipSyncConfig()
    ingress: IngressConfig = IngressConfig()

    @model_validator(mode="after")
    def _roles_match_slots(self) -> "Stages":
        if self.high.role != "high" or self.low.role != "low":
            raise ValueError("stages.high must have role 'high' and stages.low role 'low'")
        if self.ingress.placement.replicas != 1:
            raise ValueError("stages.ingress.placement.replicas must be 1: one ingress owns the job store")
        return self


# ---------------------------------------------------------------- sampler


class SamplerConfig(_Strict):
    """How the denoise loop is scheduled and split between the two experts."""

    scheduler: Literal["unipc", "euler"] = "unipc"
    flow_shift: float = Field(3.0, gt=0)
    # Wan recommends a resolution-dependent shift for I2V: 3.0 at 480p, 5.0 at 720p. When set, this
    # is the shift of clips nearer 720p's pixel count than 480p's (models/wan/sampler.flow_shift_for).
    flow_shift_720p: float | None = Field(None, gt=0)
    num_inference_steps: int = Field(4, ge=1)
    # Explicit sigma schedule before the shift (distilled models: [1.0, 0.75, 0.5, 0.25]).
    # When set, the number of steps is fixed to its length.
    sigmas: list[float] | None = None
    guidance_scale: float = Field(3.5, ge=0)
    guidance_scale_2: float = Field(3.0, ge=0)
    # Wan2.2 rule: the high-noise expert runs while t >= boundary_ratio * num_train_timesteps.
    boundary_ratio: float = Field(0.9, gt=0, le=1)
    # Distilled profiles split by step index instead: the first `high_steps` steps are high.
    high_steps: int | None = Field(None, ge=0)

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


# ---------------------------------------------------------------- requests and serving


class GenerationDefaults(_Strict):
    """Values a request gets when it leaves a field out."""

    width: int = 32
    height: int = 32
    num_frames: int = 9
    fps: int = 16
    negative_prompt: str = ""


class Limits(_Strict):
    """Per-profile bounds checked at the ingress before any stage is called."""

    max_width: int = 256
    max_height: int = 256
    max_pixels: int = 256 * 256
    max_frames: int = 33
    max_steps: int = 20
    max_prompt_chars: int = 2000
    max_image_bytes: int = 10 * 1024 * 1024
    # Input images with more pixels are refused from their header; None: 64 x max_pixels. Larger
    # images than twice the largest clip are shrunk on decode.
    max_image_pixels: int | None = Field(None, ge=4)
    max_audio_bytes: int = 50 * 1024 * 1024
    # Speech (a talk turn's, or a video job's audio) longer than this is refused while decoding.
    max_audio_seconds: float = Field(30.0, gt=0)

    @property
    def image_pixels(self) -> int:
        return self.max_image_pixels or 64 * self.max_pixels


class ServingConfig(_Strict):
    """The ingress: jobs, limits, storage, auth."""

    # Deadline of one job once it runs (queue time excluded); past it the job fails with a
    # timeout error and its stages are released.
    job_timeout_s: float = Field(1800.0, gt=0)
    # Jobs that run at once (the stages pipeline them) and jobs that may wait behind them; past
    # `max_running_jobs + max_queued_jobs`, POST /v1/videos answers 429 with Retry-After.
    max_running_jobs: int = Field(2, ge=1)
    max_queued_jobs: int = Field(16, ge=0)
    retry_after_s: int = Field(10, ge=1)
    # Talk turns streaming at once; one more answers 429 with Retry-After (`turn_retry_after_s`)
    # instead of waiting: a live turn that starts late is no use. None: what the lip-sync stage
    # can take, its (maximum) replicas x max_ongoing_requests.
    max_talk_turns: int | None = Field(None, ge=1)
    turn_retry_after_s: int = Field(1, ge=1)
    # A request body (upload) must arrive within this, or the request gets 408: a client that
    # trickles its body cannot hold the ingress.
    body_timeout_s: float = Field(30.0, gt=0)
    # Job records and finished MP4s, written atomically, so a restarted ingress still has them.
    # None: `$AVATAR_SERVE_STORAGE/<profile>` (default ~/.cache/avatar-serve/<profile>), filled in
    # when the profile is loaded.
    storage_dir: str | None = None
    # Finished results are deleted after this age, and oldest-first beyond this total size.
    result_ttl_s: float = Field(7 * 24 * 3600.0, gt=0)
    max_result_bytes: int = Field(20 * 1024**3, gt=0)
    api_keys: list[str] = Field(default_factory=list, description=(
        "Bearer-token API keys; when any key is configured, every route but /healthz and /readyz needs "
        "one. Keys from every source apply together: this list, the environment variable named by "
        "`api_keys_env` and the file `api_keys_file`, all read once where the application is built "
        "(`serve run graph:app` builds it in your shell; `serve run serve_config.yaml`, `serve deploy` "
        "and a `ray start` cluster build it in a Ray worker, which has the environment of `ray start` "
        "plus the application's runtime_env, not the environment of the `serve` command). The keys "
        "then travel to the ingress inside this config, wherever its replica runs."))
    api_keys_env: str | None = Field("AVATAR_SERVE_API_KEYS", description=(
        "An environment variable of comma-separated API keys (see api_keys). Set but holding no key "
        "(e.g. ','): start-up stops."))
    api_keys_file: str | None = Field(None, description=(
        "A file of API keys, one a line (lines starting with '#' are comments). Set but missing, unreadable or "
        "without a key: start-up stops; it never runs open instead."))
    require_api_keys: bool = Field(False, description=(
        "Start only with at least one API key found; otherwise start-up stops with an "
        "error naming where it looked. serve_config.yaml sets it, so a key given where the "
        "application cannot see it never leaves the server open."))
    admin_keys: list[str] = Field(default_factory=list, description=(
        "Keys for the admin routes (/v1/admin/...), which API keys do not grant; from the same "
        "kinds of sources as api_keys. With no key of either kind configured, the admin routes are "
        "open like the rest (a development setup)."))
    admin_keys_env: str | None = Field("AVATAR_SERVE_ADMIN_KEYS", description="like api_keys_env, for admin keys")
    admin_keys_file: str | None = Field(None, description="like api_keys_file, for admin keys")
    # LoRA files are loaded only from inside these folders (symlinks resolved first); a relative
    # path is taken inside the first. Empty: LoRA loading is off.
    lora_dirs: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _keys_usable(self) -> ServingConfig:
        for key in (*self.api_keys, *self.admin_keys):
            if not KEY_CHARS.fullmatch(key):
                raise ValueError("an API or admin key must be visible ASCII characters without spaces or "
                                 "commas (it travels in an Authorization header)")
        if self.require_api_keys and not self.api_keys:
            raise ValueError(
                "serving.require_api_keys is set but no API key was found where the application was "
                f"built: none in serving.api_keys, in the environment variable {self.api_keys_env}, or "
                "in serving.api_keys_file. On a `ray start` cluster the application is built by a Ray "
                "worker with the environment of `ray start`, not of `serve run` / `serve deploy`: give "
                "the keys in serve_config.yaml (runtime_env: {env_vars: {AVATAR_SERVE_API_KEYS: ...}}), "
                "in serving.api_keys_file, or set the variable when starting Ray")
        return self


class GraphConfig(_Strict):
    name: str
    description: str = ""
    # Where `avatar-serve download` put the files (a huggingface_hub cache folder); None: the
    # default Hugging Face cache. Serving reads from here and never downloads.
    weights_dir: str | None = None
    # A placement preset (PLACEMENTS, in deployments/profiles.py) applied under the stages' own
    # placement settings; None: each stage's placement as written (tiny: all on CPUs).
    placement: Literal["per-stage", "four-gpu", "two-gpu", "single-gpu"] | None = None
    stages: Stages = Stages()
    sampler: SamplerConfig = SamplerConfig()
    defaults: GenerationDefaults = GenerationDefaults()
    limits: Limits = Limits()
    serving: ServingConfig = ServingConfig()

    @property
    def max_talk_turns(self) -> int:
        """Concurrent talk turns the ingress admits."""
        placement = self.stages.lipsync.placement
        return self.serving.max_talk_turns or placement.max_replicas * placement.max_ongoing_requests


MODEL_STAGES = ("encoder", "high", "low", "decoder", "lipsync")
