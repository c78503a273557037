"""LoRA per expert: key styles, targets, switching and bit-exact removal (diffusers + peft)."""

import pytest
import torch
from safetensors.torch import save_file

from deployments.config import RandomWeights
from deployments.models.wan.components import load_expert
from deployments.models.wan.lora import LoraError, LoraManager
from helpers import LORA_RANK, TINY_INNER, WAN_LORA_NAMES, lora_pairs, write_diffusers_lora


def _experts(seed: int = 0):
    w = RandomWeights(arch="tiny", seed=seed)
    return (load_expert(w, "high", torch.float32, "cpu"), load_expert(w, "low", torch.float32, "cpu"))


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, 36, 3, 8, 8, generator=g), torch.tensor([800.0]),
            torch.randn(1, 8, 32, generator=g))


@torch.no_grad()
def _run(model, inputs=None):
    x, t, ctx = inputs or _inputs()
    return model(hidden_states=x, timestep=t, encoder_hidden_states=ctx, return_dict=False)[0]


def write_wan_lora(path, pairs, alpha: float):
    """Original-Wan / ComfyUI style: diffusion_model.blocks.0.self_attn.q.lora_down.weight,
    .lora_up.weight and a scalar .alpha (effective scale alpha / rank)."""
    sd = {}
    for (i, name), (down, up) in pairs.items():
        base = f"diffusion_model.blocks.{i}.{WAN_LORA_NAMES[name]}"
        sd[f"{base}.lora_down.weight"] = down.contiguous()
        sd[f"{base}.lora_up.weight"] = up.contiguous()
        sd[f"{base}.alpha"] = torch.tensor(alpha)
    save_file(sd, str(path))
    return path


def test_lora_error_is_a_value_error():
    assert issubclass(LoraError, ValueError)


def test_lora_reaches_only_its_target_and_removal_restores_bit_exactly(tmp_path):
    high, low = _experts()
    base_high, base_low = _run(high), _run(low)
    managers = {"high": LoraManager(high, "high"), "low": LoraManager(low, "low")}
    path = write_diffusers_lora(tmp_path / "style.safetensors", lora_pairs(1))

    applied = {role: m.load("style", path, strength=1.0, target="high") for role, m in managers.items()}
    assert applied == {"high": True, "low": False}
    assert not torch.allclose(_run(high), base_high, atol=1e-3)
    assert torch.equal(_run(low), base_low)
    assert managers["high"].active() == [{"name": "style", "strength": 1.0, "target": "high",
                                          "path": str(path)}]
    assert managers["low"].active() == []

    managers["high"].remove("style")
    assert torch.equal(_run(high), base_high)
    assert managers["high"].active() == [] and managers["high"].loaded() == []
    # peft's wrappers are gone: the expert is the plain base model again.
    assert type(high.blocks[0].attn1.to_q) is torch.nn.Linear


def test_both_target_applies_to_each_expert(tmp_path):
    high, low = _experts()
    base_low = _run(low)
    path = write_diffusers_lora(tmp_path / "l.safetensors", lora_pairs(2))
    assert LoraManager(low, "low").load("l", path, target="both")
    assert not torch.allclose(_run(low), base_low, atol=1e-3)


def test_wan_style_with_alpha_equals_diffusers_style(tmp_path):
    """The ComfyUI/original-Wan file (lora_down/lora_up + alpha) converted by diffusers gives the
    same expert as a diffusers-style file whose up matrices carry the alpha / rank scale."""
    pairs, alpha = lora_pairs(3), 2.0
    a, _ = _experts()
    b, _ = _experts()
    LoraManager(a, "high").load("wan", write_wan_lora(tmp_path / "w.safetensors", pairs, alpha),
                                target="high")
    LoraManager(b, "high").load("dif", write_diffusers_lora(tmp_path / "d.safetensors", pairs,
                                                            scale=alpha / LORA_RANK), target="high")
    out_a, out_b = _run(a), _run(b)
    torch.testing.assert_close(out_a, out_b, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out_a, _run(_experts()[0]), atol=1e-3)


