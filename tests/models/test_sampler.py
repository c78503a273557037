"""The scheduler state that crosses the expert boundary."""

import pytest
import torch

from deployments.config import SamplerConfig
from deployments.models.wan.sampler import (
    expert_for_step,
    export_state,
    flow_shift_for,
    import_state,
    make_scheduler,
    set_timesteps,
)
from deployments.profiles import load_profile

UNIPC = SamplerConfig(scheduler="unipc", flow_shift=3.0, num_inference_steps=6)


def _steps(scheduler, latents, flows, indices):
    for i in indices:
        latents = scheduler.step(flows[i], scheduler.timesteps[i], latents, return_dict=False)[0]
    return latents


def test_exported_state_continues_exactly_and_history_matters():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(1, 4, 2, 3, 3, generator=g)
    flows = [torch.randn(1, 4, 2, 3, 3, generator=g) for _ in range(6)]

    one = make_scheduler(UNIPC)
    set_timesteps(one, UNIPC, 6, "cpu")
    expected = _steps(one, x0, flows, range(6))

    first = make_scheduler(UNIPC)
    set_timesteps(first, UNIPC, 6, "cpu")
    mid = _steps(first, x0, flows, range(3))
    resumed = import_state(export_state(first), "cpu")
    assert torch.equal(_steps(resumed, mid, flows, range(3, 6)), expected)

    # A fresh scheduler positioned at step 3 lacks UniPC's history: the result drifts.
    fresh = make_scheduler(UNIPC)
    set_timesteps(fresh, UNIPC, 6, "cpu")
    fresh._step_index = 3
    assert (_steps(fresh, mid, flows, range(3, 6)) - expected).abs().max() > 1e-6


def test_expert_split_rules():
    assert expert_for_step(UNIPC, 0, 999, 1000) == "high"
    assert expert_for_step(UNIPC, 1, 900, 1000) == "high"  # t >= boundary is high
    assert expert_for_step(UNIPC, 2, 899.9, 1000) == "low"
    distilled = SamplerConfig(scheduler="euler", num_inference_steps=4, sigmas=[1, .75, .5, .25], high_steps=2)
    assert [expert_for_step(distilled, i, 0.0, 1000) for i in range(4)] == ["high", "high", "low", "low"]


def test_distilled_sigmas_give_lightx2v_timesteps():
    cfg = SamplerConfig(scheduler="euler", flow_shift=5.0, num_inference_steps=4, sigmas=[1, .75, .5, .25])
    s = make_scheduler(cfg)
    set_timesteps(s, cfg, 4, "cpu")
    # [1000, 750, 500, 250] before the shift; shift 5: t' = 5t / (1 + 4t)
    expected = torch.tensor([1000.0, 937.5, 833.3333, 625.0])
    assert torch.allclose(s.timesteps, expected, atol=1e-3)


@pytest.mark.parametrize("width,height,shift", [
    (832, 480, 3.0), (480, 832, 3.0), (640, 640, 3.0), (1024, 576, 3.0),  # 480p class
    (1280, 720, 5.0), (720, 1280, 5.0), (1280, 704, 5.0), (960, 960, 5.0), (1024, 704, 5.0),  # 720p
])
def test_cfg_profiles_shift_3_at_480p_and_5_at_720p(width, height, shift):
    """Wan's advice for I2V (diffusers' Wan docs: `flow_shift = 5.0 # 5.0 for 720P, 3.0 for 480P`);
    a size between takes the class whose pixel count it is nearer by ratio."""
    for name in ("wan22-i2v-a14b-bf16", "wan22-i2v-a14b-gguf-q4km", "wan22-i2v-a14b-gguf-q8"):
        sampler = load_profile(name).sampler
        assert flow_shift_for(sampler, width, height) == shift
        assert make_scheduler(sampler, width, height).config.flow_shift == shift
    # The distilled 4-step profiles keep their schedule's shift 5 at every size, tiny its 3.
    assert flow_shift_for(load_profile("wan22-i2v-a14b-distill-bf16").sampler, width, height) == 5.0
    assert flow_shift_for(load_profile("tiny").sampler, width, height) == 3.0


def test_flow_shift_without_a_size_or_a_720p_shift_is_the_profiles():
    cfg = SamplerConfig(flow_shift=3.0, flow_shift_720p=5.0)
    assert flow_shift_for(cfg) == 3.0 and make_scheduler(cfg).config.flow_shift == 3.0
    assert flow_shift_for(SamplerConfig(flow_shift=2.0), 1280, 720) == 2.0
    euler = SamplerConfig(scheduler="euler", flow_shift=3.0, flow_shift_720p=5.0)
    assert make_scheduler(euler, 1280, 720).config.shift == 5.0
