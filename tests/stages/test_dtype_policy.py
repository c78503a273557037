"""Per-stage dtype policy (each stage config's `*_dtype` / `*_dtype_cpu` fields in
deployments/config.py), checked on every tensor crossing each stage boundary.

On this CPU the GPU dtypes are forced through the `*_cpu` settings, so the same named functions
run as on a GPU: text encoder bf16, DIT in fp16 or bf16, VAE decode in bf16.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from deployments.config import DecoderConfig, EncoderConfig, ExpertConfig, SamplerConfig
from deployments.decoder import Decoder, vae_norm_constants
from deployments.dit_expert import DitExpert, cast_context
from deployments.encoder import Encoder
from helpers import get_dummy_image, get_dummy_params

SAMPLER = SamplerConfig(scheduler="unipc", num_inference_steps=2, high_steps=1)


@pytest.fixture(scope="module")
def cond():
    encoder = Encoder(EncoderConfig(text_encoder_dtype_cpu="bfloat16"))
    return encoder.encode(get_dummy_params(num_inference_steps=2), get_dummy_image())


def test_encoder_output_stays_in_text_encoder_dtype(cond):
    # Not cast inside the encoder: the boundary carries bf16 (as its uint16 bit pattern).
    assert cond.prompt_embeds.dtype == "bfloat16" and cond.prompt_embeds.data.dtype == np.uint16
    assert cond.negative_prompt_embeds.dtype == "bfloat16"
    assert cond.condition.dtype == "float32"


@pytest.mark.parametrize("dit_dtype", ["float16", "bfloat16"])
def test_expert_casts_context_on_arrival_and_keeps_fp32_latents(cond, dit_dtype):
    seen = []
    experts = [DitExpert(ExpertConfig(compute_dtype_cpu=dit_dtype), SAMPLER, r) for r in ("high", "low")]
    for e in experts:
        e.transformer.register_forward_pre_hook(
            lambda m, a, kw: seen.append((kw["hidden_states"].dtype, kw["encoder_hidden_states"].dtype)),
            with_kwargs=True)
    state = experts[0].denoise(cond)
    assert state.latents.dtype == "float32"  # sampler state stays fp32 between experts
    assert all(v.dtype == "float32" for v in state.sampler.attributes["model_outputs"] if v is not None)
    state = experts[1].denoise(cond, state)
    assert state.done and state.latents.dtype == "float32"
    want = getattr(torch, dit_dtype)
    assert seen and all(h == want and c == want for h, c in seen)
    # Linear weights in the compute dtype; the modules Wan keeps in fp32 stay fp32.
    t = experts[0].transformer
    assert t.blocks[0].attn1.to_q.weight.dtype == want
    assert t.scale_shift_table.dtype == torch.float32 and t.blocks[0].norm2.weight.dtype == torch.float32


def test_cast_context_is_the_only_cast():
    x = torch.ones(1, 4, 8, dtype=torch.bfloat16)
    assert cast_context(x, torch.float16).dtype == torch.float16


def test_vae_constants_are_cast_with_the_vae(cond):
    decoder = Decoder(DecoderConfig(vae_dtype_cpu="bfloat16"))
    assert next(decoder.vae.parameters()).dtype == torch.bfloat16
    assert decoder.latents_mean.dtype == decoder.latents_std.dtype == torch.bfloat16
    mean, std = vae_norm_constants(decoder.vae, torch.bfloat16, "cpu")
    assert mean.shape == (1, 16, 1, 1, 1) and std.dtype == torch.bfloat16
    # Decoding bf16 latents with bf16 constants never upcasts: hook the VAE's decoder input.
    seen = []
    decoder.vae.decoder.register_forward_pre_hook(lambda m, a: seen.append(a[0].dtype))
    experts = [DitExpert(ExpertConfig(), SAMPLER, r) for r in ("high", "low")]
    state = experts[1].denoise(cond, experts[0].denoise(cond))
    frames = decoder.decode(state)
    assert seen and all(d == torch.bfloat16 for d in seen)
    assert frames.frames.dtype == np.uint8 and frames.frames.shape == (9, 16, 16, 3)
