"""fp8 e4m3 linear layers with per-output-channel (rowwise) weight scales.

The lightx2v fp8 checkpoints store each quantised linear as `X.weight` (float8_e4m3fn, (out, in))
plus `X.weight_scale` (fp32, one scale per output channel): `W ~= weight.float() * scale[:, None]`.
`Fp8Linear` keeps those tensors resident as they are (15 GB per expert instead of 28.6 GB) and
computes with `torch._scaled_mm` on cards that have fp8 tensor cores (compute capability >= 8.9),
quantising the activations per token on the fly. Everywhere else it dequantises the weight at
each forward (correct, not fast). torch alone does it: no vendor fp8 kernel package.
"""

from __future__ import annotations

import logging
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger("avatar_serve.fp8")

FP8 = torch.float8_e4m3fn
# Largest finite e4m3fn value: scales map each row's amax onto it.
FP8_MAX = float(torch.finfo(FP8).max)  # 448.0
# A row of zeros would give a zero scale (0/0 on dequantise); any tiny positive scale is exact.
_MIN_SCALE = 1e-12

# Names of the linears `to_fp8` leaves alone by default: the embedders and the output head are
# small and precision-sensitive (lightx2v's fp8 files keep them in bf16 too).
DEFAULT_SKIP = ("condition_embedder", "proj_out", "patch_embedding")


def quantize_linear_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rowwise e4m3 quantisation of a linear weight.

    weight (out, in), any float dtype -> (w_fp8 (out, in) float8_e4m3fn, scale (out,) fp32) with
    `w_fp8.float() * scale[:, None] ~= weight` (scale = row amax / 448).
    """
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D linear weight, got shape {tuple(weight.shape)}")
    w = weight.detach().float()
    scale = (w.abs().amax(dim=1) / FP8_MAX).clamp(min=_MIN_SCALE)
    w_fp8 = (w / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return w_fp8.contiguous(), scale.contiguous()


def dequantize_linear_weight(w_fp8: torch.Tensor, scale: torch.Tensor,
                             dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(out, in) fp8 + (out,) fp32 scale -> (out, in) weight in `dtype` (scaled in fp32 first)."""
    return (w_fp8.float() * scale.reshape(-1, 1).float()).to(dtype)


