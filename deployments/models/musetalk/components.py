"""MuseTalk's models: whisper-tiny's encoder, the v1.5 UNet and the SD VAE -- their
architectures (tiny for tests, full size for speed), random builders and the file loaders.

    whisper-tiny encoder   mel (1, 80, 3000) -> 5 hidden states (1, 1500, 384) each
    UNet2DConditionModel   (B, 8, 32, 32) + audio (B, 50, 384) at t=0 -> (B, 4, 32, 32)
    AutoencoderKL (SD)     (B, 4, 32, 32) / 0.18215 -> (B, 3, 256, 256)
"""

from __future__ import annotations

import json

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperModel

from deployments.common.runtime import cast_keeping_fp32, random_module
from deployments.config_weights import MuseTalkWeights, RandomWeights
from deployments.models.hub import resolve_dir, resolve_file
from deployments.models.musetalk.features import AUDIO_DIM

# ------------------------------------------------------------------ architectures

# The random weights of a profile: component k is drawn from `weights.seed + SEED_OFFSET[k]`
# (the face models of the lip-sync stage included), so each has its own stream.
SEED_OFFSET = {"whisper": 0, "unet": 1, "vae": 2, "face_parser": 3, "s3fd": 4, "fan": 5}

TINY = {
    # Runs a talk turn on a CPU in well under a second per batch (22 frames/s at batch 8 on a
    # 2-core CPU: bench/README.md, bench/lipsync.py).
    "whisper": dict(vocab_size=64, num_mel_bins=80, d_model=AUDIO_DIM, encoder_layers=4,
                    encoder_attention_heads=6, encoder_ffn_dim=384, decoder_layers=1,
                    decoder_attention_heads=6, decoder_ffn_dim=64, max_source_positions=1500,
                    max_target_positions=32, pad_token_id=0, bos_token_id=1, eos_token_id=1,
                    decoder_start_token_id=2, begin_suppress_tokens=None),
    "unet": dict(sample_size=32, in_channels=8, out_channels=4, layers_per_block=1,
                 block_out_channels=(32, 64),
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                 cross_attention_dim=AUDIO_DIM, attention_head_dim=8, norm_num_groups=8),
    "vae": dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 16, 16, 16),
                layers_per_block=1, latent_channels=4, norm_num_groups=8, sample_size=256,
                scaling_factor=0.18215),
}

# Full size (the `full` random arch: MuseTalk-size models for speed measurements): whisper-tiny,
# MuseTalk's musetalk.json (SD-1.x UNet with 8 input channels and 384-wide cross-attention),
# and the SD VAE (sd-vae-ft-mse's config).
FULL = {
    "whisper": dict(vocab_size=51865, num_mel_bins=80, d_model=AUDIO_DIM, encoder_layers=4,
                    encoder_attention_heads=6, encoder_ffn_dim=1536, decoder_layers=4,
                    decoder_attention_heads=6, decoder_ffn_dim=1536, max_source_positions=1500),
    "unet": dict(sample_size=64, in_channels=8, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280),
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                 cross_attention_dim=AUDIO_DIM, attention_head_dim=8, norm_num_groups=32,
                 flip_sin_to_cos=True, freq_shift=0, act_fn="silu", norm_eps=1e-5),
    "vae": dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
                layers_per_block=2, latent_channels=4, norm_num_groups=32, sample_size=256,
                scaling_factor=0.18215),
}
ARCHS = {"tiny": TINY, "full": FULL}


# ------------------------------------------------------------------ loading


def random_models(weights: RandomWeights, dtype: torch.dtype, device):
    """-> (feature extractor, whisper encoder, UNet, VAE) with random weights of `weights.arch`,
    each component drawn from `weights.seed` + its offset in SEED_OFFSET."""
    spec = ARCHS[weights.arch]

    def build(component, factory):
        return random_module(factory, weights.seed + SEED_OFFSET[component], dtype, device,
                             full_size=weights.arch != "tiny")

    extractor = WhisperFeatureExtractor(feature_size=spec["whisper"]["num_mel_bins"])
    whisper = build("whisper", lambda: WhisperModel(WhisperConfig(**spec["whisper"])).encoder)
    unet = build("unet", lambda: UNet2DConditionModel(**spec["unet"]))
    vae = build("vae", lambda: AutoencoderKL(**spec["vae"]))
    return extractor, whisper, unet, vae


def load_unet_state_dict(path, config_path) -> UNet2DConditionModel:
    """MuseTalk's UNet: a diffusers config JSON + a plain torch state dict (fp32).

    The model is built on the meta device and takes the loaded tensors as its parameters, so the
    850 M parameters are never initialised at random first.
    """
    config = json.loads(open(config_path).read())
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    state = torch.load(path, map_location="cpu", weights_only=True)
    unet.load_state_dict(state, strict=True, assign=True)
    left = [n for n, t in list(unet.named_parameters()) + list(unet.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"{path}: no weights for {left[:5]}")
    return unet


def load_models(weights, dtype: torch.dtype, device, weights_dir: str | None = None):
    """-> (WhisperFeatureExtractor, whisper encoder, UNet, VAE), models in `dtype` on `device`."""
    if isinstance(weights, RandomWeights):
        return random_models(weights, dtype, device)
    if isinstance(weights, MuseTalkWeights):
        whisper_dir = resolve_dir(weights.whisper, weights_dir)
        extractor = WhisperFeatureExtractor.from_pretrained(whisper_dir, local_files_only=True)
        whisper = WhisperModel.from_pretrained(whisper_dir, local_files_only=True).encoder
        unet = load_unet_state_dict(resolve_file(weights.repo, weights.unet, weights_dir),
                                    resolve_file(weights.repo, weights.unet_config, weights_dir))
        vae = AutoencoderKL.from_pretrained(resolve_dir(weights.vae, weights_dir), local_files_only=True)
    else:
        raise TypeError(f"lip-sync cannot load weights of kind {weights.kind!r}")
    whisper, unet, vae = (cast_keeping_fp32(m.to(device), dtype).eval() for m in (whisper, unet, vae))
    return extractor, whisper, unet, vae


