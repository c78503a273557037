"""LoRA adapters on one Wan2.2 expert, through diffusers' and peft's own machinery.

A LoRA names the expert it targets: "high", "low" or "both" (DESIGN.md); anything else is
refused. Each expert deployment owns one `LoraManager`, so switching a LoRA reaches only the
deployments it targets.

Files in diffusers/peft style (`transformer.blocks.0.attn1.to_q.lora_A.weight`), original-Wan /
ComfyUI / Kijai / lightx2v style (`diffusion_model.blocks.0.self_attn.q.lora_down.weight` with
`.alpha`) and musubi style (`lora_unet_...`) are converted by
`WanLoraLoaderMixin.lora_state_dict`. Adapters stay unfused (peft wraps each targeted linear and
adds `B(A(x)) * scale` at its forward), which works on bf16, fp8 and GGUF base layers alike and
leaves the base weights untouched: removing every adapter gives the base output bit for bit.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from deployments.common.errors import LoraError, LoraNotFound

VALID_TARGETS = ("high", "low", "both")
_PREFIX = "transformer"


def check_target(target: str) -> tuple[str, ...]:
    """"high" | "low" | "both" -> the expert roles it reaches; anything else raises LoraError."""
    if target not in VALID_TARGETS:
        raise LoraError(f"invalid LoRA target {target!r}; expected one of {', '.join(VALID_TARGETS)}")
    return ("high", "low") if target == "both" else (target,)


def read_lora(path: str | Path | dict) -> dict[str, torch.Tensor]:
    """A LoRA file (or state dict) -> diffusers/peft keys, all prefixed `transformer.`.

    Key styles are converted by diffusers' `WanLoraLoaderMixin.lora_state_dict`; a file already in
    peft style but without the `transformer.` prefix gets it, so `load_lora_adapter`'s prefix
    filter (which silently drops non-matching keys) sees every key.
    """
    from diffusers.loaders import WanLoraLoaderMixin

    source = dict(path) if isinstance(path, dict) else str(path)
    if not isinstance(source, dict) and not Path(source).is_file():
        from deployments.common.errors import MissingWeightsError
        raise MissingWeightsError(f"LoRA file {source}")
    try:
        state_dict = WanLoraLoaderMixin.lora_state_dict(source)
    except Exception as exc:  # noqa: BLE001 - any file that is not a LoRA (text, a pickle, garbage)
        raise LoraError(f"{path} is not a readable LoRA file ({type(exc).__name__})") from None
    if not state_dict:
        raise LoraError(f"LoRA {path} holds no tensors")
    if not any(k.startswith(_PREFIX + ".") for k in state_dict):
        state_dict = {f"{_PREFIX}.{k}": v for k, v in state_dict.items()}
    return state_dict


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


class LoraManager:
    """The LoRAs loaded on one expert (`role` "high" or "low") and which of them are active.

    load(name, path, strength, target) -> reads, checks, loads unfused and activates it next to
    the already active ones; activate(names, strengths) -> exactly those active; remove(name) ->
    deletes it (the last removal unloads peft's wrappers, restoring the original modules).
    """

    def __init__(self, transformer: nn.Module, role: str):
        if role not in ("high", "low"):
            raise ValueError(f"expert role must be 'high' or 'low', got {role!r}")
        self.transformer = transformer
        self.role = role
        self._loaded: dict[str, dict] = {}   # name -> {"path", "target", "modules"}
        self._active: dict[str, float] = {}  # name -> strength, in activation order

    def targets(self, target: str) -> bool:
        """Whether a LoRA with `target` applies to this expert (raises LoraError if invalid)."""
        return self.role in check_target(target)

    def load(self, name: str, path: str | Path | dict, strength: float = 1.0,
             target: str = "both") -> bool:
        """Load LoRA `name` from `path` and activate it at `strength`.

        Returns False (and changes nothing) when `target` is valid but names the other expert.
        Raises LoraError for an invalid target, a name already loaded, or a file whose keys do
        not all match this expert's linears; the model is untouched in every refused case.
        """
        if not self.targets(target):
            return False
        if not name or not isinstance(name, str):
            raise LoraError("a LoRA needs a non-empty name")
        if name in self._loaded:
            raise LoraError(f"LoRA {name!r} is already loaded on the {self.role} expert; remove it first")
        state_dict = read_lora(path)
        modules = check_matches(self.transformer, state_dict, name)
        self.transformer.load_lora_adapter(state_dict, adapter_name=name, prefix=_PREFIX)
        self._loaded[name] = {"path": str(path) if not isinstance(path, dict) else "<dict>",
                              "target": target, "modules": len(modules)}
        self.activate([*self._active, name], [*self._active.values(), strength])
        return True

    def activate(self, names: list[str], strengths: list[float] | None = None) -> None:
        """Make exactly `names` active with `strengths` (default 1.0 each); [] disables all."""
        strengths = [1.0] * len(names) if strengths is None else list(strengths)
        if len(strengths) != len(names):
            raise LoraError(f"{len(names)} LoRA names but {len(strengths)} strengths")
        unknown = [n for n in names if n not in self._loaded]
        if unknown:
            raise LoraError(f"LoRA {unknown[0]!r} is not loaded on the {self.role} expert")
        if not names:
            if self._loaded:
                self.transformer.disable_lora()
            self._active = {}
            return
        self.transformer.enable_lora()
        self.transformer.set_adapters(list(names), weights=[float(s) for s in strengths])
        self._active = dict(zip(names, (float(s) for s in strengths)))

    def remove(self, name: str) -> None:
        """Delete LoRA `name`; the others keep their state. With none left, peft's wrapper
        modules are removed too (`unload_lora`), so the model is the base model again."""
        if name not in self._loaded:
            raise LoraNotFound(f"LoRA {name!r} is not loaded on the {self.role} expert")
        self.transformer.delete_adapters(name)
        del self._loaded[name]
        self._active.pop(name, None)
        if not self._loaded:
            self.transformer.unload_lora()
        elif self._active:
            self.activate(list(self._active), list(self._active.values()))
        else:
            self.transformer.disable_lora()

    def active(self) -> list[dict]:
        """[{"name", "strength", "target", "path"}] for the active LoRAs, in activation order."""
        return [{"name": n, "strength": s, "target": self._loaded[n]["target"],
                 "path": self._loaded[n]["path"]} for n, s in self._active.items()]

    def loaded(self) -> list[str]:
        return list(self._loaded)
