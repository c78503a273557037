"""LoRA adapters on one Wan2.2 expert, through diffusers' and peft's own machinery.

A LoRA names the expert it targets: "high" (the high-noise expert), "low" (the low-noise one) or
"both"; any other target is refused with a LoraError. Each expert deployment owns one
`LoraManager`, so switching a LoRA reaches only the deployments it targets. LoRAs reach an expert
in two ways:

- admin (`LoraManager.load`, POST /v1/admin/loras): an unfused peft adapter (peft wraps each
  targeted linear and adds `B(A(x)) * scale` at its forward, A (rank, in), B (out, rank)), which
  works on bf16, fp8 and GGUF base layers alike and leaves the base weights untouched: removing
  every adapter gives the base output bit for bit. A file whose deltas an adapter cannot hold is
  refused (lora_match.bias_deltas_into_adapter).
- start-up (`stages.<role>.loras`, config_weights.StartupLora; `lora_match.prepare_lora`,
  `lora_fuse.fuse_deltas`, `LoraManager.load_permanent`): part of the profile's recipe for the
  life of the replica (the lightx2v 4-step distill LoRAs on base Wan2.2 experts). Low-rank pairs
  become an unfused adapter kept active at the configured strength; full deltas are added to the
  weights they name. Admin calls can neither deactivate nor remove it.

The modules beside this one: lora_files.py reads a file and splits it by key style, lora_match.py
checks every tensor of it against the expert before anything is applied, lora_fuse.py adds a
start-up LoRA's full deltas to the weights.

The manager holds no lock: its caller serialises changes with the expert's forwards (the expert
stage makes them on its model thread, between jobs).
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from deployments.common.errors import LoraError, LoraNotFound
from deployments.models.wan.lora_files import ADAPTER_PREFIX
from deployments.models.wan.lora_match import (
    PreparedLora,
    bias_deltas_into_adapter,
    check_matches,
    prepare_lora,
)

VALID_TARGETS = ("high", "low", "both")


def check_target(target: str) -> tuple[str, ...]:
    """"high" | "low" | "both" -> the expert roles it reaches; anything else raises LoraError."""
    if target not in VALID_TARGETS:
        raise LoraError(f"invalid LoRA target {target!r}; expected one of {', '.join(VALID_TARGETS)}")
    return ("high", "low") if target == "both" else (target,)


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
        adapter = {**prepared.adapter, **bias_deltas_into_adapter(prepared.adapter, prepared.deltas, name)}
        modules = check_matches(self.transformer, adapter, name)
        self.transformer.load_lora_adapter(adapter, adapter_name=name, prefix=ADAPTER_PREFIX)
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
            self.transformer.load_lora_adapter(prepared.adapter, adapter_name=prepared.name,
                                               prefix=ADAPTER_PREFIX)
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
