"""LoRA per expert: key styles, targets, switching and bit-exact removal (diffusers + peft); the
profile's start-up LoRAs (lightx2v distill files: pairs, diff, diff_b, diff_m, norm diffs)."""

import re

import pytest
import torch
from safetensors.torch import save_file

from deployments.common.errors import LoraError
from deployments.config_weights import RandomWeights
from deployments.models.wan.components import load_expert
from deployments.models.wan.lora import LoraManager
from helpers import (
    LORA_RANK,
    TINY_INNER,
    WAN_LORA_NAMES,
    lora_pairs,
    run_expert,
    write_diffusers_lora,
)


def _experts(seed: int = 0):
    w = RandomWeights(arch="tiny", seed=seed)
    return (load_expert(w, "high", torch.float32, "cpu"), load_expert(w, "low", torch.float32, "cpu"))




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
    base_high, base_low = run_expert(high), run_expert(low)
    managers = {"high": LoraManager(high, "high"), "low": LoraManager(low, "low")}
    path = write_diffusers_lora(tmp_path / "style.safetensors", lora_pairs(1))

    applied = {role: m.load("style", path, strength=1.0, target="high") for role, m in managers.items()}
    assert applied == {"high": True, "low": False}
    assert not torch.allclose(run_expert(high), base_high, atol=1e-3)
    assert torch.equal(run_expert(low), base_low)
    assert managers["high"].active() == [{"name": "style", "strength": 1.0, "target": "high",
                                          "path": str(path), "permanent": False}]
    assert managers["low"].active() == []

    managers["high"].remove("style")
    assert torch.equal(run_expert(high), base_high)
    assert managers["high"].active() == [] and managers["high"].loaded() == []
    # peft's wrappers are gone: the expert is the plain base model again.
    assert type(high.blocks[0].attn1.to_q) is torch.nn.Linear


def test_both_target_applies_to_each_expert(tmp_path):
    high, low = _experts()
    base_low = run_expert(low)
    path = write_diffusers_lora(tmp_path / "l.safetensors", lora_pairs(2))
    assert LoraManager(low, "low").load("l", path, target="both")
    assert not torch.allclose(run_expert(low), base_low, atol=1e-3)


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
    out_a, out_b = run_expert(a), run_expert(b)
    torch.testing.assert_close(out_a, out_b, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out_a, run_expert(_experts()[0]), atol=1e-3)


def test_strength_switch_and_disable(tmp_path):
    high, _ = _experts()
    base = run_expert(high)
    m = LoraManager(high, "high")
    m.load("one", write_diffusers_lora(tmp_path / "1.safetensors", lora_pairs(4)), target="high")
    m.load("two", write_diffusers_lora(tmp_path / "2.safetensors", lora_pairs(5)), target="high")
    assert [a["name"] for a in m.active()] == ["one", "two"]

    m.activate(["one"], [1.0])
    only_one = run_expert(high)
    m.activate(["two"], [1.0])
    only_two = run_expert(high)
    assert not torch.allclose(only_one, only_two, atol=1e-3)
    m.activate(["one"], [0.5])
    half_one = run_expert(high)
    assert not torch.allclose(half_one, only_one, atol=1e-4)
    assert m.active() == [{"name": "one", "strength": 0.5, "target": "high",
                           "path": str(tmp_path / "1.safetensors"), "permanent": False}]
    m.activate([])
    assert torch.equal(run_expert(high), base)

    m.activate(["one"], [1.0])
    assert torch.equal(run_expert(high), only_one)  # switching back is exact
    m.remove("two")
    assert torch.equal(run_expert(high), only_one)  # removing another adapter leaves this one as is
    m.remove("one")
    assert torch.equal(run_expert(high), base)


@pytest.mark.parametrize("style", ["diffusers", "wan"])
def test_lora_matching_nothing_is_refused_and_expert_keeps_working(tmp_path, style):
    high, _ = _experts()
    base = run_expert(high)
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
    assert torch.equal(run_expert(high), base)
    # ... and a good LoRA still loads afterwards.
    assert m.load("good", write_diffusers_lora(tmp_path / "g.safetensors", lora_pairs(7)), target="high")


def test_lora_for_another_model_size_is_refused(tmp_path):
    high, _ = _experts()
    base = run_expert(high)
    wide = {(0, "q"): (torch.randn(LORA_RANK, 5120), torch.randn(5120, LORA_RANK))}
    with pytest.raises(LoraError, match="input size"):
        LoraManager(high, "high").load("wide", write_diffusers_lora(tmp_path / "w.safetensors", wide),
                                       target="high")
    assert torch.equal(run_expert(high), base)


