"""Model components for the Wan2.2 I2V stages: built at random in code, or loaded from files.

Every stage loads only what it needs through these functions, so the encoder's VAE and the
decoder's VAE are the same model (same source, same seed) even though they live in different
processes. Random components are deterministic: component k of a profile is built under
`torch.manual_seed(seed + k)`.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import AutoencoderKLWan, WanTransformer3DModel
from transformers import AutoTokenizer, T5Tokenizer, UMT5Config, UMT5EncoderModel

from deployments.common.runtime import random_module, random_module_in_parts
from deployments.config_weights import DiffusersWeights, RandomWeights, expert_subfolder
from deployments.models.hub import resolve_dir

# The random weights of a profile: component k is drawn from `weights.seed + SEED_OFFSET[k]`,
# so each has its own stream.
SEED_OFFSET = {"text_encoder": 0, "vae": 1, "high": 2, "low": 3}

# ------------------------------------------------------------------ architectures

# Tiny: the whole graph runs on a CPU in well under a second per request (111 ms through the
# ingress on a 2-core CPU: bench/README.md, Results).
TINY = {
    "text_encoder": dict(vocab_size=64, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                         relative_attention_num_buckets=8, feed_forward_proj="gated-gelu",
                         dropout_rate=0.0),
    "vae": dict(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                temperal_downsample=[False, True, True]),
    "expert": dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
                   in_channels=36, out_channels=16, text_dim=32, freq_dim=256, ffn_dim=32,
                   num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                   rope_max_seq_len=32),
}

# Full size Wan2.2-I2V-A14B (umT5-XXL encoder, Wan2.1 VAE, 14.29 B-parameter experts): for speed
# measurements with random weights, where speed does not depend on weight values.
A14B = {
    "text_encoder": dict(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24,
                         num_heads=64, relative_attention_num_buckets=32,
                         feed_forward_proj="gated-gelu", dropout_rate=0.0),
    "vae": dict(base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                temperal_downsample=[False, True, True]),
    "expert": dict(patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128,
                   in_channels=36, out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=13824,
                   num_layers=40, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                   eps=1e-6, rope_max_seq_len=1024),
}
ARCHS = {"tiny": TINY, "a14b": A14B}

# The Wan VAE (2.1 and 2.2 I2V): latents are 16 channels, 4x fewer frames (the first one alone),
# 8x smaller in space. Stages without the VAE use these to size their warm-up inputs.
LATENT_CHANNELS, VAE_TEMPORAL, VAE_SPATIAL = 16, 4, 8


def latent_shape(width: int, height: int, num_frames: int) -> tuple[int, int, int, int, int]:
    """(1, 16, T, h, w) of a clip: T = (F - 1) / 4 + 1, h = H / 8, w = W / 8."""
    return (1, LATENT_CHANNELS, (num_frames - 1) // VAE_TEMPORAL + 1, height // VAE_SPATIAL, width // VAE_SPATIAL)


def tiny_tokenizer() -> T5Tokenizer:
    """A unigram tokenizer built in code: specials, letters, digits, a few words (< 64 ids).

    Any ASCII prompt tokenizes (into letters if need be); other characters map to <unk>.
    """
    words = ["▁a", "▁the", "▁of", "▁and", "▁portrait", "▁talks", "▁smiles", "▁camera", "▁woman",
             "▁man", "▁cat"]
    singles = ["▁"] + [chr(c) for c in range(ord("a"), ord("z") + 1)] + list("0123456789") + list(".,")
    pieces = ["<pad>", "</s>", "<unk>"] + words + singles
    vocab = [(p, 0.0) for p in pieces[:3]] + [(p, -1.0 - i / 10) for i, p in enumerate(words)]
    vocab += [(p, -10.0) for p in singles]
    assert len(vocab) <= TINY["text_encoder"]["vocab_size"]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def _random(cls: type, kwargs: dict[str, Any], weights: RandomWeights, component: str,
            dtype: torch.dtype, device: torch.device | str) -> torch.nn.Module:
    return random_module(lambda: cls(**kwargs), weights.seed + SEED_OFFSET[component], dtype, device,
                         full_size=weights.arch != "tiny")


# ------------------------------------------------------------------ loaders


def load_text_encoder(weights, dtype: torch.dtype, device,
                      weights_dir: str | None = None) -> tuple[Any, UMT5EncoderModel]:
    """-> (tokenizer, UMT5EncoderModel) in `dtype` on `device`."""
    if isinstance(weights, RandomWeights):
        config = UMT5Config(**ARCHS[weights.arch]["text_encoder"])
        return tiny_tokenizer(), _random(UMT5EncoderModel, {"config": config}, weights,
                                         "text_encoder", dtype, device)
    if isinstance(weights, DiffusersWeights):
        root = resolve_dir(weights.path, weights_dir)
        tokenizer = AutoTokenizer.from_pretrained(root, subfolder="tokenizer", local_files_only=True)
        model = UMT5EncoderModel.from_pretrained(root, subfolder=weights.subfolder or "text_encoder",
                                                 torch_dtype=dtype, local_files_only=True)
        return tokenizer, model.to(device).eval()
    raise TypeError(f"text encoder cannot load weights of kind {weights.kind!r}")


def load_vae(weights, dtype: torch.dtype, device, weights_dir: str | None = None) -> AutoencoderKLWan:
    if isinstance(weights, RandomWeights):
        return _random(AutoencoderKLWan, ARCHS[weights.arch]["vae"], weights, "vae", dtype, device)
    if isinstance(weights, DiffusersWeights):
        vae = AutoencoderKLWan.from_pretrained(resolve_dir(weights.path, weights_dir),
                                               subfolder=weights.subfolder or "vae",
                                               torch_dtype=dtype, local_files_only=True)
        return vae.to(device).eval()
    raise TypeError(f"VAE cannot load weights of kind {weights.kind!r}")


def set_conv_format(model: torch.nn.Module, memory_format: torch.memory_format) -> None:
    """Every 3-D convolution's weight in `memory_format` (`Module.to(memory_format=...)` refuses
    the VAE: it has 4-D weights too)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Conv3d):
            module.weight.data = module.weight.data.contiguous(memory_format=memory_format)


