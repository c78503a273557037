"""The LoRAs a request may name on one expert (which files: deployments/common/lora_folders.py).

`LoraLibrary` (one per expert) reads a LoRA on its first use, checks every key against the
expert (lora_match.prepare_lora: a key that matches nothing here refuses the LoRA by name) and
keeps its factors (lora_runtime.RuntimeLora) on the expert's device in an LRU bounded in bytes.
A run holds the LoRAs it uses, so one evicted meanwhile stays alive until that run ends.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import torch
from torch import nn

from deployments.common.errors import LoraError, LoraNotFound
from deployments.common.lora_folders import NAME, lora_files
from deployments.models.wan.lora_runtime import RuntimeLora, runtime_lora


class LoraLibrary:
    """One expert's per-request LoRAs, read on first use and kept in an LRU of `max_bytes`."""

    def __init__(self, transformer: nn.Module, role: str, dirs, max_bytes: int, device,
                 dtype: torch.dtype):
        self.transformer, self.role, self.dirs = transformer, role, list(dirs)
        self.max_bytes, self.device, self.dtype = int(max_bytes), device, dtype
        self._cache: OrderedDict[str, RuntimeLora] = OrderedDict()
        self._lock = threading.Lock()
        self.reads = 0  # files read (tests, logs)

    @property
    def cached_bytes(self) -> int:
        return sum(lora.nbytes for lora in self._cache.values())

    def cached(self) -> list[str]:
        return list(self._cache)

    def get(self, name: str) -> RuntimeLora:
        """The LoRA `name` ready for this expert. LoraNotFound for a name no folder holds,
        LoraError for a file that does not fit this expert (every key is checked) or that is
        larger than the whole cache."""
        with self._lock:
            if name in self._cache:
                self._cache.move_to_end(name)
                return self._cache[name]
            path = lora_files(self.dirs).get(name) if NAME.match(name or "") else None
            if path is None:
                raise LoraNotFound(f"LoRA {name!r} is not in the LoRA folders")
            from deployments.models.wan.lora_match import prepare_lora

            lora = runtime_lora(prepare_lora(self.transformer, name, path, 1.0, self.role),
                                self.device, self.dtype)
            self.reads += 1
            if lora.nbytes > self.max_bytes:
                raise LoraError(f"LoRA {name!r} needs {lora.nbytes} bytes on the {self.role} expert, "
                                f"more than its whole LoRA cache ({self.max_bytes} bytes)")
            while self._cache and self.cached_bytes + lora.nbytes > self.max_bytes:
                self._cache.popitem(last=False)
            self._cache[name] = lora
            return lora