@pytest.mark.parametrize("target", ["middle", "", "HIGH", None])
def test_invalid_target_is_refused(tmp_path, target):
    high, _ = _experts()
    base = run_expert(high)
    path = write_diffusers_lora(tmp_path / "l.safetensors", lora_pairs(8))
    with pytest.raises(LoraError, match="target"):
        LoraManager(high, "high").load("l", path, target=target)
    assert torch.equal(run_expert(high), base)


def test_lora_on_fp8_expert_keeps_adapter_in_compute_dtype(tmp_path):
    """peft would cast LoRA weights to the base layer's dtype (float8, where matmuls fail on a
    CPU and precision is lost); Fp8Linear's `compute_dtype` keeps them in the expert's dtype."""
    from deployments.models.wan.fp8 import Fp8Linear, to_fp8

    high, _ = _experts()
    to_fp8(high)
    base = run_expert(high)
    m = LoraManager(high, "high")
    m.load("a", write_diffusers_lora(tmp_path / "a.safetensors", lora_pairs(9)), target="high")
    assert high.blocks[0].attn1.to_q.lora_A["a"].weight.dtype == torch.float32
    assert not torch.allclose(run_expert(high), base, atol=1e-3)
    m.remove("a")
    assert isinstance(high.blocks[0].attn1.to_q, Fp8Linear)
    assert torch.equal(run_expert(high), base)


# ------------------------------------------------------------------ lightx2v-style files: every key applied
#
# What LightX2V applies (lightx2v/utils/lora_loader.py `LoRALoader.apply_lora`, ModelTC/LightX2V):
#   W += strength * alpha / rank * up @ down   for X.lora_down.weight / X.lora_up.weight / X.alpha
#   X.weight += strength * X.diff,  X.bias += strength * X.diff_b,  X.modulation += strength * X.diff_m
# Keys are original Wan names, `diffusion_model.`-prefixed (lightx2v/Wan2.2-Distill-Loras, Kijai).

# Original Wan parameter -> diffusers parameter of the tiny expert, for the deltas below.
DELTA_TARGETS = {
    "blocks.0.ffn.2.diff": "blocks.0.ffn.net.2.weight",             # a linear's full weight delta
    "blocks.0.self_attn.q.diff_b": "blocks.0.attn1.to_q.bias",      # bias of a linear with a pair
    "blocks.1.cross_attn.o.diff_b": "blocks.1.attn2.to_out.0.bias",  # bias of a linear without one
    "blocks.0.norm3.diff": "blocks.0.norm2.weight",                 # the cross-attention norm
    "blocks.0.norm3.diff_b": "blocks.0.norm2.bias",
    "blocks.1.self_attn.norm_q.diff": "blocks.1.attn1.norm_q.weight",  # qk RMS norms
    "blocks.1.cross_attn.norm_k.diff": "blocks.1.attn2.norm_k.weight",
    "blocks.0.diff_m": "blocks.0.scale_shift_table",                # block modulation
    "head.diff_m": "scale_shift_table",                             # head modulation
    "head.head.diff": "proj_out.weight",
    "head.head.diff_b": "proj_out.bias",
}
# What some lightx2v I2V files also carry: Wan2.1's image cross-attention, which a Wan2.2 I2V
# expert does not have. All zeros here, so skipping them loses nothing.
ZERO_ABSENT = ("blocks.0.cross_attn.norm_k_img.diff", "blocks.0.cross_attn.k_img.lora_down.weight",
               "blocks.0.cross_attn.k_img.lora_up.weight", "blocks.0.cross_attn.k_img.alpha")


