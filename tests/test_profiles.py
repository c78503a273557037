"""The shipped profiles (configs/*.yaml) as their settings: the full-size bases hold the Wan2.2
recipe and the serving settings every real profile shares, each profile differs from its base only
in what it says it does (weights, start-up LoRAs, fp8), real profiles lip-sync with MuseTalk. What
a profile downloads is in tests/models/test_download.py; loading, overrides and `extends` in
tests/test_config.py."""

from __future__ import annotations

import pytest

from deployments.config import MODEL_STAGES, GraphConfig
from deployments.config_weights import MuseTalkWeights
from deployments.profiles import CONFIG_DIR, load_profile, profile_names, read_profile, validate_profile

MUSETALK = "TMElyralab/MuseTalk"
SD_VAE = "stabilityai/sd-vae-ft-mse"
WHISPER = "openai/whisper-tiny"
DISTILL_LORAS = "lightx2v/Wan2.2-Distill-Loras"
DISTILL_LORA_HIGH = "wan2.2_i2v_A14b_high_noise_lora_rank64_lightx2v_4step_1022.safetensors"
DISTILL_LORA_LOW = "wan2.2_i2v_A14b_low_noise_lora_rank64_lightx2v_4step_1022.safetensors"
# Wan2.2 wan/configs/shared_config.py, `wan_shared_cfg.sample_neg_prompt` (Wan-Video/Wan2.2 at
# 42bf4cf): what wan/image2video.py encodes when the negative prompt is "".
WAN_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，"
    "JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，"
    "形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走")
# The 4-step GGUF profiles add the experts' start-up LoRAs: the one other allowed difference.
LORA_PROFILES = {"wan22-i2v-a14b-gguf-q4km-4step", "wan22-i2v-a14b-gguf-q8-4step"}
RANDOM_PROFILES = {"tiny", "random-a14b"}  # random weights built in code (nothing to download)


def base(name: str) -> GraphConfig:
    """A base profile (`_...`, not servable) validated as if it were one."""
    return validate_profile({"name": name, **read_profile(CONFIG_DIR / f"{name}.yaml")})


def test_full_size_bases_hold_the_shared_settings():
    full = base("_wan22-a14b")
    s, d, lim = full.sampler, full.defaults, full.limits
    # The original Wan2.2 I2V recipe, with Wan's defaults for CFG: the shift it advises for I2V
    # (3.0 at 480p, 5.0 at 720p) and its default negative prompt for an empty one.
    assert (s.scheduler, s.flow_shift, s.flow_shift_720p, s.num_inference_steps) == ("unipc", 3.0, 5.0, 40)
    assert full.stages.encoder.default_negative_prompt == WAN_NEGATIVE_PROMPT
    assert (s.guidance_scale, s.guidance_scale_2, s.boundary_ratio, s.high_steps) == (3.5, 3.5, 0.9, None)
    assert (d.width, d.height, d.num_frames, d.fps) == (832, 480, 81, 16)
    assert (lim.max_pixels, lim.max_frames, lim.max_audio_seconds) == (1280 * 720, 121, 120)
    stages = full.stages
    # split placement: each Wan stage on its own card, lip-sync replicas halves of one, the ingress on none
    assert [getattr(stages, st).placement.num_gpus for st in ("encoder", "high", "low", "decoder")] == [1] * 4
    assert stages.lipsync.placement.num_gpus == 0.5 and stages.ingress.placement.num_gpus == 0
    for st in ("encoder", "high", "low", "decoder"):  # warmed up at the default shape before ready
        assert [(w.width, w.height, w.num_frames) for w in getattr(stages, st).warmup] == [(832, 480, 81)]
    lipsync = stages.lipsync
    assert (lipsync.weights.repo, lipsync.weights.unet, lipsync.weights.unet_config,
            lipsync.weights.vae, lipsync.weights.whisper) == (
        MUSETALK, "musetalkV15/unet.pth", "musetalkV15/musetalk.json", SD_VAE, WHISPER)
    assert (lipsync.batch_size, lipsync.compile, lipsync.placement.max_replicas) == (32, True, 2)
    assert lipsync.avatar_cache_dir  # shared by its replicas
    assert full.max_talk_turns == 16
    # The 4-step distilled recipe on top of it.
    s = base("_wan22-a14b-4step").sampler
    assert (s.scheduler, s.flow_shift, s.sigmas, s.num_inference_steps, s.high_steps,
            s.guidance_scale, s.guidance_scale_2) == ("euler", 5.0, [1.0, 0.75, 0.5, 0.25], 4, 2, 1.0, 1.0)
    assert s.flow_shift_720p is None  # the distilled schedule keeps shift 5 at every size


