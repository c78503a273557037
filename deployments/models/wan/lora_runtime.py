"""Per-request LoRAs on one expert: applied unmerged, one denoise step at a time.

A request may name LoRAs of the expert's library (lora_library.py) with a strength per expert.
For a step of that request, each targeted linear's output gets

    y = base(x) + strength * (x @ A^T @ B^T + bias)        A (rank, in), B (out, rank)

added, where A already carries the file's alpha / rank (lora_match folds it in) and `bias` is a
pair's `diff_b` if the file has one. The base layer is whatever the expert holds (a plain or
peft-wrapped linear, fp8's Fp8Linear, a GGUF linear): the delta is a forward hook on it, so its
weights are never touched and nothing about its class matters.

The hooks exist only while a step runs (`applied`, entered on the expert's model thread, which
runs one step at a time under its ModelLock): requests that alternate steps on one expert each
get their own set, and a request naming no LoRA meets no hook at all, so it computes bit for bit
what it would without this module. The hooks are removed when the step ends, raised or not.

Written by hand rather than with peft: peft's adapters are model state (`set_adapters` switches
them for every later forward), which is what the admin routes use; here the set belongs to one
step of one request.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from deployments.common.errors import LoraError
from deployments.models.wan.lora_files import ADAPTER_PREFIX
from deployments.models.wan.lora_match import PreparedLora, bias_deltas_into_adapter


@dataclass
class Factors:
    """One linear's low-rank pair (and optional bias delta), on the expert's device."""

    A: torch.Tensor            # (rank, in), alpha / rank folded in
    B: torch.Tensor            # (out, rank)
    bias: torch.Tensor | None  # (out,) or None


@dataclass
class RuntimeLora:
    """A LoRA ready for per-request use on one expert: module name -> its factors."""

    name: str
    modules: dict[str, Factors]
    rank: int

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for f in self.modules.values()
                   for t in (f.A, f.B, f.bias) if t is not None)


def runtime_lora(prepared: PreparedLora, device, dtype: torch.dtype) -> RuntimeLora:
    """A checked LoRA (lora_match.prepare_lora) -> its factors in `dtype` on `device`. Full deltas
    other than a paired linear's bias cannot be added per request (they would have to change the
    weights): LoraError naming them, as for an admin LoRA."""
    biases = bias_deltas_into_adapter(prepared.adapter, prepared.deltas, prepared.name)
    tensors = {**prepared.adapter, **biases}
    modules: dict[str, Factors] = {}
    rank = 0
    for key, down in prepared.adapter.items():
        if not key.endswith(".lora_A.weight"):
            continue
        module = key.removeprefix(ADAPTER_PREFIX + ".").removesuffix(".lora_A.weight")
        up = tensors[f"{ADAPTER_PREFIX}.{module}.lora_B.weight"]
        bias = tensors.get(f"{ADAPTER_PREFIX}.{module}.lora_B.bias")
        modules[module] = Factors(down.to(device=device, dtype=dtype),
                                  up.to(device=device, dtype=dtype),
                                  None if bias is None else bias.to(device=device, dtype=dtype))
        rank = max(rank, int(down.shape[0]))
    if not modules:
        raise LoraError(f"LoRA {prepared.name!r} has no low-rank pairs for this expert")
    return RuntimeLora(prepared.name, modules, rank)


def _delta(x: torch.Tensor, factors: list[tuple[Factors, float]], out_dtype: torch.dtype) -> torch.Tensor:
    total = None
    for f, strength in factors:
        h = F.linear(F.linear(x.to(f.A.dtype), f.A), f.B)
        if f.bias is not None:
            h = h + f.bias
        h = h * strength
        total = h if total is None else total + h
    return total.to(out_dtype)


class LoraRuntime:
    """Applies a step's LoRAs to one transformer (see the module's docstring)."""

    def __init__(self, transformer: nn.Module):
        self.transformer = transformer

    def _base_layer(self, name: str) -> nn.Module:
        try:
            module = self.transformer.get_submodule(name)
        except AttributeError:
            raise LoraError(f"no layer {name} in this expert") from None
        return getattr(module, "base_layer", module)  # a peft-wrapped linear: its base layer

    @contextmanager
    def applied(self, loras: list[tuple[RuntimeLora, float]]):
        """For the body (one step): the outputs of the linears `loras` target get their
        `strength * (x A^T B^T + bias)` added; zero strengths are left out. No LoRA: no hook."""
        per_module: dict[str, list[tuple[Factors, float]]] = {}
        for lora, strength in loras:
            if strength == 0:
                continue
            for name, factors in lora.modules.items():
                per_module.setdefault(name, []).append((factors, float(strength)))
        handles = []
        try:
            for name, factors in per_module.items():
                def hook(module, args, kwargs, output, factors=factors):
                    x = args[0] if args else kwargs["input"]
                    return output + _delta(x, factors, output.dtype)

                handles.append(self._base_layer(name).register_forward_hook(hook, with_kwargs=True))
            yield
        finally:
            for handle in handles:
                handle.remove()