def lightx2v_lora(seed: int = 11, alpha: float = 2.0, zero_absent: bool = True):
    """A lightx2v/Kijai-style state dict for the tiny expert: lora_down/lora_up/alpha pairs on
    self-attn q/v and ffn.0 of both blocks, plus every kind of delta (DELTA_TARGETS)."""
    g = torch.Generator().manual_seed(seed)
    base = _experts()[0].state_dict()
    sd = {}
    for (i, name), (down, up) in lora_pairs(seed).items():
        key = f"diffusion_model.blocks.{i}.{WAN_LORA_NAMES[name]}"
        sd[f"{key}.lora_down.weight"], sd[f"{key}.lora_up.weight"] = down, up
        sd[f"{key}.alpha"] = torch.tensor(alpha)
    for key, target in DELTA_TARGETS.items():
        sd[f"diffusion_model.{key}"] = torch.randn(base[target].shape, generator=g) * 0.2
    if zero_absent:
        sd["diffusion_model.blocks.0.cross_attn.norm_k_img.diff"] = torch.zeros(TINY_INNER)
        sd["diffusion_model.blocks.0.cross_attn.k_img.lora_down.weight"] = torch.randn(LORA_RANK, 32,
                                                                                      generator=g)
        sd["diffusion_model.blocks.0.cross_attn.k_img.lora_up.weight"] = torch.zeros(TINY_INNER, LORA_RANK)
        sd["diffusion_model.blocks.0.cross_attn.k_img.alpha"] = torch.tensor(alpha)
    return sd


def apply_by_hand(state_dict: dict, lora: dict, strength: float, deltas=DELTA_TARGETS) -> dict:
    """The LightX2V formulas above, typed out on a diffusers state dict (names spelled out here,
    independent of the converter under test): the pairs, and the `deltas` of DELTA_TARGETS."""
    out = {k: v.clone() for k, v in state_dict.items()}
    wan_to_ours = {"self_attn.q": "attn1.to_q", "self_attn.v": "attn1.to_v", "ffn.0": "ffn.net.0.proj"}
    for i in range(2):
        for wan, ours in wan_to_ours.items():
            key = f"diffusion_model.blocks.{i}.{wan}"
            down, up = lora[f"{key}.lora_down.weight"], lora[f"{key}.lora_up.weight"]
            scale = float(lora[f"{key}.alpha"]) / down.shape[0]
            out[f"blocks.{i}.{ours}.weight"] += strength * scale * up @ down
    for key, target in dict(deltas).items():
        out[target] += strength * lora[f"diffusion_model.{key}"]
    return out


def _reference(lora: dict, strength: float):
    model = _experts()[0]
    model.load_state_dict(apply_by_hand(model.state_dict(), lora, strength))
    return model


@pytest.mark.parametrize("strength", [1.0, 0.7])
def test_lightx2v_file_applied_at_start_up_equals_the_math_by_hand(tmp_path, strength, caplog):
    from deployments.models.wan.lora_fuse import describe, fuse_deltas
    from deployments.models.wan.lora_match import prepare_lora

    lora = lightx2v_lora()
    path = tmp_path / "distill.safetensors"
    save_file(lora, str(path))
    high, _ = _experts()
    base = run_expert(high)

    prepared = prepare_lora(high, "distill", path, strength, "high")
    # Every tensor of the file accounted for: 6 pairs (x3 keys) as adapter, 11 deltas, 4 skipped.
    assert len(prepared.adapter) == 12 and len(prepared.deltas) == len(DELTA_TARGETS)
    assert sorted(prepared.skipped) == sorted(f"diffusion_model.{k}" for k in ZERO_ABSENT)
    assert prepared.n_tensors == 18 + len(DELTA_TARGETS) + len(ZERO_ABSENT) == len(lora)
    assert torch.equal(run_expert(high), base)  # checking applies nothing

    stats = fuse_deltas(high, prepared)
    assert (stats["weight"], stats["bias"], stats["norm"], stats["modulation"]) == (2, 3, 4, 2)
    manager = LoraManager(high, "high")
    manager.load_permanent(prepared)
    line = describe(prepared, stats)
    assert "6 low-rank pairs" in line and "4 all-zero tensors" in line

    out = run_expert(high)
    torch.testing.assert_close(out, run_expert(_reference(lora, strength)), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out, base, atol=1e-2)
    # The unfused pairs are peft adapters at the configured strength; the deltas are in the weights.
    assert type(high.blocks[0].attn1.to_q).__module__.startswith("peft")
    assert manager.active() == [{"name": "distill", "strength": strength, "target": "high",
                                 "path": str(path), "permanent": True}]


