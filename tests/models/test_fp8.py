"""Fp8Linear: rowwise e4m3 weights, the CPU (dequantising) path, and swapping a model's linears."""

import torch
from torch import nn

from deployments.config_weights import RandomWeights
from deployments.models.wan.components import load_expert
from deployments.models.wan.fp8 import (
    FP8,
    FP8_MAX,
    Fp8Linear,
    dequantize_linear_weight,
    quantize_linear_weight,
    supports_scaled_mm,
    to_fp8,
)


def _linear(seed: int, in_features: int = 48, out_features: int = 32) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(in_features, out_features)


def test_quantize_linear_weight_is_rowwise_amax_over_448():
    lin = _linear(0)
    w_fp8, scale = quantize_linear_weight(lin.weight)
    assert w_fp8.dtype == FP8 and w_fp8.shape == lin.weight.shape
    assert scale.dtype == torch.float32 and scale.shape == (lin.out_features,)
    torch.testing.assert_close(scale, lin.weight.detach().abs().amax(dim=1) / FP8_MAX)
    # The largest entry of each row lands exactly on +-448, the e4m3 maximum.
    assert torch.equal(w_fp8.float().abs().amax(dim=1), torch.full((lin.out_features,), FP8_MAX))
    # e4m3 keeps 3 mantissa bits: each weight is within half a step, 2**-4 relative, of the original
    # (plus the subnormal floor 2**-9 * scale for the tiny ones).
    deq = dequantize_linear_weight(w_fp8, scale)
    bound = lin.weight.detach().abs() * 2 ** -4 + scale[:, None] * 2 ** -9
    assert bool(((deq - lin.weight.detach()).abs() <= bound + 1e-12).all())


def test_zero_rows_quantize_without_nan():
    w = torch.zeros(16, 32)
    w[3] = torch.linspace(-1, 1, 32)
    w_fp8, scale = quantize_linear_weight(w)
    deq = dequantize_linear_weight(w_fp8, scale)
    assert torch.isfinite(deq).all() and torch.equal(deq[0], torch.zeros(32))


def test_fp8_linear_on_cpu_equals_dequantise_then_matmul_exactly():
    lin = _linear(1)
    layer = Fp8Linear.from_linear(lin)
    assert not supports_scaled_mm(torch.device("cpu"))
    x = torch.randn(2, 5, 48, generator=torch.Generator().manual_seed(2))
    for dtype in (torch.float32, torch.bfloat16):
        xd = x.to(dtype)
        # The reference: a plain nn.Linear holding the dequantised weight (scaled in fp32, then
        # cast), i.e. x @ (w * scale[:, None]).T + bias with the bias fused as nn.Linear does.
        ref = nn.Linear(48, 32, dtype=dtype)
        with torch.no_grad():
            ref.weight.copy_((layer.weight.float() * layer.weight_scale[:, None]).to(dtype))
            ref.bias.copy_(lin.bias.to(dtype))
        expected = ref(xd)
        got = layer(xd)
        assert got.dtype == dtype and got.shape == (2, 5, 32)
        assert torch.equal(got, expected), dtype


def test_fp8_linear_state_dict_uses_checkpoint_names():
    layer = Fp8Linear.from_linear(_linear(3))
    sd = layer.state_dict()
    assert set(sd) == {"weight", "weight_scale", "bias"}
    assert sd["weight"].dtype == FP8 and sd["weight_scale"].dtype == torch.float32
    fresh = Fp8Linear(48, 32, bias=True, bias_dtype=torch.float32)
    fresh.load_state_dict(sd)
    x = torch.randn(4, 48)
    assert torch.equal(fresh(x), layer(x))


def test_to_fp8_swaps_block_linears_and_stays_close():
    """Every block linear becomes fp8; embedders and head stay; output within fp8 error.

    Tolerance: rounding to e4m3 (3 mantissa bits) moves each weight by at most 2**-4 relative,
    about 2**-3/sqrt(12) ~ 3.6% rms; in dot products the independent errors partly cancel and the
    residual stream carries unquantised signal (measured: 0.8%), so 5% relative L2 is safe, while
    a wrong or transposed scale gives errors of order 100%.
    """
    base = load_expert(RandomWeights(arch="tiny", seed=5), "high", torch.float32, "cpu")
    quant = load_expert(RandomWeights(arch="tiny", seed=5), "high", torch.float32, "cpu")
    to_fp8(quant)
    names = {n for n, m in quant.named_modules() if isinstance(m, Fp8Linear)}
    assert "blocks.0.attn1.to_q" in names and "blocks.1.ffn.net.2" in names
    assert not any(n.startswith(("condition_embedder", "proj_out")) for n in names)
    assert len(names) == 2 * 10  # q, k, v, o of two attentions + two ffn linears, per block
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 36, 3, 8, 8, generator=g)
    ctx = torch.randn(1, 8, 32, generator=g)
    t = torch.tensor([700.0])
    with torch.no_grad():
        ref = base(x, t, ctx, return_dict=False)[0]
        out = quant(x, t, ctx, return_dict=False)[0]
    rel = float((out - ref).norm() / ref.norm())
    assert 0 < rel < 0.05, rel


