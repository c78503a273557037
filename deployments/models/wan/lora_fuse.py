"""Adding a start-up LoRA's full deltas to an expert's weights, for the life of the replica.

`fuse_deltas` adds `strength * delta` to each parameter a `PreparedLora` (lora_match.py) names:
weights (`diff`, (out, in) for a linear), biases (`diff_b`, (out,)), norms and the modulation
table (`diff_m`), each delta of its parameter's shape, in fp32, rounded once to the parameter's
dtype, as LightX2V does. A quantised linear (GGUF, fp8) becomes a plain
`nn.Linear` holding its dequantised weight plus the delta. `describe` is the log line of what a
LoRA brought and where it went.
"""

from __future__ import annotations

import torch
from torch import nn

from deployments.common.errors import LoraError
from deployments.models.wan.lora_match import PreparedLora, find_parameter


def _dequantised_weight(module: nn.Module, weight: torch.Tensor) -> tuple[torch.Tensor, torch.dtype] | None:
    """A quantised linear weight -> (its fp32 values, the layer's compute dtype); None when
    `weight` is a plain float tensor."""
    if hasattr(weight, "quant_type"):  # diffusers' GGUFParameter (F32/F16 load as plain tensors)
        from diffusers.quantizers.gguf.utils import dequantize_gguf_tensor

        return dequantize_gguf_tensor(weight).float(), module.compute_dtype
    if weight.dtype == torch.float8_e4m3fn and hasattr(module, "weight_scale"):  # Fp8Linear
        from deployments.models.wan.fp8 import dequantize_linear_weight

        return dequantize_linear_weight(weight, module.weight_scale, torch.float32), module.compute_dtype
    return None


def fuse_deltas(transformer: nn.Module, prepared: PreparedLora) -> dict[str, int]:
    """Add `strength * delta` to each parameter `prepared.deltas` names, in fp32, rounded once to
    the parameter's dtype (LightX2V's `param += diff * strength`). In place; permanent.

    A quantised linear weight (GGUF, fp8) cannot take a delta in its quantised form: that linear
    becomes a plain `nn.Linear` holding its dequantised weight plus the delta in the layer's
    compute dtype (the dequantised weight is what GGUF's and fp8's fallback forwards multiply by;
    the sum is rounded once). It costs that layer's memory unquantised, counted in
    `dequantised_bytes` and logged. Returns counts by kind."""
    stats = {"weight": 0, "bias": 0, "norm": 0, "modulation": 0, "other": 0, "dequantised": 0,
             "dequantised_bytes": 0}
    for target, (delta, key) in prepared.deltas.items():
        found = find_parameter(transformer, target)
        if found is None:
            raise LoraError(f"LoRA {prepared.name!r}: {key}: no parameter {target} (the model changed)")
        module, leaf, param = found
        step = delta.to(param.device, torch.float32) * prepared.strength
        quantised = _dequantised_weight(module, param) if leaf == "weight" else None
        if quantised is not None:
            if not isinstance(module, nn.Linear):
                raise LoraError(f"LoRA {prepared.name!r}: {key}: {target} is quantised and not a "
                                "linear weight; a delta cannot be added to it")
            values, dtype = quantised
            replacement = _plain_linear(module, (values + step).to(dtype))
            _replace_module(transformer, module, replacement)
            stats["dequantised"] += 1
            stats["dequantised_bytes"] += replacement.weight.numel() * replacement.weight.element_size()
        elif not param.dtype.is_floating_point:
            raise LoraError(f"LoRA {prepared.name!r}: {key}: {target} is stored as {param.dtype}, "
                            "which a delta cannot be added to")
        else:
            with torch.no_grad():
                param.copy_((param.float() + step).to(param.dtype))
        kind = ("modulation" if "scale_shift_table" in target else "norm" if ".norm" in f".{target}"
                else leaf if leaf in ("weight", "bias") else "other")
        stats[kind] += 1
    return stats


def _plain_linear(module: nn.Module, weight: torch.Tensor) -> nn.Linear:
    layer = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                      device="meta")
    layer.weight = nn.Parameter(weight, requires_grad=False)
    if module.bias is not None:
        layer.bias = module.bias
    return layer


def _replace_module(root: nn.Module, old: nn.Module, new: nn.Module) -> None:
    for name, module in root.named_modules():
        if module is old:
            parent_name, _, child = name.rpartition(".")
            setattr(root.get_submodule(parent_name) if parent_name else root, child, new)
            return
    raise LoraError("internal: the layer to replace is not part of the model")


def describe(prepared: PreparedLora, stats: dict[str, int] | None = None) -> str:
    """One log line: what a LoRA brought and where it went."""
    pairs = sum(1 for k in prepared.adapter if k.endswith(".lora_A.weight"))
    text = (f"LoRA {prepared.name!r} ({prepared.n_tensors} tensors from {prepared.source}): "
            f"{pairs} low-rank pairs")
    if stats:
        kinds = ("weight", "bias", "norm", "modulation", "other")
        fused = ", ".join(f"{stats[k]} {k}" for k in kinds if stats[k])
        text += f"; deltas added to {fused or 'nothing'}"
        if stats["dequantised"]:
            text += (f" ({stats['dequantised']} quantised linears now plain, "
                     f"{stats['dequantised_bytes'] / 2**20:.1f} MiB)")
    if prepared.skipped:
        text += (f"; {len(prepared.skipped)} all-zero tensors for parts this expert lacks skipped "
                 f"(e.g. {prepared.skipped[0]})")
    if prepared.skipped_allowed:
        text += (f"; {len(prepared.skipped_allowed)} NON-ZERO tensors for parts this expert lacks "
                 f"skipped as the profile allows (skip_absent; e.g. {prepared.skipped_allowed[0]})")
    return text
