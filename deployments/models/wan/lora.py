"""LoRA adapters on one Wan2.2 expert, through diffusers' and peft's own machinery.

A LoRA names the expert it targets: "high", "low" or "both" (DESIGN.md); anything else is
refused. Each expert deployment owns one `LoraManager`, so switching a LoRA reaches only the
deployments it targets. LoRAs reach an expert in two ways:

- admin (`LoraManager.load`, POST /v1/admin/loras): an unfused peft adapter (peft wraps each
  targeted linear and adds `B(A(x)) * scale` at its forward), which works on bf16, fp8 and GGUF
  base layers alike and leaves the base weights untouched: removing every adapter gives the base
  output bit for bit. A file whose deltas an adapter cannot hold is refused (see below).
- start-up (`stages.<role>.loras`, config.StartupLora; `prepare_lora`, `fuse_deltas`,
  `LoraManager.load_permanent`): part of the profile's recipe for the life of the replica (the
  lightx2v 4-step distill LoRAs on base Wan2.2 experts). Low-rank pairs become an unfused adapter
  kept active at the configured strength; full deltas are added to the weights they name. Admin
  calls can neither deactivate nor remove it.

Key styles. Files in diffusers/peft style (`transformer.blocks.0.attn1.to_q.lora_A.weight`) and
musubi style (`lora_unet_...`) go through diffusers' `WanLoraLoaderMixin.lora_state_dict`.
Original-Wan / ComfyUI / Kijai / lightx2v style files (`diffusion_model.blocks.0.self_attn.q.
lora_down.weight`, or the same names without the prefix) are read by `split_wan_lora` here,
following what LightX2V applies (lightx2v/utils/lora_loader.py `LoRALoader.apply_lora`):

    X.lora_down.weight (r, in) + X.lora_up.weight (out, r)   W += strength * alpha/r * up @ down
      (or X.lora_A / X.lora_B; alpha from X.alpha, 1 without it: scale 1)
    X.diff                                                  X.weight     += strength * diff
    X.diff_b                                                X.bias       += strength * diff_b
    X.diff_m                                                X.modulation += strength * diff_m

with the names mapped to diffusers' by diffusers' own single-file table
(checkpoints.wan_to_diffusers_names). diffusers' LoRA converter is not used for these files: it
drops norm `diff` keys, `diff_m` and the `diff` of every linear but the head with at most a log
line. Here every tensor of a file is accounted for: applied; or skipped when it names a part
this expert does not have (the Wan2.1 image cross-attention, `k_img`/`v_img`/`norm_k_img`, that
lightx2v I2V files may carry) and is all zeros (applying it would change nothing) or matches the
start-up LoRA's `skip_absent` patterns (the profile's explicit leave; LightX2V skips such tensors
whatever their values), and logged; or the whole LoRA is refused with a LoraError naming the
keys, before anything touches the model.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from deployments.common.errors import LoraError, LoraNotFound

VALID_TARGETS = ("high", "low", "both")
_PREFIX = "transformer"

# Original-Wan style (lightx2v, Kijai, ComfyUI): an optional `diffusion_model.` prefix, the
# suffixes LightX2V's loader applies, and the module names only the original layout uses.
_WAN_PREFIX = "diffusion_model."
_PAIR_SUFFIXES = ((".lora_down.weight", ".lora_up.weight"), (".lora_A.weight", ".lora_B.weight"))
_DELTA_SUFFIXES = {".diff": ".weight", ".diff_b": ".bias", ".diff_m": ".modulation"}
_ALPHA = ".alpha"
_WAN_NAME = re.compile(r"^(blocks\.\d+\.(self_attn|cross_attn|ffn\.\d|norm3|diff_m|modulation)"
                       r"|head\.|time_projection\.|time_embedding\.|text_embedding\.|img_emb\.)")
# How many keys an error message names.
_SHOWN = 5


def check_target(target: str) -> tuple[str, ...]:
    """"high" | "low" | "both" -> the expert roles it reaches; anything else raises LoraError."""
    if target not in VALID_TARGETS:
        raise LoraError(f"invalid LoRA target {target!r}; expected one of {', '.join(VALID_TARGETS)}")
    return ("high", "low") if target == "both" else (target,)


# ------------------------------------------------------------------ reading files


def read_lora_file(path: str | Path | dict) -> dict[str, torch.Tensor]:
    """A LoRA file (safetensors, or a torch pickle of tensors) or a state dict -> its tensors,
    keys as in the file. MissingWeightsError for an absent file, LoraError for an unreadable one."""
    if isinstance(path, dict):
        state_dict = dict(path)
    else:
        if not Path(path).is_file():
            from deployments.common.errors import MissingWeightsError
            raise MissingWeightsError(f"LoRA file {path}")
        try:
            if str(path).endswith(".safetensors"):
                from safetensors.torch import load_file

                state_dict = load_file(str(path))
            else:
                state_dict = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any file that is not a LoRA (text, a pickle, garbage)
            raise LoraError(f"{path} is not a readable LoRA file ({type(exc).__name__})") from None
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        what = path if not isinstance(path, dict) else "the LoRA"
        raise LoraError(f"{what} is not a state dict of tensors")
    if not state_dict:
        raise LoraError(f"{path if not isinstance(path, dict) else 'the LoRA'} holds no tensors")
    return state_dict


def is_wan_style(keys) -> bool:
    """Whether a LoRA's keys use original Wan names (lightx2v / Kijai / ComfyUI files)."""
    return any(k.startswith(_WAN_PREFIX) or _WAN_NAME.match(k) for k in keys)