def quantize_rowwise(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token activation quantisation: x (M, K) -> (x_fp8 (M, K), scale (M, 1) fp32)."""
    amax = x.abs().amax(dim=1, keepdim=True).float()
    scale = (amax / FP8_MAX).clamp(min=_MIN_SCALE)
    x_fp8 = (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return x_fp8, scale


def supports_scaled_mm(device: torch.device) -> bool:
    """fp8 tensor cores: Ada (8.9), Hopper (9.0), Blackwell (10.x, 12.x)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability(device) >= (8, 9)


class Fp8Linear(nn.Linear):
    """A linear layer holding an e4m3 weight and a per-output-channel fp32 scale.

    Parameters / buffers (named like the checkpoint keys, so `state_dict()` round-trips a
    lightx2v file): `weight` (out, in) float8_e4m3fn, `weight_scale` (out,) fp32, `bias` (out,)
    or None. Input (..., in) in the compute dtype -> output (..., out) in the same dtype.

    It subclasses `nn.Linear` so that code that looks for linears (peft's LoRA injection,
    `in_features`/`out_features` readers) still finds it; the fp8 weight is never dequantised in
    place. `compute_dtype` is the dtype the expert computes in: peft reads it (as it does for
    bitsandbytes layers) to place LoRA weights, which would otherwise be cast to float8.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 device: torch.device | str | None = None, bias_dtype: torch.dtype = torch.bfloat16,
                 compute_dtype: torch.dtype | None = None):
        # Build the nn.Linear skeleton on meta (no fp32 allocation), then put fp8 storage in place.
        super().__init__(in_features, out_features, bias=False, device="meta")
        self.weight = nn.Parameter(torch.zeros(out_features, in_features, dtype=FP8, device=device),
                                   requires_grad=False)
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32,
                                                        device=device))
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=bias_dtype, device=device),
                                     requires_grad=False)
        self.compute_dtype = compute_dtype if compute_dtype is not None else bias_dtype
        # None: not tried yet on this device; False: `_scaled_mm` refused once, use the fallback.
        self._scaled_mm_ok: bool | None = None

    @classmethod
    def from_weights(cls, weight: torch.Tensor, weight_scale: torch.Tensor,
                     bias: torch.Tensor | None = None,
                     compute_dtype: torch.dtype = torch.bfloat16) -> "Fp8Linear":
        """Wrap already-quantised tensors (no copy when they are already fp8/fp32 contiguous)."""
        out_features, in_features = weight.shape
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.in_features, layer.out_features = in_features, out_features
        layer.weight = nn.Parameter(weight.to(FP8).contiguous(), requires_grad=False)
        layer.register_buffer("weight_scale", weight_scale.reshape(out_features).float().contiguous())
        layer.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        layer.compute_dtype = compute_dtype
        layer._scaled_mm_ok = None
        return layer

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Fp8Linear":
        """Quantise an existing linear (benchmarks, tests)."""
        w_fp8, scale = quantize_linear_weight(linear.weight)
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls.from_weights(w_fp8, scale, bias, compute_dtype=linear.weight.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, " \
               f"bias={self.bias is not None}, weight=float8_e4m3fn rowwise"

    # ------------------------------------------------------------ forward paths

    def forward_dequant(self, x: torch.Tensor) -> torch.Tensor:
        """Reference path, any device: x @ (w * scale[:, None]).T + bias, in x's dtype."""
        w = dequantize_linear_weight(self.weight, self.weight_scale, x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, w, bias)

    def _scaled_mm_shapes_ok(self, x2d: torch.Tensor) -> bool:
        # torch 2.13 (`_check_scaled_mm_sizes`): K and N multiples of 16, first operand row-major,
        # second column-major (a transposed contiguous (out, in) weight is), fp32 scales of shape
        # (M, 1) and (1, N), both contiguous.
        return (self.in_features % 16 == 0 and self.out_features % 16 == 0
                and x2d.shape[0] > 0 and self.weight.is_contiguous())

    def forward_scaled_mm(self, x: torch.Tensor) -> torch.Tensor:
        """fp8 tensor-core path: per-token dynamic e4m3 activations x rowwise e4m3 weight."""
        shape = x.shape
        x2d = x.reshape(-1, self.in_features).contiguous()
        x_fp8, scale_a = quantize_rowwise(x2d)
        out = torch._scaled_mm(x_fp8, self.weight.t(), scale_a=scale_a,
                               scale_b=self.weight_scale.view(1, -1), out_dtype=torch.bfloat16)
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out.to(x.dtype).reshape(*shape[:-1], self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in) -> (..., out)."""
        if self._scaled_mm_ok is not False and supports_scaled_mm(x.device) \
                and self._scaled_mm_shapes_ok(x.reshape(-1, self.in_features)):
            try:
                out = self.forward_scaled_mm(x)
                self._scaled_mm_ok = True
                return out
            except RuntimeError as exc:
                # A card/torch build without rowwise fp8 GEMMs: say so once, then stay correct.
                if self._scaled_mm_ok is None:
                    logger.warning("torch._scaled_mm unavailable (%s); using the dequantising path",
                                   exc)
                self._scaled_mm_ok = False
        return self.forward_dequant(x)


def to_fp8(model: nn.Module, skip: Iterable[str] = DEFAULT_SKIP, prefix: str = "") -> nn.Module:
    """Replace every `nn.Linear` of `model` whose qualified name (under `prefix`, when `model` is
    a piece of a larger one) contains none of `skip` by an `Fp8Linear` quantised from it (rowwise
    amax/448). In place; returns `model`. Linears already quantised are left as they are.

    For speed benchmarks with random weights and for tests; real fp8 files load already
    quantised through `deployments.models.wan.checkpoints`.
    """
    skip = tuple(skip)
    targets = [(name, module) for name, module in model.named_modules()
               if type(module) is nn.Linear
               and not any(s in (f"{prefix}.{name}" if prefix else name) for s in skip)]
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, Fp8Linear.from_linear(linear))
    return model


def gpu_selfcheck(device: str = "cuda", m: int = 4096, k: int = 5120, n: int = 13824,
                  seed: int = 0) -> dict:
    """Compare the `_scaled_mm` path against the dequantising path on a GPU (run it by hand on
    an H100: `python -c "from deployments.models.wan.fp8 import gpu_selfcheck; print(gpu_selfcheck())"`).

    Returns which path ran, relative errors of both paths against a bf16 matmul of the
    unquantised weight, their difference from each other, and rough timings.
    """
    dev = torch.device(device)
    g = torch.Generator(device="cpu").manual_seed(seed)
    w = (torch.randn(n, k, generator=g) * 0.02).to(dev, torch.bfloat16)
    x = torch.randn(m, k, generator=g).to(dev, torch.bfloat16)
    bias = (torch.randn(n, generator=g) * 0.01).to(dev, torch.bfloat16)
    lin = nn.Linear(k, n, device=dev, dtype=torch.bfloat16)
    with torch.no_grad():
        lin.weight.copy_(w)
        lin.bias.copy_(bias)
    layer = Fp8Linear.from_linear(lin)

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a.float() - b.float()).norm() / b.float().norm())

    def timed(fn) -> float:
        if dev.type != "cuda":
            return float("nan")
        for _ in range(3):
            fn()
        torch.cuda.synchronize(dev)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(10):
            fn()
        end.record()
        torch.cuda.synchronize(dev)
        return start.elapsed_time(end) / 10

    with torch.no_grad():
        ref = F.linear(x, w, bias)
        deq = layer.forward_dequant(x)
        result = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else str(dev),
                  "capability": torch.cuda.get_device_capability(dev) if dev.type == "cuda" else None,
                  "supports_scaled_mm": supports_scaled_mm(dev),
                  "shape_mkn": (m, k, n),
                  "rel_err_dequant_vs_bf16": rel(deq, ref)}
        try:
            fast = layer.forward_scaled_mm(x)
            result.update(scaled_mm_ran=True,
                          rel_err_scaled_mm_vs_bf16=rel(fast, ref),
                          rel_diff_scaled_mm_vs_dequant=rel(fast, deq),
                          ms_scaled_mm=timed(lambda: layer.forward_scaled_mm(x)))
        except RuntimeError as exc:
            result.update(scaled_mm_ran=False, scaled_mm_error=str(exc)[:300])
        result.update(ms_dequant=timed(lambda: layer.forward_dequant(x)),
                      ms_bf16=timed(lambda: F.linear(x, w, bias)),
                      forward_used_scaled_mm=bool(layer(x) is not None and layer._scaled_mm_ok))
    return result
