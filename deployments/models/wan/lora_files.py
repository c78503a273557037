"""Reading a LoRA file: its tensors, and the key style they are named in.

`read_lora_file` loads a safetensors file (or a torch pickle of tensors, or takes a state dict)
and refuses anything that is not a non-empty dict of tensors. Nothing here looks at a model:
matching the keys against an expert's modules is lora_match.py's work.

Key styles. Files in diffusers/peft style (`transformer.blocks.0.attn1.to_q.lora_A.weight`) and
musubi style (`lora_unet_...`) go through diffusers' `WanLoraLoaderMixin.lora_state_dict`
(`read_adapter_style`), which gives peft keys prefixed `transformer.`. Original-Wan / ComfyUI /
Kijai / lightx2v style files (`diffusion_model.blocks.0.self_attn.q.lora_down.weight`, or the
same names without the prefix; `is_wan_style`) are split by `split_wan_lora` here, following what
LightX2V's LoRA loader applies (`LoRALoader.apply_lora`):

    X.lora_down.weight (r, in) + X.lora_up.weight (out, r)   W += strength * alpha/r * up @ down
      (or X.lora_A / X.lora_B; alpha from X.alpha, 1 without it: scale 1)
    X.diff                                                  X.weight     += strength * diff
    X.diff_b                                                X.bias       += strength * diff_b
    X.diff_m                                                X.modulation += strength * diff_m

diffusers' LoRA converter is not used for these files: it drops norm `diff` keys, `diff_m` and
the `diff` of every linear but the head with at most a log line. `split_wan_lora` keeps every
tensor: a pair, a delta, or a key of no kind it knows, which the caller reports.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from deployments.common.errors import LoraError

# The prefix of peft adapter keys (`transformer.<module>.lora_A.weight`), as diffusers'
# `load_lora_adapter(prefix=...)` filters them.
ADAPTER_PREFIX = "transformer"

# Original-Wan style (lightx2v, Kijai, ComfyUI): an optional `diffusion_model.` prefix, the
# suffixes LightX2V's loader applies, and the module names only the original layout uses.
_WAN_PREFIX = "diffusion_model."
_PAIR_SUFFIXES = ((".lora_down.weight", ".lora_up.weight"), (".lora_A.weight", ".lora_B.weight"))
_DELTA_SUFFIXES = {".diff": ".weight", ".diff_b": ".bias", ".diff_m": ".modulation"}
_ALPHA = ".alpha"
_WAN_NAME = re.compile(r"^(blocks\.\d+\.(self_attn|cross_attn|ffn\.\d|norm3|diff_m|modulation)"
                       r"|head\.|time_projection\.|time_embedding\.|text_embedding\.|img_emb\.)")


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


def read_adapter_style(raw: dict[str, torch.Tensor], label: str) -> dict[str, torch.Tensor]:
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
    if not any(k.startswith(ADAPTER_PREFIX + ".") for k in state_dict):
        state_dict = {f"{ADAPTER_PREFIX}.{k}": v for k, v in state_dict.items()}
    return state_dict
