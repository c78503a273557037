"""Single-file expert checkpoints (original Wan key names): bf16/fp32 and fp8 safetensors, GGUF.

Every test writes its own checkpoint from a tiny random expert. The original-name layout is
produced by `original_name` below, an inverse of diffusers' Wan converter typed out here from the
Wan/diffusers module names, so the loader (which reuses diffusers' forward table) is checked
against an independent path.
"""

import re

import gguf
import numpy as np
import pytest
import torch
from diffusers import WanTransformer3DModel
from safetensors.torch import save_file

from deployments.config_weights import GGUFWeights, RandomWeights, WanSafetensorsWeights
from deployments.models.hub import MissingWeightsError
from deployments.models.wan.checkpoints import CheckpointError
from deployments.models.wan.components import TINY, load_expert
from deployments.models.wan.fp8 import FP8, Fp8Linear, dequantize_linear_weight, quantize_linear_weight

# ------------------------------------------------------------------ the inverse name mapping

_TOP = [("condition_embedder.time_embedder.linear_1.", "time_embedding.0."),
        ("condition_embedder.time_embedder.linear_2.", "time_embedding.2."),
        ("condition_embedder.text_embedder.linear_1.", "text_embedding.0."),
        ("condition_embedder.text_embedder.linear_2.", "text_embedding.2."),
        ("condition_embedder.time_proj.", "time_projection.1."),
        ("proj_out.", "head.head.")]
# Inside a block. diffusers' norm2 is the cross-attention norm, Wan's norm3 (and vice versa).
_BLOCK_PREFIX = [("attn1.", "self_attn."), ("attn2.", "cross_attn."), ("norm2.", "norm3."),
                 ("ffn.net.0.proj.", "ffn.0."), ("ffn.net.2.", "ffn.2.")]
_ATTN = [(".to_q.", ".q."), (".to_k.", ".k."), (".to_v.", ".v."), (".to_out.0.", ".o.")]


def original_name(key: str) -> str:
    """diffusers WanTransformer3DModel key -> original Wan key."""
    if key == "scale_shift_table":
        return "head.modulation"
    for new, old in _TOP:
        if key.startswith(new):
            return old + key[len(new):]
    m = re.fullmatch(r"blocks\.(\d+)\.(.+)", key)
    if m is None:
        return key  # patch_embedding.*
    rest = m.group(2)
    if rest == "scale_shift_table":
        return f"blocks.{m.group(1)}.modulation"
    for new, old in _BLOCK_PREFIX:
        if rest.startswith(new):
            rest = old + rest[len(new):]
            break
    for new, old in _ATTN:
        rest = rest.replace(new, old)
    return f"blocks.{m.group(1)}.{rest}"


def test_inverse_names_look_like_wan():
    names = {original_name(k) for k in _expert(0, torch.float32).state_dict()}
    for key in ("patch_embedding.weight", "text_embedding.0.weight", "time_embedding.0.weight",
                "time_projection.1.weight", "blocks.0.self_attn.q.weight",
                "blocks.0.self_attn.norm_q.weight", "blocks.0.cross_attn.k.weight",
                "blocks.0.cross_attn.o.bias", "blocks.0.ffn.0.weight", "blocks.0.ffn.2.bias",
                "blocks.0.modulation", "blocks.0.norm3.weight", "head.head.weight",
                "head.modulation"):
        assert key in names, key


# ------------------------------------------------------------------ fixtures and helpers


def _expert(seed: int, dtype: torch.dtype, role: str = "high") -> WanTransformer3DModel:
    return load_expert(RandomWeights(arch="tiny", seed=seed), role, dtype, "cpu")


def _config_dir(tmp_path, model, subfolder: str = "transformer"):
    root = tmp_path / "config"
    model.save_config(root / subfolder)
    return root


def _inputs(dtype: torch.dtype, seed: int = 0, frames: int = 3, size: int = 8):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 36, frames, size, size, generator=g).to(dtype)
    ctx = torch.randn(1, 8, 32, generator=g).to(dtype)
    return x, torch.tensor([600.0]), ctx