@dataclass
class Pair:
    """One low-rank pair of an original-Wan-style file: `up @ down * scale` is its weight delta."""

    down: torch.Tensor   # (rank, in)
    up: torch.Tensor     # (out, rank)
    scale: float         # alpha / rank; 1 without an alpha
    keys: tuple[str, ...]

    @property
    def is_zero(self) -> bool:
        return not bool(self.down.any()) or not bool(self.up.any())


@dataclass
class WanLoraParts:
    """An original-Wan-style LoRA split the way LightX2V applies it (original Wan names)."""

    pairs: dict[str, Pair]                             # module -> pair
    deltas: dict[str, tuple[torch.Tensor, str]]        # parameter -> (delta, file key)
    unknown: list[str]                                 # keys of no kind LightX2V applies


def split_wan_lora(state_dict: dict[str, torch.Tensor]) -> WanLoraParts:
    """Original-Wan-style keys -> pairs (`X.lora_down/up.weight` or `X.lora_A/B.weight`, scaled
    by `X.alpha / rank`), deltas (`X.diff` -> `X.weight`, `X.diff_b` -> `X.bias`, `X.diff_m` ->
    `X.modulation`) and the keys that are neither (a pair missing a half, an alpha without its
    pair, `lora_mid`, `dora_scale`, ...). The `diffusion_model.` prefix is optional."""
    short: dict[str, str] = {}
    unknown: list[str] = []
    for key in state_dict:
        name = key.removeprefix(_WAN_PREFIX)
        if name in short:  # the same name with and without the prefix
            unknown.append(key)
        else:
            short[name] = key
    pairs: dict[str, Pair] = {}
    deltas: dict[str, tuple[torch.Tensor, str]] = {}
    used: set[str] = set()
    for name, key in short.items():
        for down_sfx, up_sfx in _PAIR_SUFFIXES:
            if not name.endswith(down_sfx):
                continue
            module = name[: -len(down_sfx)]
            if module in pairs:  # both lora_down/up and lora_A/B for one layer: reported
                break
            up_key = short.get(module + up_sfx)
            down, up = state_dict[key], state_dict[up_key] if up_key else None
            if up is None or down.dim() != 2 or up.dim() != 2 or up.shape[1] != down.shape[0]:
                break  # incomplete or malformed: reported as unknown
            alpha_key = short.get(module + _ALPHA)
            if alpha_key is not None and state_dict[alpha_key].numel() != 1:
                break
            scale = float(state_dict[alpha_key]) / down.shape[0] if alpha_key else 1.0
            keys = tuple(k for k in (key, up_key, alpha_key) if k)
            pairs[module] = Pair(down, up, scale, keys)
            used.update(keys)
        for sfx, target in _DELTA_SUFFIXES.items():
            if name.endswith(sfx):
                deltas[name[: -len(sfx)] + target] = (state_dict[key], key)
                used.add(key)
    unknown += [k for k in state_dict if k not in used and k not in unknown]
    return WanLoraParts(pairs, deltas, sorted(unknown))


# ------------------------------------------------------------------ matching an expert


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