def test_diffusers_converter_drops_what_the_admin_path_refuses(tmp_path):
    """diffusers' `WanLoraLoaderMixin.lora_state_dict` loses the norm diffs, diff_m and linear
    diffs of such a file with no error; an admin load (unfused, must be removable) cannot hold
    them either, so it refuses and names them instead of dropping them."""
    from diffusers.loaders import WanLoraLoaderMixin

    lora = lightx2v_lora(zero_absent=False)
    converted = WanLoraLoaderMixin.lora_state_dict(dict(lora))
    assert not any("norm" in k for k in converted)            # blocks.0.norm3.diff: gone
    assert not any("scale_shift" in k or "diff" in k for k in converted)  # diff_m, ffn.2.diff: gone

    path = tmp_path / "distill.safetensors"
    save_file(lora, str(path))
    high, _ = _experts()
    base = run_expert(high)
    m = LoraManager(high, "high")
    with pytest.raises(LoraError, match=r"norm3\.diff") as exc:
        m.load("distill", path, target="high")
    assert "stages.<role>.loras" in str(exc.value) and "diff_m" in str(exc.value)
    assert m.loaded() == [] and torch.equal(run_expert(high), base)


def test_admin_lora_with_pair_biases_is_unfused_and_removable(tmp_path):
    """An admin (removable) LoRA may carry diff_b on the linears it has pairs for: they ride on
    lora_B as biases (peft's lora_bias) at the same strength; removal restores the base exactly."""
    full = lightx2v_lora(zero_absent=False)
    keep = [k for k in full if ".lora_" in k or k.endswith(".alpha")]
    keep.append("diffusion_model.blocks.0.self_attn.q.diff_b")
    lora = {k: full[k] for k in keep}
    path = tmp_path / "pairs.safetensors"
    save_file(lora, str(path))
    high, _ = _experts()
    base = run_expert(high)
    m = LoraManager(high, "high")
    m.load("pairs", path, strength=0.5, target="high")

    reference = _experts()[0]
    reference.load_state_dict(apply_by_hand(reference.state_dict(), full, 0.5, deltas={
        "blocks.0.self_attn.q.diff_b": "blocks.0.attn1.to_q.bias"}))
    torch.testing.assert_close(run_expert(high), run_expert(reference), rtol=1e-5, atol=1e-5)
    m.remove("pairs")
    assert torch.equal(run_expert(high), base)


@pytest.mark.parametrize("bad_key,value,why", [
    # a part Wan2.2 I2V lacks (Wan2.1's image cross-attention), with a non-zero delta
    ("diffusion_model.blocks.0.cross_attn.norm_k_img.diff", torch.ones(TINY_INNER), "no parameter"),
    # a layer this expert lacks (block 7 of a 2-block expert)
    ("diffusion_model.blocks.7.norm3.diff", torch.ones(TINY_INNER), "no parameter"),
    # a delta of the wrong shape (another model size)
    ("diffusion_model.blocks.0.norm3.diff", torch.ones(5120), "shape"),
    # kinds LightX2V does not apply: LoCon's mid, DoRA's scale, half a pair
    ("diffusion_model.blocks.0.self_attn.k.lora_mid.weight", torch.ones(4, 4), "not a LoRA tensor"),
    ("diffusion_model.blocks.0.self_attn.k.dora_scale", torch.ones(1, TINY_INNER), "not a LoRA tensor"),
    ("diffusion_model.blocks.0.self_attn.k.lora_down.weight", torch.ones(LORA_RANK, TINY_INNER), "half of a pair"),
])
def test_a_key_that_cannot_be_applied_is_refused_by_name(tmp_path, bad_key, value, why):
    from deployments.models.wan.lora_match import prepare_lora

    lora = {**lightx2v_lora(), bad_key: value}
    save_file(lora, str(tmp_path / "bad.safetensors"))
    high, _ = _experts()
    base = run_expert(high)
    with pytest.raises(LoraError, match=re.escape(bad_key)) as exc:
        prepare_lora(high, "bad", tmp_path / "bad.safetensors", 1.0, "high")
    assert why in str(exc.value) and "would be lost" in str(exc.value)
    assert torch.equal(run_expert(high), base)


def test_permanent_lora_survives_admin_calls(tmp_path):
    from deployments.models.wan.lora_fuse import fuse_deltas
    from deployments.models.wan.lora_match import prepare_lora

    save_file(lightx2v_lora(), str(tmp_path / "distill.safetensors"))
    high, _ = _experts()
    m = LoraManager(high, "high")
    prepared = prepare_lora(high, "distill", tmp_path / "distill.safetensors", 1.0, "high")
    fuse_deltas(high, prepared)
    m.load_permanent(prepared)
    recipe = run_expert(high)

    m.activate([])                      # "no LoRAs": the profile's stays
    assert torch.equal(run_expert(high), recipe)
    with pytest.raises(LoraError, match="part of the profile"):
        m.remove("distill")
    with pytest.raises(LoraError, match="always active"):
        m.activate(["distill"], [0.5])

    m.load("style", write_diffusers_lora(tmp_path / "s.safetensors", lora_pairs(3)), target="high")
    assert [a["name"] for a in m.active()] == ["distill", "style"]
    assert not torch.allclose(run_expert(high), recipe, atol=1e-3)
    m.activate([])
    assert torch.equal(run_expert(high), recipe)
    m.remove("style")
    assert torch.equal(run_expert(high), recipe) and m.loaded() == ["distill"]