@torch.no_grad()
def _run(model, inputs):
    x, t, ctx = inputs
    return model(hidden_states=x, timestep=t, encoder_hidden_states=ctx, return_dict=False)[0]


def _rel(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def _write_original(path, state_dict, prefix: str = ""):
    save_file({prefix + original_name(k): v.contiguous() for k, v in state_dict.items()}, str(path))


# ------------------------------------------------------------------ bf16 / fp32 safetensors


@pytest.mark.parametrize("dtype,role,prefix", [(torch.bfloat16, "high", ""),
                                               (torch.float32, "low", "model.diffusion_model.")])
def test_original_key_safetensors_load_exactly(tmp_path, dtype, role, prefix):
    """Written from a tiny expert (its own mixed bf16/fp32 tensors), loaded in the same dtype:
    every tensor and the output are bit-identical; keep-in-fp32 modules stay fp32."""
    source = _expert(1, dtype, role)
    subfolder = "transformer" if role == "high" else "transformer_2"
    cfg = _config_dir(tmp_path, source, subfolder)
    _write_original(tmp_path / "expert.safetensors", source.state_dict(), prefix)

    weights = WanSafetensorsWeights(repo=str(tmp_path), filename="expert.safetensors", config=str(cfg))
    loaded = load_expert(weights, role, dtype, "cpu")

    src_sd, got_sd = source.state_dict(), loaded.state_dict()
    assert set(src_sd) == set(got_sd)
    for k, v in src_sd.items():
        assert got_sd[k].dtype == v.dtype, k
        assert torch.equal(got_sd[k], v), k
    assert not any(p.device.type == "meta" for p in loaded.parameters())
    assert loaded.blocks[0].norm2.weight.dtype == torch.float32
    assert loaded.condition_embedder.time_embedder.linear_1.weight.dtype == torch.float32
    assert loaded.rope.freqs_cos.dtype == source.rope.freqs_cos.dtype
    inputs = _inputs(dtype)
    assert torch.equal(_run(loaded, inputs), _run(source, inputs))


def test_bf16_file_keeps_fp32_modules_in_fp32(tmp_path):
    """A file storing everything in bf16 still yields fp32 norms, modulation and time embedder
    (what `from_pretrained(torch_dtype=bf16)` does), holding the bf16 values exactly."""
    source = _expert(2, torch.float32)
    cfg = _config_dir(tmp_path, source)
    all_bf16 = {k: v.to(torch.bfloat16) for k, v in source.state_dict().items()}
    _write_original(tmp_path / "e.safetensors", all_bf16)
    loaded = load_expert(WanSafetensorsWeights(repo=str(tmp_path), filename="e.safetensors",
                                               config=str(cfg)), "high", torch.bfloat16, "cpu")
    sd = loaded.state_dict()
    for k in ("scale_shift_table", "blocks.0.scale_shift_table", "blocks.1.norm2.weight",
              "condition_embedder.time_embedder.linear_2.weight"):
        assert sd[k].dtype == torch.float32, k
        assert torch.equal(sd[k], all_bf16[k].float()), k
    assert sd["blocks.0.attn1.to_q.weight"].dtype == torch.bfloat16
    assert torch.isfinite(_run(loaded, _inputs(torch.bfloat16))).all()


def test_file_missing_a_tensor_is_refused(tmp_path):
    source = _expert(3, torch.float32)
    cfg = _config_dir(tmp_path, source)
    sd = dict(source.state_dict())
    del sd["blocks.1.attn2.to_v.weight"]
    _write_original(tmp_path / "e.safetensors", sd)
    with pytest.raises(CheckpointError, match="missing"):
        load_expert(WanSafetensorsWeights(repo=str(tmp_path), filename="e.safetensors",
                                          config=str(cfg)), "high", torch.float32, "cpu")


# ------------------------------------------------------------------ fp8 + weight_scale

_FP8_LINEARS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q",
                "attn2.to_k", "attn2.to_v", "attn2.to_out.0", "ffn.net.0.proj", "ffn.net.2")