@pytest.mark.parametrize("name,parent", [
    ("wan22-i2v-a14b-bf16", "_wan22-a14b"), ("wan22-i2v-a14b-gguf-q4km", "_wan22-a14b"),
    ("wan22-i2v-a14b-gguf-q8", "_wan22-a14b"), ("wan22-i2v-a14b-distill-bf16", "_wan22-a14b-4step"),
    ("wan22-i2v-a14b-distill-fp8", "_wan22-a14b-4step"), ("random-a14b", "_wan22-a14b-4step"),
    ("wan22-i2v-a14b-gguf-q4km-4step", "_wan22-a14b-4step"),
    ("wan22-i2v-a14b-gguf-q8-4step", "_wan22-a14b-4step")])

def test_profiles_differ_from_their_base_only_in_weights(name, parent):
    """... and, for LORA_PROFILES, in the experts' `loras` (checked exactly below); the
    distill-fp8 profile runs its experts' self-attention in FP8, and random-a14b, which stands in
    for it, does that too and quantises its experts to fp8."""
    loaded = {name: load_profile(name), parent: base(parent)}
    cfg, shared = loaded[name].model_dump(), loaded[parent].model_dump()
    for profile, title in ((cfg, name), (shared, parent)):  # jobs, avatars, compiles: per profile
        storage = profile["serving"].pop("storage_dir")
        assert storage.endswith(title)
        for stage in MODEL_STAGES:
            assert profile["stages"][stage].pop("compile_cache_dir") is None  # not set: derived
            assert loaded[title].compile_cache_dir(stage) == f"{storage}/compile-cache"
        assert profile["stages"]["lipsync"].pop("avatar_cache_dir") == f"{storage}/avatars"
    for key in ("sampler", "defaults", "limits", "serving"):
        assert cfg[key] == shared[key], key
    differ = ("weights", "loras") if name in LORA_PROFILES else ("weights",)
    if name == "random-a14b":
        assert [cfg["stages"][r]["quantize"] for r in ("high", "low")] == ["fp8", "fp8"]
        differ += ("quantize",)
    if name in ("random-a14b", "wan22-i2v-a14b-distill-fp8"):
        assert [cfg["stages"][r]["attention_backend"] for r in ("high", "low")] == ["fa3_fp8"] * 2
        differ += ("attention_backend",)
    for stage, settings in cfg["stages"].items():
        other = shared["stages"][stage]
        assert {k: v for k, v in settings.items() if k not in differ} == \
            {k: v for k, v in other.items() if k not in differ}, stage
    assert shared["stages"]["high"]["loras"] == shared["stages"]["low"]["loras"] == []


@pytest.mark.parametrize("name,quant", [("wan22-i2v-a14b-gguf-q4km-4step", "Q4_K_M"),
                                        ("wan22-i2v-a14b-gguf-q8-4step", "Q8_0")])

def test_gguf_4step_profiles_are_the_seed_recipe(name, quant):
    """The QuantStack GGUF experts of the 40-step GGUF profile of the same quant, LightX2V's 4-step
    schedule (timesteps 1000/750/500/250 before shift 5, two steps per expert, Euler, no CFG: 4
    forwards per clip), and the distill LoRA of each expert at strength 1 on its own expert."""
    cfg = load_profile(name)
    forty = load_profile(f"wan22-i2v-a14b-gguf-{'q4km' if quant == 'Q4_K_M' else 'q8'}")
    assert cfg.stages.high.weights == forty.stages.high.weights
    assert cfg.stages.low.weights == forty.stages.low.weights
    assert quant in cfg.stages.high.weights.filename and quant in cfg.stages.low.weights.filename
    s = cfg.sampler
    assert (s.scheduler, s.sigmas, s.flow_shift, s.num_inference_steps, s.high_steps,
            s.guidance_scale, s.guidance_scale_2) == ("euler", [1.0, 0.75, 0.5, 0.25], 5.0, 4, 2, 1.0, 1.0)
    for role, filename in (("high", DISTILL_LORA_HIGH), ("low", DISTILL_LORA_LOW)):
        (lora,) = getattr(cfg.stages, role).loras
        assert (lora.repo, lora.filename, lora.strength) == (DISTILL_LORAS, filename, 1.0)
        # Wan2.1's image cross-attention, which a Wan2.2 I2V expert lacks (LightX2V skips it too)
        assert lora.skip_absent == ["*.k_img.*", "*.v_img.*", "*.norm_k_img.*"]
    # No other profile carries start-up LoRAs.
    for other in set(profile_names()) - LORA_PROFILES:
        assert not load_profile(other).stages.high.loras and not load_profile(other).stages.low.loras


def test_real_profiles_lip_sync_with_musetalk():
    for name in sorted(set(profile_names()) - RANDOM_PROFILES):
        # real weights for lip-sync too (never the default random tiny models)
        assert load_profile(name).stages.lipsync.weights == MuseTalkWeights()


def test_random_profile_is_full_size_everywhere():
    w = load_profile("random-a14b").stages
    assert {getattr(w, st).weights.kind for st in ("encoder", "high", "low", "decoder", "lipsync")} == {"random"}
    assert {getattr(w, st).weights.arch for st in ("encoder", "high", "low", "decoder")} == {"a14b"}
    assert w.lipsync.weights.arch == "full"
