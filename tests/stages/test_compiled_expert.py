"""The fast path's compiled experts (`compile: true`, diffusers' `compile_repeated_blocks`, on by
default in the full profiles) against the plain path on the same tiny random weights: the same
steps within a stated tolerance (Inductor fuses and reorders float math, so not bit for bit)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from deployments.common.transport import unpack
from deployments.config import EncoderConfig, ExpertConfig, SamplerConfig
from deployments.dit_expert import DitExpert
from deployments.encoder import Encoder
from helpers import get_dummy_image, get_dummy_params

SAMPLER = SamplerConfig(scheduler="euler", flow_shift=5.0, num_inference_steps=2, high_steps=1,
                        sigmas=[1.0, 0.5], guidance_scale=1.0, guidance_scale_2=1.0)
TOLERANCE = 1e-4  # max abs difference of the latents after each expert's step (fp32, CPU)
pytestmark = pytest.mark.slow  # torch.compile: Inductor builds C++ kernels (15-20 s each on a cold cache)


def test_compiled_experts_match_the_plain_ones():
    cond = Encoder(EncoderConfig()).encode(get_dummy_params(num_inference_steps=2, guidance_scale=1.0,
                                                            guidance_scale_2=1.0), get_dummy_image())
    from torch._dynamo.utils import counters

    counters.clear()
    results = {}
    for compiled in (False, True):
        high = DitExpert(ExpertConfig(compile=compiled), SAMPLER, "high")
        low = DitExpert(ExpertConfig(compile=compiled), SAMPLER, "low")
        after_high = high.denoise(cond)
        results[compiled] = (unpack(after_high.latents), unpack(low.denoise(cond, after_high).latents))
        assert (counters["stats"]["unique_graphs"] > 0) == compiled  # the blocks really ran compiled
    for plain, fast in zip(results[False], results[True]):
        assert plain.shape == fast.shape and torch.isfinite(fast).all()
        assert (plain - fast).abs().max() <= TOLERANCE, (plain - fast).abs().max()


def test_warm_up_compiles_what_the_first_request_runs():
    """Ready means ready: with `warmup` at a request's shape, the first request of that shape
    compiles nothing (each new graph is a compile a user would wait for); another shape does."""
    from torch._dynamo.utils import counters

    params = get_dummy_params(num_inference_steps=2, guidance_scale=1.0, guidance_scale_2=1.0)
    cond = Encoder(EncoderConfig()).encode(params, get_dummy_image())
    warmup = [{"width": params.width, "height": params.height, "num_frames": params.num_frames}]
    torch._dynamo.reset()
    counters.clear()
    high = DitExpert(ExpertConfig(compile=True, warmup=warmup), SAMPLER, "high")
    low = DitExpert(ExpertConfig(compile=True, warmup=warmup), SAMPLER, "low")
    compiled_at_start = counters["stats"]["unique_graphs"]
    assert compiled_at_start > 0
    low.denoise(cond, high.denoise(cond))
    assert counters["stats"]["unique_graphs"] == compiled_at_start, dict(counters["recompiles"])
    other = Encoder(EncoderConfig()).encode(dataclasses.replace(params, width=32), get_dummy_image())
    high.denoise(other)
    assert counters["stats"]["unique_graphs"] > compiled_at_start  # the count does see a compile