def test_fp8_scaled_safetensors_load_as_fp8_linears(tmp_path):
    """lightx2v layout: block linears as e4m3 `weight` + fp32 per-channel `weight_scale` (some
    (out,), some (out, 1)); everything else bf16. Loaded in fp32 compute on the CPU.

    Two checks: (1) exact: the loaded expert equals the source with each quantised weight replaced
    by its dequantised value (fp8 * scale), which pins names, scale shapes and the kept-resident
    fp8 bytes; (2) close to the unquantised source: e4m3 keeps 3 mantissa bits, so rounding moves
    a weight by at most 2**-4 relative and by about 2**-3/sqrt(12) ~ 3.6% rms; dot products over
    many weights average these independent errors and LayerNorm/the residual path dilute them
    further (measured here: 0.8%), so 5% is a safe bound, while a wrong, transposed or missing
    scale gives errors of order 100%.
    """
    source = _expert(4, torch.float32)
    cfg = _config_dir(tmp_path, source)
    sd = {k: v.to(torch.bfloat16) if not k.startswith("blocks.") or "scale_shift" in k or "norm" in k
          else v for k, v in source.state_dict().items()}
    reference = _expert(4, torch.float32)  # gets the dequantised weights below
    file_sd = {}
    for k, v in sd.items():
        module = k.rsplit(".", 1)[0]
        if k.endswith(".weight") and module.split(".", 2)[-1] in _FP8_LINEARS:
            w_fp8, scale = quantize_linear_weight(v)
            if "attn2" in module:  # both scale layouts seen in the wild
                scale = scale[:, None]
            file_sd[k] = w_fp8
            file_sd[module + ".weight_scale"] = scale
            reference.get_submodule(module).weight.data = dequantize_linear_weight(w_fp8, scale)
        else:
            file_sd[k] = v.to(torch.bfloat16)
            ref_param = reference.get_parameter(k)
            ref_param.data = v.to(torch.bfloat16).to(ref_param.dtype)
    _write_original(tmp_path / "fp8.safetensors", file_sd)

    loaded = load_expert(WanSafetensorsWeights(repo=str(tmp_path), filename="fp8.safetensors",
                                               config=str(cfg)), "high", torch.float32, "cpu")
    q = loaded.blocks[1].attn2.to_v
    assert isinstance(q, Fp8Linear) and q.weight.dtype == FP8
    assert q.weight_scale.shape == (q.out_features,) and q.weight_scale.dtype == torch.float32
    assert torch.equal(q.weight, file_sd["blocks.1.attn2.to_v.weight"])
    n_fp8 = sum(isinstance(m, Fp8Linear) for m in loaded.modules())
    assert n_fp8 == len(_FP8_LINEARS) * TINY["expert"]["num_layers"]
    assert type(loaded.proj_out) is torch.nn.Linear

    inputs = _inputs(torch.float32)
    out = _run(loaded, inputs)
    assert torch.equal(out, _run(reference, inputs))
    rel = _rel(out, _run(source, inputs))
    assert rel < 0.05, rel


def test_fp8_weight_without_scale_is_refused(tmp_path):
    source = _expert(5, torch.float32)
    cfg = _config_dir(tmp_path, source)
    sd = dict(source.state_dict())
    sd["blocks.0.attn1.to_q.weight"] = sd["blocks.0.attn1.to_q.weight"].to(FP8)
    _write_original(tmp_path / "e.safetensors", sd)
    with pytest.raises(CheckpointError, match="weight_scale"):
        load_expert(WanSafetensorsWeights(repo=str(tmp_path), filename="e.safetensors",
                                          config=str(cfg)), "high", torch.float32, "cpu")


# ------------------------------------------------------------------ GGUF

# A tiny expert whose block linears take 256 inputs (2 heads x 128, ffn 256): GGUF quantises
# along rows in blocks of 32 (Q8_0) or 256 (K-quants).
GGUF_EXPERT = dict(TINY["expert"], attention_head_dim=128, ffn_dim=256, num_layers=1)