def _locate(model: nn.Module, name: str | None):
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
            adapter[f"{_PREFIX}.{dmodule}.lora_A.weight"] = down
            adapter[f"{_PREFIX}.{dmodule}.lora_B.weight"] = pair.up
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
        found = _locate(transformer, target)
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
    lacks unless all zeros or matched by a `skip_absent` fnmatch pattern: config.StartupLora)."""
    raw = read_lora_file(source)
    label = "<dict>" if isinstance(source, dict) else str(source)
    if is_wan_style(raw):
        parts = split_wan_lora(raw)
        adapter, deltas, skipped, allowed = _map_wan_lora(transformer, parts, name, role, len(raw),
                                                          tuple(skip_absent))
        prepared = PreparedLora(name, label, float(strength), adapter, deltas, skipped, allowed, len(raw))
    else:
        prepared = PreparedLora(name, label, float(strength), _read_adapter_style(raw, label),
                                n_tensors=len(raw))
    if not prepared.adapter and not prepared.deltas:
        raise LoraError(f"LoRA {name!r} matches no layer of this expert (all its {len(raw)} tensors "
                        "name parts it does not have)")
    if prepared.adapter:
        check_matches(transformer, prepared.adapter, name)
    return prepared


def _read_adapter_style(raw: dict[str, torch.Tensor], label: str) -> dict[str, torch.Tensor]:
    """peft / diffusers / musubi keys -> peft keys prefixed `transformer.` (diffusers' converter),
    so `load_lora_adapter`'s prefix filter (which silently drops non-matching keys) sees every
    key. DoRA scales, which diffusers' loader drops with a warning, are refused."""
    from diffusers.loaders import WanLoraLoaderMixin

    dora = [k for k in raw if "dora_scale" in k]
    if dora:
        raise LoraError(f"{label}: DoRA LoRAs are not supported ({len(dora)} dora_scale tensors, "
                        f"e.g. {dora[0]!r}, would be dropped)")
    try:
        state_dict = WanLoraLoaderMixin.lora_state_dict(dict(raw))
    except Exception as exc:  # noqa: BLE001 - a musubi file with leftovers, a malformed file
        raise LoraError(f"{label} is not a readable LoRA file ({type(exc).__name__}: {exc})") from None
    if not state_dict:
        raise LoraError(f"LoRA {label} holds no tensors")
    if not any(k.startswith(_PREFIX + ".") for k in state_dict):
        state_dict = {f"{_PREFIX}.{k}": v for k, v in state_dict.items()}
    return state_dict


def _bias_deltas_into_adapter(adapter: dict, deltas: dict, name: str) -> dict[str, torch.Tensor]:
    """For an unfused adapter: the `diff_b` of a linear with a pair rides on its lora_B as a bias
    (peft's `lora_bias`, scaled by the strength like the pair, as LightX2V scales diff_b). Any
    other delta cannot be switched off again: LoraError, listing them."""
    biases, rest = {}, []
    for target, (delta, key) in deltas.items():
        module = target.removesuffix(".bias")
        if target.endswith(".bias") and f"{_PREFIX}.{module}.lora_B.weight" in adapter:
            biases[f"{_PREFIX}.{module}.lora_B.bias"] = delta
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
    body = key.removeprefix(_PREFIX + ".")
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
    foreign = [k for k in state_dict if not k.startswith(_PREFIX + ".")]
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


# ------------------------------------------------------------------ fusing deltas (start-up)


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
        found = _locate(transformer, target)
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


# ------------------------------------------------------------------ the manager


class LoraManager:
    """The LoRAs loaded on one expert (`role` "high" or "low") and which of them are active.

    load(name, path, strength, target) -> reads, checks, loads unfused and activates it next to
    the already active ones; activate(names, strengths) -> exactly those active (besides the
    permanent ones); remove(name) -> deletes it (the last removal unloads peft's wrappers,
    restoring the original modules). load_permanent(prepared) -> a profile's start-up LoRA, always
    active at its strength, never removed.
    """

    def __init__(self, transformer: nn.Module, role: str):
        if role not in ("high", "low"):
            raise ValueError(f"expert role must be 'high' or 'low', got {role!r}")
        self.transformer = transformer
        self.role = role
        # name -> {"path", "target", "modules", "adapter" (a peft adapter exists), "permanent"}
        self._loaded: dict[str, dict] = {}
        self._active: dict[str, float] = {}     # admin LoRAs: name -> strength, in activation order
        self._permanent: dict[str, float] = {}  # start-up LoRAs: name -> strength

    def targets(self, target: str) -> bool:
        """Whether a LoRA with `target` applies to this expert (raises LoraError if invalid)."""
        return self.role in check_target(target)

    def _check_new_name(self, name: str) -> None:
        if not name or not isinstance(name, str):
            raise LoraError("a LoRA needs a non-empty name")
        if name in self._loaded:
            raise LoraError(f"LoRA {name!r} is already loaded on the {self.role} expert; remove it first")

    def load(self, name: str, path: str | Path | dict, strength: float = 1.0,
             target: str = "both") -> bool:
        """Load LoRA `name` from `path` and activate it at `strength`.

        Returns False (and changes nothing) when `target` is valid but names the other expert.
        Raises LoraError for an invalid target, a name already loaded, or a file with tensors it
        cannot apply (keys that match no linear of this expert, full deltas an unfused adapter
        cannot hold); the model is untouched in every refused case.
        """
        if not self.targets(target):
            return False
        self._check_new_name(name)
        prepared = prepare_lora(self.transformer, name, path, strength, self.role)
        adapter = {**prepared.adapter, **_bias_deltas_into_adapter(prepared.adapter, prepared.deltas, name)}
        modules = check_matches(self.transformer, adapter, name)
        self.transformer.load_lora_adapter(adapter, adapter_name=name, prefix=_PREFIX)
        self._loaded[name] = {"path": str(path) if not isinstance(path, dict) else "<dict>",
                              "target": target, "modules": len(modules), "adapter": True,
                              "permanent": False}
        self.activate([*self._active, name], [*self._active.values(), strength])
        return True

    def load_permanent(self, prepared: PreparedLora) -> None:
        """A profile's start-up LoRA, already checked by `prepare_lora` and its deltas fused by
        `fuse_deltas`: its low-rank pairs become an adapter that stays active at
        `prepared.strength` whatever admin calls do."""
        self._check_new_name(prepared.name)
        modules = 0
        if prepared.adapter:
            modules = len(check_matches(self.transformer, prepared.adapter, prepared.name))
            self.transformer.load_lora_adapter(prepared.adapter, adapter_name=prepared.name, prefix=_PREFIX)
        self._loaded[prepared.name] = {"path": prepared.source, "target": self.role, "modules": modules,
                                       "adapter": bool(prepared.adapter), "permanent": True}
        self._permanent[prepared.name] = prepared.strength
        self._apply()

    def activate(self, names: list[str], strengths: list[float] | None = None) -> None:
        """Make exactly `names` active with `strengths` (default 1.0 each) next to the permanent
        LoRAs, which are always active; [] disables all the others."""
        strengths = [1.0] * len(names) if strengths is None else list(strengths)
        if len(strengths) != len(names):
            raise LoraError(f"{len(names)} LoRA names but {len(strengths)} strengths")
        unknown = [n for n in names if n not in self._loaded]
        if unknown:
            raise LoraError(f"LoRA {unknown[0]!r} is not loaded on the {self.role} expert")
        permanent = [n for n in names if n in self._permanent]
        if permanent:
            raise LoraError(f"LoRA {permanent[0]!r} is part of the profile (stages.{self.role}.loras): "
                            "always active at its configured strength")
        self._active = dict(zip(names, (float(s) for s in strengths)))
        self._apply()

    def _apply(self) -> None:
        """peft's active adapters: the permanent ones with a low-rank part, then the active."""
        adapters = {n: s for n, s in self._permanent.items() if self._loaded[n]["adapter"]}
        adapters.update(self._active)
        if adapters:
            self.transformer.enable_lora()
            self.transformer.set_adapters(list(adapters), weights=list(adapters.values()))
        elif any(info["adapter"] for info in self._loaded.values()):
            self.transformer.disable_lora()

    def remove(self, name: str) -> None:
        """Delete LoRA `name`; the others keep their state. With no adapter left, peft's wrapper
        modules are removed too (`unload_lora`), so the model is the base model again."""
        if name not in self._loaded:
            raise LoraNotFound(f"LoRA {name!r} is not loaded on the {self.role} expert")
        if name in self._permanent:
            raise LoraError(f"LoRA {name!r} is part of the profile (stages.{self.role}.loras) and "
                            "cannot be removed")
        self.transformer.delete_adapters(name)
        del self._loaded[name]
        self._active.pop(name, None)
        if not any(info["adapter"] for info in self._loaded.values()):
            self.transformer.unload_lora()
        else:
            self._apply()

    def active(self) -> list[dict]:
        """[{"name", "strength", "target", "path", "permanent"}] for the active LoRAs: the
        permanent (start-up) ones first, then the others in activation order."""
        entries = [*self._permanent.items(), *self._active.items()]
        return [{"name": n, "strength": s, "target": self._loaded[n]["target"],
                 "path": self._loaded[n]["path"], "permanent": n in self._permanent} for n, s in entries]

    def loaded(self) -> list[str]:
        return list(self._loaded)