def test_strength_switch_and_disable(tmp_path):
    high, _ = _experts()
    base = _run(high)
    m = LoraManager(high, "high")
    m.load("one", write_diffusers_lora(tmp_path / "1.safetensors", lora_pairs(4)), target="high")
    m.load("two", write_diffusers_lora(tmp_path / "2.safetensors", lora_pairs(5)), target="high")
    assert [a["name"] for a in m.active()] == ["one", "two"]

    m.activate(["one"], [1.0])
    only_one = _run(high)
    m.activate(["two"], [1.0])
    only_two = _run(high)
    assert not torch.allclose(only_one, only_two, atol=1e-3)
    m.activate(["one"], [0.5])
    half_one = _run(high)
    assert not torch.allclose(half_one, only_one, atol=1e-4)
    assert m.active() == [{"name": "one", "strength": 0.5, "target": "high",
                           "path": str(tmp_path / "1.safetensors")}]
    m.activate([])
    assert torch.equal(_run(high), base)

    m.activate(["one"], [1.0])
    assert torch.equal(_run(high), only_one)  # switching back is exact
    m.remove("two")
    assert torch.equal(_run(high), only_one)  # removing another adapter leaves this one as is
    m.remove("one")
    assert torch.equal(_run(high), base)


@pytest.mark.parametrize("style", ["diffusers", "wan"])
def test_lora_matching_nothing_is_refused_and_expert_keeps_working(tmp_path, style):
    high, _ = _experts()
    base = _run(high)
    m = LoraManager(high, "high")
    g = torch.Generator().manual_seed(6)
    down, up = torch.randn(LORA_RANK, TINY_INNER, generator=g), torch.randn(TINY_INNER, LORA_RANK, generator=g)
    if style == "diffusers":  # a block this expert does not have
        sd = {"transformer.blocks.7.attn1.to_q.lora_A.weight": down,
              "transformer.blocks.7.attn1.to_q.lora_B.weight": up}
    else:
        sd = {"diffusion_model.blocks.9.self_attn.q.lora_down.weight": down,
              "diffusion_model.blocks.9.self_attn.q.lora_up.weight": up}
    save_file(sd, str(tmp_path / "bad.safetensors"))
    with pytest.raises(LoraError):
        m.load("bad", tmp_path / "bad.safetensors", target="high")
    assert m.loaded() == [] and not getattr(high, "peft_config", None)
    assert torch.equal(_run(high), base)
    # ... and a good LoRA still loads afterwards.
    assert m.load("good", write_diffusers_lora(tmp_path / "g.safetensors", lora_pairs(7)), target="high")


def test_lora_for_another_model_size_is_refused(tmp_path):
    high, _ = _experts()
    base = _run(high)
    wide = {(0, "q"): (torch.randn(LORA_RANK, 5120), torch.randn(5120, LORA_RANK))}
    with pytest.raises(LoraError, match="input size"):
        LoraManager(high, "high").load("wide", write_diffusers_lora(tmp_path / "w.safetensors", wide),
                                       target="high")
    assert torch.equal(_run(high), base)


@pytest.mark.parametrize("target", ["middle", "", "HIGH", None])
def test_invalid_target_is_refused(tmp_path, target):
    high, _ = _experts()
    base = _run(high)
    path = write_diffusers_lora(tmp_path / "l.safetensors", lora_pairs(8))
    with pytest.raises(LoraError, match="target"):
        LoraManager(high, "high").load("l", path, target=target)
    assert torch.equal(_run(high), base)


def test_lora_on_fp8_expert_keeps_adapter_in_compute_dtype(tmp_path):
    """peft would cast LoRA weights to the base layer's dtype (float8, where matmuls fail on a
    CPU and precision is lost); Fp8Linear's `compute_dtype` keeps them in the expert's dtype."""
    from deployments.models.wan.fp8 import Fp8Linear, to_fp8

    high, _ = _experts()
    to_fp8(high)
    base = _run(high)
    m = LoraManager(high, "high")
    m.load("a", write_diffusers_lora(tmp_path / "a.safetensors", lora_pairs(9)), target="high")
    assert high.blocks[0].attn1.to_q.lora_A["a"].weight.dtype == torch.float32
    assert not torch.allclose(_run(high), base, atol=1e-3)
    m.remove("a")
    assert isinstance(high.blocks[0].attn1.to_q, Fp8Linear)
    assert torch.equal(_run(high), base)