def quantize_q6_k(a: np.ndarray) -> np.ndarray:
    """float32 (rows, cols), cols % 256 == 0 -> Q6_K bytes (rows, cols // 256 * 210).

    gguf 0.19 can dequantise K-quants in numpy but not write them, so the test encodes Q6_K
    itself (a plain round-to-nearest, not llama.cpp's search) following the block layout that
    `gguf.quants.Q6_K.dequantize_blocks` reads: 128 bytes of low nibbles, 64 bytes of high
    2-bit pairs, 16 int8 sub-block scales, one fp16 super-scale d; value = d * sc * (q - 32).
    """
    rows = a.shape[0]
    blocks = a.astype(np.float32).reshape(-1, 256)
    n = blocks.shape[0]
    sub = blocks.reshape(n, 16, 16)
    sub_scale = np.abs(sub).max(axis=-1) / 31.0                   # (n, 16), |q - 32| <= 31
    d = (sub_scale.max(axis=-1) / 127.0).astype(np.float16)        # (n,)
    df = d.astype(np.float32)
    sc = np.clip(np.round(np.divide(sub_scale, df[:, None], out=np.zeros_like(sub_scale),
                                    where=df[:, None] > 0)), -128, 127).astype(np.int8)
    step = df[:, None] * sc.astype(np.float32)                     # (n, 16)
    q = np.round(np.divide(sub, step[..., None], out=np.zeros_like(sub), where=step[..., None] > 0))
    q = (np.clip(q, -32, 31) + 32).astype(np.uint8).reshape(n, 256)
    low, high = q & 0x0F, q >> 4
    ql = np.zeros((n, 128), np.uint8)
    qh = np.zeros((n, 64), np.uint8)
    for h in range(2):                  # two halves of 128 values
        for s in range(2):              # value h*128 + s*64 + j -> nibble s of ql[h*64 + j]
            ql[:, h * 64:(h + 1) * 64] |= low[:, h * 128 + s * 64: h * 128 + s * 64 + 64] << (4 * s)
        for s in range(4):              # value h*128 + s*32 + j -> bits 2s..2s+1 of qh[h*32 + j]
            qh[:, h * 32:(h + 1) * 32] |= high[:, h * 128 + s * 32: h * 128 + s * 32 + 32] << (2 * s)
    out = np.concatenate([ql, qh, sc.view(np.uint8), d.view(np.uint8).reshape(n, 2)], axis=1)
    return out.reshape(rows, -1)


def _quantize(a: np.ndarray, qtype) -> np.ndarray:
    if qtype == gguf.GGMLQuantizationType.Q6_K:
        return quantize_q6_k(a)
    return gguf.quants.quantize(a, qtype)


def _write_gguf(path, state_dict, qtype) -> dict:
    """ComfyUI-GGUF layout: original Wan names, `general.architecture` "wan", quantised block
    linears, F32 for everything else (1-D tensors, embeddings, the 5-D patch embedding).
    Returns {diffusers name: dequantised weight} for the quantised tensors (via gguf's numpy
    dequantiser, independent of diffusers' torch one)."""
    writer = gguf.GGUFWriter(str(path), arch="wan")
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if qtype == gguf.GGMLQuantizationType.Q8_0
                         else gguf.LlamaFileType.MOSTLY_Q6_K)
    dequantised = {}
    for k, v in state_dict.items():
        a = v.float().numpy()
        if k.startswith("blocks.") and k.endswith(".weight") and a.ndim == 2:
            data = _quantize(a, qtype)
            writer.add_tensor(original_name(k), data, raw_dtype=qtype)
            dequantised[k] = torch.from_numpy(gguf.quants.dequantize(data, qtype))
        else:
            writer.add_tensor(original_name(k), a)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dequantised


def test_q6_k_encoder_roundtrips_through_gguf_dequantiser():
    a = np.random.default_rng(0).standard_normal((4, 512)).astype(np.float32)
    back = gguf.quants.dequantize(quantize_q6_k(a), gguf.GGMLQuantizationType.Q6_K)
    # Round-to-nearest on a step of at most amax/31 * (1 + 1/127 rounding of the scale).
    assert np.abs(back - a).max() <= np.abs(a).max() / 62 * 1.1
    assert np.abs(back - a).max() > 0