def test_gguf_expert_takes_pairs_unfused_and_weight_diffs_on_dequantised_linears(tmp_path):
    """GGUF-quantised linears cannot take a weight delta in their quantised form: the linear a
    `diff` names becomes a plain linear holding its dequantised weight plus the delta; pairs stay
    unfused adapters on the quantised linears. Checked against the dequantised expert + the math."""
    import gguf
    from diffusers import WanTransformer3DModel
    from diffusers.quantizers.gguf.utils import GGUFLinear
    from models.test_checkpoints import GGUF_EXPERT, _config_dir, _write_gguf

    from deployments.config_weights import GGUFWeights
    from deployments.models.wan.lora_fuse import fuse_deltas
    from deployments.models.wan.lora_match import prepare_lora

    torch.manual_seed(6)
    source = WanTransformer3DModel(**GGUF_EXPERT).eval()
    cfg = _config_dir(tmp_path, source, "transformer")
    dequantised = _write_gguf(tmp_path / "high.gguf", source.state_dict(), gguf.GGMLQuantizationType.Q8_0)
    expert = load_expert(GGUFWeights(repo=str(tmp_path), filename="high.gguf", config=str(cfg)),
                         "high", torch.float32, "cpu")
    inner, ffn = 256, 256
    g = torch.Generator().manual_seed(3)
    lora = {
        "diffusion_model.blocks.0.self_attn.q.lora_down.weight": torch.randn(8, inner, generator=g) * 0.05,
        "diffusion_model.blocks.0.self_attn.q.lora_up.weight": torch.randn(inner, 8, generator=g) * 0.05,
        "diffusion_model.blocks.0.self_attn.q.alpha": torch.tensor(4.0),
        "diffusion_model.blocks.0.ffn.2.diff": torch.randn(inner, ffn, generator=g) * 0.01,
        "diffusion_model.blocks.0.ffn.2.diff_b": torch.randn(inner, generator=g) * 0.01,
        "diffusion_model.blocks.0.norm3.diff": torch.randn(inner, generator=g) * 0.1,
    }
    save_file(lora, str(tmp_path / "l.safetensors"))
    assert isinstance(expert.blocks[0].ffn.net[2], GGUFLinear)
    prepared = prepare_lora(expert, "l", tmp_path / "l.safetensors", 1.0, "high")
    stats = fuse_deltas(expert, prepared)
    assert stats["dequantised"] == 1 and stats["dequantised_bytes"] == inner * ffn * 4
    assert type(expert.blocks[0].ffn.net[2]) is torch.nn.Linear
    LoraManager(expert, "high").load_permanent(prepared)
    assert isinstance(expert.blocks[0].attn1.to_q.base_layer, GGUFLinear)  # still quantised

    reference = WanTransformer3DModel(**GGUF_EXPERT).eval()
    sd = {**source.state_dict(), **dequantised}
    q = "diffusion_model.blocks.0.self_attn.q"
    sd["blocks.0.attn1.to_q.weight"] = (sd["blocks.0.attn1.to_q.weight"]
                                        + 4.0 / 8 * lora[f"{q}.lora_up.weight"] @ lora[f"{q}.lora_down.weight"])
    for wan, ours in (("ffn.2.diff", "ffn.net.2.weight"), ("ffn.2.diff_b", "ffn.net.2.bias"),
                      ("norm3.diff", "norm2.weight")):
        sd[f"blocks.0.{ours}"] = sd[f"blocks.0.{ours}"] + lora[f"diffusion_model.blocks.0.{wan}"]
    reference.load_state_dict(sd)
    g = torch.Generator().manual_seed(0)
    inputs = (torch.randn(1, 36, 1, 4, 4, generator=g), torch.tensor([800.0]),
              torch.randn(1, 8, 32, generator=g))
    # diffusers dequantises GGUF in fp16, so the two agree to fp16 rounding (test_checkpoints).
    torch.testing.assert_close(run_expert(expert, inputs), run_expert(reference, inputs), rtol=1e-4, atol=2e-4)