def _built_in_parts(seed: int, dtype=torch.float32):
    from diffusers import WanTransformer3DModel

    from deployments.common.runtime import random_module_in_parts
    from deployments.models.wan.components import TINY

    finished, holder = [], {}

    def finish(name, part):
        # When a piece is finished, no later block has storage yet: one piece at a time.
        later = [p for block in holder["model"].blocks[int(name.split(".")[1]) + 1:] for p in block.parameters()] \
            if name.startswith("blocks.") else []
        assert all(p.is_meta for p in later), name
        assert not any(p.is_meta for p in part.parameters()), name
        finished.append(name)
        to_fp8(part, prefix=name)

    def factory():
        holder["model"] = WanTransformer3DModel(**TINY["expert"])
        return holder["model"]

    model = random_module_in_parts(factory, seed, dtype, "cpu", finish_part=finish)
    return model, finished


def test_expert_built_in_parts_is_quantised_piece_by_piece_like_the_whole():
    """The full-size fp8 path (each block quantised before the next is made, so the bf16 model
    never exists at once): every piece is finished in turn, the same linears end up fp8 as with
    `to_fp8` on a whole model (embedders and head stay), `_keep_in_fp32_modules` stay fp32, the RoPE
    buffers keep their computed values, nothing is left on meta, and the forward is finite."""
    model, finished = _built_in_parts(seed=3, dtype=torch.bfloat16)
    assert {"blocks.0", "blocks.1", "proj_out", "condition_embedder"} <= set(finished)
    assert finished.index("blocks.0") < finished.index("blocks.1")
    whole = load_expert(RandomWeights(arch="tiny", seed=3), "high", torch.bfloat16, "cpu")
    to_fp8(whole)
    kinds = lambda m: {n: type(x).__name__ for n, x in m.named_modules() if isinstance(x, nn.Linear)}
    assert kinds(model) == kinds(whole)
    dtypes = lambda m: {n: p.dtype for n, p in m.named_parameters()}
    assert dtypes(model) == dtypes(whole)  # fp8 weights, fp32 keeps (norms, tables), bf16 the rest
    for (name, buf), (_, ref) in zip(model.named_buffers(), whole.named_buffers()):
        if name.startswith("rope."):
            assert torch.equal(buf, ref), name
    assert not any(p.is_meta for p in model.parameters())
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 36, 3, 8, 8, generator=g, dtype=torch.bfloat16)
    ctx = torch.randn(1, 8, 32, generator=g, dtype=torch.bfloat16)
    with torch.no_grad():
        out = model(x, torch.tensor([700.0]), ctx, return_dict=False)[0]
    assert out.shape == (1, 16, 3, 8, 8) and torch.isfinite(out.float()).all()
    assert out.float().std() > 0


def test_expert_built_in_parts_is_the_same_for_a_seed_and_differs_across_seeds():
    """Two replicas of one expert must hold the same weights (a request gives the same clip on
    either), and the two experts (different seeds) different ones."""
    a, _ = _built_in_parts(seed=4)
    b, _ = _built_in_parts(seed=4)
    c, _ = _built_in_parts(seed=5)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k].float(), sb[k].float()) for k in sa)
    assert not torch.equal(sa["blocks.0.attn1.to_q.weight"].float(), sc["blocks.0.attn1.to_q.weight"].float())
    # Values of a sane scale: unit norm scales, small weights.
    assert torch.equal(sa["blocks.0.attn1.norm_q.weight"], torch.ones_like(sa["blocks.0.attn1.norm_q.weight"]))
    table = sa["blocks.0.scale_shift_table"]
    assert 0 < float(table.std()) < 1


def test_to_fp8_matches_skip_names_under_a_prefix():
    """Quantising a piece by itself skips by the qualified name (`proj_out` stays bf16 when it is
    handed over alone), and a second pass leaves quantised linears alone."""
    head = nn.Sequential(nn.Linear(8, 8))
    to_fp8(head, prefix="proj_out")
    assert type(head[0]) is nn.Linear
    block = nn.Sequential(nn.Linear(8, 8))
    to_fp8(block, prefix="blocks.0")
    first = block[0]
    assert isinstance(first, Fp8Linear)
    to_fp8(block, prefix="blocks.0")
    assert block[0] is first