# Tolerances vs the unquantised source (relative L2 of the output). Q8_0 rounds each weight to a
# step of amax/127 per 32 values: rms error step/sqrt(12), with amax ~ 2.1 sigma for 32 Gaussian
# values, ~0.5% of the weights' rms; Q6_K (round to nearest) a step of amax/31 per 16 values
# (amax ~ 1.8 sigma): ~1.7%. Errors of independent weights average out in dot products (measured
# output errors: 0.05% and 0.2%), so 0.5% and 2% leave 10x headroom yet fail on any mis-decoded
# block or misplaced nibble.
@pytest.mark.parametrize("qtype,tol", [(gguf.GGMLQuantizationType.Q8_0, 0.005),
                                       (gguf.GGMLQuantizationType.Q6_K, 0.02)])
def test_gguf_expert_loads_through_diffusers(tmp_path, qtype, tol):
    torch.manual_seed(6)
    source = WanTransformer3DModel(**GGUF_EXPERT).eval()
    cfg = _config_dir(tmp_path, source, "transformer_2")
    dequantised = _write_gguf(tmp_path / "low.gguf", source.state_dict(), qtype)
    assert len(dequantised) == 10  # every block linear is quantised

    loaded = load_expert(GGUFWeights(repo=str(tmp_path), filename="low.gguf", config=str(cfg)),
                         "low", torch.float32, "cpu")
    from diffusers.quantizers.gguf.utils import GGUFLinear
    layer = loaded.blocks[0].ffn.net[2]
    assert isinstance(layer, GGUFLinear) and layer.weight.quant_type == qtype
    assert loaded.blocks[0].scale_shift_table.dtype == torch.float32

    # diffusers' torch dequantiser reads the same values as gguf's numpy dequantiser. diffusers
    # 0.42.1 dequantises in fp16 (then casts to compute_dtype), so the two agree to fp16's
    # 2**-11 relative rounding (one extra rounding for Q6_K's d * scale product).
    from diffusers.quantizers.gguf.utils import dequantize_gguf_tensor
    for name, weight in dequantised.items():
        module = loaded.get_submodule(name.rsplit(".", 1)[0])
        torch.testing.assert_close(dequantize_gguf_tensor(module.weight).float(), weight,
                                   rtol=2 ** -10, atol=1e-7, msg=name)

    # The same expert with those dequantised weights: equal up to the fp16 rounding above and
    # float summation order.
    reference = WanTransformer3DModel(**GGUF_EXPERT).eval()
    reference.load_state_dict({**source.state_dict(), **dequantised})
    inputs = _inputs(torch.float32, frames=1, size=4)
    out = _run(loaded, inputs)
    torch.testing.assert_close(out, _run(reference, inputs), rtol=1e-4, atol=2e-4)
    rel = _rel(out, _run(source, inputs))
    assert rel < tol, rel


# ------------------------------------------------------------------ missing files


@pytest.mark.parametrize("kind", ["safetensors", "gguf", "config"])
def test_missing_files_raise_missing_weights(tmp_path, kind):
    source = _expert(7, torch.float32)
    cfg = _config_dir(tmp_path, source)
    _write_original(tmp_path / "e.safetensors", source.state_dict())
    if kind == "safetensors":
        weights = WanSafetensorsWeights(repo=str(tmp_path), filename="absent.safetensors", config=str(cfg))
    elif kind == "gguf":
        weights = GGUFWeights(repo=str(tmp_path), filename="absent.gguf", config=str(cfg))
    else:
        # A repo id absent from the (empty) weights cache.
        weights = WanSafetensorsWeights(repo=str(tmp_path), filename="e.safetensors",
                                        config="absent-org/absent-config")
    with pytest.raises(MissingWeightsError, match="avatar-serve download"):
        load_expert(weights, "high", torch.float32, "cpu", weights_dir=str(tmp_path / "hf-cache"))