def load_expert(weights, role: str, dtype: torch.dtype, device,
                weights_dir: str | None = None, quantize: str = "none") -> WanTransformer3DModel:
    """The high-noise expert is diffusers' `transformer`, the low-noise one `transformer_2`.

    `quantize="fp8"` with full-size random weights builds the expert block by block, each block
    quantised before the next is made (peak about 15 GB instead of the 28.6 GB bf16 model); on
    every other path the caller quantises after loading (`to_fp8` leaves done linears alone).
    """
    if isinstance(weights, RandomWeights):
        if quantize == "fp8" and weights.arch != "tiny":
            from deployments.models.wan.fp8 import to_fp8

            return random_module_in_parts(
                lambda: WanTransformer3DModel(**ARCHS[weights.arch]["expert"]),
                weights.seed + SEED_OFFSET[role], dtype, device,
                finish_part=lambda name, part: to_fp8(part, prefix=name))
        return _random(WanTransformer3DModel, ARCHS[weights.arch]["expert"], weights, role,
                       dtype, device)
    if isinstance(weights, DiffusersWeights):
        subfolder = weights.subfolder or expert_subfolder(role)
        model = WanTransformer3DModel.from_pretrained(resolve_dir(weights.path, weights_dir),
                                                      subfolder=subfolder,
                                                      torch_dtype=dtype, local_files_only=True)
        return model.to(device).eval()
    # Single-file experts (original Wan key names): imported here so the random/diffusers paths
    # do not pull in the fp8 and GGUF machinery.
    from deployments.config_weights import GGUFWeights, WanSafetensorsWeights

    if isinstance(weights, WanSafetensorsWeights):
        from deployments.models.wan.checkpoints import load_wan_safetensors_expert
        return load_wan_safetensors_expert(weights, role, dtype, device, weights_dir)
    if isinstance(weights, GGUFWeights):
        from deployments.models.wan.checkpoints import load_gguf_expert
        return load_gguf_expert(weights, role, dtype, device, weights_dir)
    raise TypeError(f"expert cannot load weights of kind {weights.kind!r}")


def get_dummy_components(seed: int = 0) -> dict[str, Any]:
    """The tiny random components as diffusers' `WanImageToVideoPipeline` names them (fp32, CPU).

    Built through the same loaders the stages use, so a pipeline made from these has exactly the
    weights of a tiny-profile graph with `weights.seed == seed`.
    """
    w = RandomWeights(arch="tiny", seed=seed)
    tokenizer, text_encoder = load_text_encoder(w, torch.float32, "cpu")
    return {
        "tokenizer": tokenizer,
        "text_encoder": text_encoder,
        "vae": load_vae(w, torch.float32, "cpu"),
        "transformer": load_expert(w, "high", torch.float32, "cpu"),
        "transformer_2": load_expert(w, "low", torch.float32, "cpu"),
    }