def test_profile_start_up_loras_load_at_start(tmp_path):
    """The tiny profile with `stages.high.loras` pointing at a written lightx2v-style file: the
    expert applies it before serving, lists it as permanent, and computes the LoRA'd model."""
    from deployments.dit_expert import DitExpert
    from deployments.models import download as dl
    from deployments.profiles import load_profile

    lora = lightx2v_lora()
    path = tmp_path / "wan2.2_high_lora.safetensors"
    save_file(lora, str(path))
    cfg = load_profile("tiny", {"stages": {"high": {"loras": [{"filename": str(path), "strength": 0.7}]}}})
    assert [(n.stage, n.source, n.path) for n in dl.needs(cfg)] == [("high", None, str(path))]
    dl.check_weights_present(cfg, "tiny")   # a local file: checked, nothing to fetch
    assert dl.plan(cfg) == []

    high = DitExpert(cfg.stages.high, cfg.sampler, "high")
    low = DitExpert(cfg.stages.low, cfg.sampler, "low")
    assert high.list_loras()["active"] == [{"name": "wan2_2_high_lora", "strength": 0.7, "target": "high",
                                            "path": str(path), "permanent": True}]
    assert low.list_loras()["active"] == []
    torch.testing.assert_close(run_expert(high.transformer), run_expert(_reference(lora, 0.7)), rtol=1e-5, atol=1e-5)
    assert torch.equal(run_expert(low.transformer), run_expert(_experts()[1]))

    # A file that cannot be applied stops the start-up, naming the key.
    save_file({**lora, "diffusion_model.blocks.9.norm3.diff": torch.ones(TINY_INNER)}, str(path))
    with pytest.raises(LoraError, match=r"blocks\.9\.norm3\.diff"):
        DitExpert(cfg.stages.high, cfg.sampler, "high")


def test_non_zero_tensors_for_absent_parts_need_the_profiles_leave(tmp_path, caplog):
    """Non-zero Wan2.1 image cross-attention tensors (k_img / v_img pairs, norm_k_img diffs) on a
    Wan2.2 expert, which has none: refused by default; skipped, counted and logged as a warning
    when the start-up LoRA's `skip_absent` patterns name them; the rest applied as by hand."""
    import logging

    from deployments.dit_expert import DitExpert
    from deployments.models.wan.lora_match import prepare_lora
    from deployments.profiles import load_profile

    g = torch.Generator().manual_seed(5)
    lora = lightx2v_lora(zero_absent=False)
    at = "diffusion_model.blocks.1.cross_attn"
    img = {f"{at}.k_img.lora_down.weight": torch.randn(LORA_RANK, 32, generator=g),
           f"{at}.k_img.lora_up.weight": torch.randn(TINY_INNER, LORA_RANK, generator=g),
           f"{at}.v_img.diff_b": torch.randn(TINY_INNER, generator=g),
           f"{at}.norm_k_img.diff": torch.randn(TINY_INNER, generator=g)}
    path = tmp_path / "low.safetensors"
    save_file({**lora, **img}, str(path))
    with pytest.raises(LoraError, match=r"k_img\.lora_down\.weight.*no linear layer"):
        prepare_lora(_experts()[1], "x", path, 1.0, "low")
    # A pattern never hides a tensor for a part the expert has: a bad shape is still refused.
    bad_shape = {"diffusion_model.blocks.0.cross_attn.k.diff_b": torch.ones(7)}
    save_file({**lora, **img, **bad_shape}, str(tmp_path / "b.safetensors"))
    with pytest.raises(LoraError, match=r"cross_attn\.k\.diff_b: shape"):
        prepare_lora(_experts()[1], "x", tmp_path / "b.safetensors", 1.0, "low", ["*"])

    patterns = ["*.k_img.*", "*.v_img.*", "*.norm_k_img.*"]
    cfg = load_profile("tiny", {"stages": {"low": {"loras": [
        {"filename": str(path), "name": "distill", "skip_absent": patterns}]}}})
    with caplog.at_level(logging.WARNING, logger="avatar_serve.dit_expert"):
        low = DitExpert(cfg.stages.low, cfg.sampler, "low")
    assert "4 NON-ZERO tensors for parts this expert lacks skipped" in caplog.text
    reference = _experts()[1]
    reference.load_state_dict(apply_by_hand(reference.state_dict(), lora, 1.0))
    torch.testing.assert_close(run_expert(low.transformer), run_expert(reference), rtol=1e-5, atol=1e-5)
