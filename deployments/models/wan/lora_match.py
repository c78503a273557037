"""Checking a LoRA against one expert's modules, before anything is applied.

`prepare_lora` reads a file (lora_files.py) and maps every tensor of it onto the expert:
low-rank pairs onto its linears (`lora_A` (rank, in) must match the linear's in_features,
`lora_B` (out, rank) its out_features), full deltas onto the parameters they name, with the
original-Wan names mapped to diffusers' by diffusers' own single-file table
(checkpoints.wan_to_diffusers_names). The result, a `PreparedLora`, is what the manager
(lora.py) loads as an adapter and what lora_fuse.py adds to the weights.

Every tensor of a file is accounted for: applied; or skipped when it names a part this expert
does not have (the Wan2.1 image cross-attention, `k_img`/`v_img`/`norm_k_img`, that lightx2v I2V
files may carry) and is all zeros (applying it would change nothing) or matches the start-up
LoRA's `skip_absent` patterns (the profile's explicit leave; LightX2V skips such tensors whatever
their values), and logged; or the whole LoRA is refused with a LoraError naming the keys, before
anything touches the model.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from deployments.common.errors import LoraError
from deployments.models.wan.lora_files import (
    ADAPTER_PREFIX,
    WanLoraParts,
    is_wan_style,
    read_adapter_style,
    read_lora_file,
    split_wan_lora,
)

# How many keys an error message names.
_SHOWN = 5


@dataclass
class PreparedLora:
    """A LoRA read and checked against one expert, nothing applied yet.

    `adapter`: peft-style keys (`transformer.<module>.lora_A.weight` / `.lora_B.weight`, alpha /
    rank folded into lora_A) for the linears of its low-rank pairs; `deltas`: diffusers parameter
    name -> (delta, file key) for its full deltas; `skipped`: all-zero keys for parts this expert
    does not have; `skipped_allowed`: non-zero keys for parts it does not have that the caller's
    `skip_absent` patterns allow to skip. Together they account for every tensor of the file
    (`n_tensors`)."""

    name: str
    source: str
    strength: float
    adapter: dict[str, torch.Tensor]
    deltas: dict[str, tuple[torch.Tensor, str]] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    skipped_allowed: list[str] = field(default_factory=list)
    n_tensors: int = 0


def find_parameter(model: nn.Module, name: str | None):
    """A parameter or buffer by diffusers name -> (owning module, leaf, tensor), or None. A peft
    wrapper (`<linear>.base_layer`) is looked through."""
    if not name:
        return None
    module_name, _, leaf = name.rpartition(".")
    try:
        module = model.get_submodule(module_name) if module_name else model
    except AttributeError:
        return None
    module = getattr(module, "base_layer", module)
    tensor = module._parameters.get(leaf)
    if tensor is None:
        tensor = module._buffers.get(leaf)
    return None if tensor is None else (module, leaf, tensor)


def _logical_shape(tensor: torch.Tensor) -> tuple[int, ...]:
    """A GGUF-quantised weight's shape is its byte layout; `quant_shape` is the weight's."""
    return tuple(getattr(tensor, "quant_shape", tensor.shape))


def _refuse(name: str, role: str | None, bad: list[tuple[str, str]], total: int) -> None:
    where = f"the {role} expert" if role else "this expert"
    shown = "; ".join(f"{key}: {why}" for key, why in bad[:_SHOWN])
    more = f" (and {len(bad) - _SHOWN} more)" if len(bad) > _SHOWN else ""
    raise LoraError(f"LoRA {name!r}: {len(bad)} of its {total} tensors cannot be applied to {where} "
                    f"and would be lost: {shown}{more}")


def _map_wan_lora(transformer: nn.Module, parts: WanLoraParts, name: str, role: str | None,
                  total: int, skip_absent: tuple[str, ...] = ()) -> tuple[dict, dict, list, list]:
    from deployments.models.wan.checkpoints import CheckpointError, wan_to_diffusers_names

    unknown = ("not a LoRA tensor LightX2V applies (lora_down/up, lora_A/B, alpha, diff, diff_b, "
               "diff_m) or half of a pair")
    bad = [(k, unknown) for k in parts.unknown]
    targets = [m + ".weight" for m in parts.pairs] + list(parts.deltas)
    try:
        to_diffusers = {orig: new for new, orig in wan_to_diffusers_names(targets).items()}
    except CheckpointError as exc:
        raise LoraError(f"LoRA {name!r}: {exc}") from None
    modules = dict(transformer.named_modules())
    adapter: dict[str, torch.Tensor] = {}
    deltas: dict[str, tuple[torch.Tensor, str]] = {}
    skipped: list[str] = []
    allowed: list[str] = []

    def may_skip(keys) -> bool:
        return all(any(fnmatch.fnmatchcase(k, pattern) for pattern in skip_absent) for k in keys)

    for module, pair in parts.pairs.items():
        target = to_diffusers.get(module + ".weight", "")
        dmodule = target.removesuffix(".weight")
        layer = modules.get(dmodule)
        layer = getattr(layer, "base_layer", layer)
        if isinstance(layer, nn.Linear) and pair.down.shape[1] == layer.in_features \
                and pair.up.shape[0] == layer.out_features:
            down = pair.down if pair.scale == 1.0 else (pair.down.float() * pair.scale).to(pair.down.dtype)
            adapter[f"{ADAPTER_PREFIX}.{dmodule}.lora_A.weight"] = down
            adapter[f"{ADAPTER_PREFIX}.{dmodule}.lora_B.weight"] = pair.up
        elif pair.is_zero:
            skipped += pair.keys
        elif not isinstance(layer, nn.Linear) and may_skip(pair.keys):
            allowed += pair.keys
        elif isinstance(layer, nn.Linear):
            bad.append((pair.keys[0], (f"pair of shape {tuple(pair.up.shape)} @ {tuple(pair.down.shape)}, "
                                       f"the model's {dmodule} is {layer.out_features} x "
                                       f"{layer.in_features}")))
        else:
            bad.append((pair.keys[0], f"no linear layer {dmodule or module} in this expert"))
    for orig, (delta, key) in parts.deltas.items():
        target = to_diffusers.get(orig)
        found = find_parameter(transformer, target)
        if found is not None and _logical_shape(found[2]) == tuple(delta.shape):
            deltas[target] = (delta, key)
        elif not bool(delta.any()):
            skipped.append(key)
        elif found is None and may_skip([key]):
            allowed.append(key)
        elif found is not None:
            bad.append((key, f"shape {tuple(delta.shape)}, the model's {target} is "
                             f"{_logical_shape(found[2])}"))
        else:
            bad.append((key, f"no parameter {target} in this expert"))
    if bad:
        _refuse(name, role, bad, total)
    return adapter, deltas, skipped, allowed


def prepare_lora(transformer: nn.Module, name: str, source: str | Path | dict, strength: float = 1.0,
                 role: str | None = None, skip_absent=()) -> PreparedLora:
    """Read LoRA `source` and check every tensor of it against `transformer`; nothing is applied.

    Original-Wan-style files are split by `split_wan_lora` (pairs -> adapter, diffs -> deltas);
    other styles go through diffusers' converter and must hold adapter keys only. Raises
    LoraError naming the keys that would be lost (unknown kinds, wrong shapes, parts this expert
    lacks unless all zeros or matched by a `skip_absent` fnmatch pattern: config_weights.StartupLora)."""
    raw = read_lora_file(source)
    label = "<dict>" if isinstance(source, dict) else str(source)
    if is_wan_style(raw):
        parts = split_wan_lora(raw)
        adapter, deltas, skipped, allowed = _map_wan_lora(transformer, parts, name, role, len(raw),
                                                          tuple(skip_absent))
        prepared = PreparedLora(name, label, float(strength), adapter, deltas, skipped, allowed, len(raw))
    else:
        prepared = PreparedLora(name, label, float(strength), read_adapter_style(raw, label),
                                n_tensors=len(raw))
    if not prepared.adapter and not prepared.deltas:
        raise LoraError(f"LoRA {name!r} matches no layer of this expert (all its {len(raw)} tensors "
                        "name parts it does not have)")
    if prepared.adapter:
        check_matches(transformer, prepared.adapter, name)
    return prepared


def bias_deltas_into_adapter(adapter: dict, deltas: dict, name: str) -> dict[str, torch.Tensor]:
    """For an unfused adapter: the `diff_b` of a linear with a pair rides on its lora_B as a bias
    (peft's `lora_bias`, scaled by the strength like the pair, as LightX2V scales diff_b). Any
    other delta cannot be switched off again: LoraError, listing them."""
    biases, rest = {}, []
    for target, (delta, key) in deltas.items():
        module = target.removesuffix(".bias")
        if target.endswith(".bias") and f"{ADAPTER_PREFIX}.{module}.lora_B.weight" in adapter:
            biases[f"{ADAPTER_PREFIX}.{module}.lora_B.bias"] = delta
        else:
            rest.append(key)
    if rest:
        shown = ", ".join(repr(k) for k in rest[:_SHOWN]) + (f" (and {len(rest) - _SHOWN} more)"
                                                             if len(rest) > _SHOWN else "")
        raise LoraError(
            f"LoRA {name!r} carries {len(rest)} full deltas ({shown}) that an admin LoRA cannot hold "
            "unfused (diffusers' converter would drop them). Give it to the profile instead "
            "(stages.<role>.loras), which adds them to the weights at start-up")
    return biases


def _module_of(key: str) -> str:
    """`transformer.blocks.0.attn1.to_q.lora_A.weight` -> `blocks.0.attn1.to_q`."""
    body = key.removeprefix(ADAPTER_PREFIX + ".")
    for marker in (".lora_A", ".lora_B", ".lora_magnitude_vector", ".lora_embedding"):
        if marker in body:
            return body.split(marker)[0]
    raise LoraError(f"not a LoRA key: {key!r}")


def check_matches(transformer: nn.Module, state_dict: dict[str, torch.Tensor], name: str) -> list[str]:
    """Refuse (LoraError) a LoRA unless every key names a linear of `transformer` with matching
    shapes; returns the targeted module names. Runs before anything touches the model, so a
    refused LoRA leaves the expert serving its base output.

    lora_A (rank, in) must match the linear's in_features, lora_B (out, rank) its out_features.
    """
    foreign = [k for k in state_dict if not k.startswith(ADAPTER_PREFIX + ".")]
    if foreign:
        raise LoraError(f"LoRA {name!r}: keys for components other than the transformer "
                        f"(e.g. {foreign[0]!r})")
    modules = dict(transformer.named_modules())
    targets, unmatched = set(), []
    for key, value in state_dict.items():
        module_name = _module_of(key)
        # peft wraps a linear as `<name>.base_layer` once an adapter is loaded.
        module = modules.get(module_name)
        module = getattr(module, "base_layer", module)
        if not isinstance(module, nn.Linear):
            unmatched.append(key)
            continue
        if ".lora_A." in key and value.dim() == 2 and value.shape[1] != module.in_features:
            raise LoraError(f"LoRA {name!r}: {key} has input size {value.shape[1]}, the model's "
                            f"{module_name} takes {module.in_features}")
        if ".lora_B." in key and value.dim() == 2 and value.shape[0] != module.out_features:
            raise LoraError(f"LoRA {name!r}: {key} has output size {value.shape[0]}, the model's "
                            f"{module_name} gives {module.out_features}")
        targets.add(module_name)
    if not targets:
        raise LoraError(f"LoRA {name!r} matches no layer of this expert (e.g. {unmatched[0]!r})")
    if unmatched:
        raise LoraError(f"LoRA {name!r}: {len(unmatched)} keys match no linear layer of this "
                        f"expert (e.g. {unmatched[0]!r})")
    return sorted(targets)
