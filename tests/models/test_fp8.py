"""Fp8Linear: rowwise e4m3 weights, the CPU (dequantising) path, and swapping a model's linears."""

import torch
from torch import nn

from deployments.config import RandomWeights
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
