"""Small helpers every stage uses: device choice, dtype by device, health and placement info,
and the one way models are built in code with random weights."""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
from contextlib import contextmanager
from typing import Callable, Iterator

import torch

from deployments.common.transport import torch_dtype


class ModelLock:
    """One model call at a time in a replica.

    Ray Serve runs a replica's sync methods in a thread pool, so several requests are inside one
    stage object at once. Model work that is not re-entrant -- diffusers' VAEs keep per-call
    feature caches on the module, fast tokenizers refuse concurrent use, compiled graphs and LoRA
    switches change shared state -- runs under this lock: `with lock:` from a thread, or
    `async with lock:` from a coroutine, where waiting stays cancellable (a cancelled request
    leaves the line without running). `on_wait(seconds)` reports how long each caller waited.
    """

    def __init__(self, on_wait: Callable[[float], None] | None = None, poll_s: float = 0.002):
        self._lock = threading.Lock()
        self._on_wait, self._poll_s = on_wait, poll_s

    def __enter__(self) -> "ModelLock":
        started = time.perf_counter()
        self._lock.acquire()
        self._waited(started)
        return self

    def __exit__(self, *exc) -> None:
        self._lock.release()

    async def __aenter__(self) -> "ModelLock":
        # threading.Lock has no awaitable acquire; poll it so that the event loop stays free and a
        # cancelled waiter simply stops polling.
        started = time.perf_counter()
        while not self._lock.acquire(blocking=False):
            await asyncio.sleep(self._poll_s)
        self._waited(started)
        return self

    async def __aexit__(self, *exc) -> None:
        self._lock.release()

    def locked(self) -> bool:
        return self._lock.locked()

    def _waited(self, started: float) -> None:
        if self._on_wait is not None:
            self._on_wait(time.perf_counter() - started)


async def in_threads(items: Iterator):
    """An async iterator over a sync iterator whose every `next()` runs in a worker thread: the
    event loop stays free, and a consumer that stops (cancelled, client gone) closes the source
    between items -- after the item being made, never in the middle of it."""
    loop = asyncio.get_running_loop()
    done = object()
    try:
        while True:
            pending = loop.run_in_executor(None, next, items, done)
            try:
                item = await asyncio.shield(pending)
            except asyncio.CancelledError:
                await asyncio.wait([pending])  # let the item in progress finish first
                raise
            if item is done:
                return
            yield item
    finally:
        close = getattr(items, "close", None)
        if close is not None:
            close()


def apply_threads(threads: int | None) -> None:
    """A stage's CPU thread count (`placement.threads`), when the profile sets one."""
    if threads is not None:
        torch.set_num_threads(threads)


def resolve_device(setting: str) -> torch.device:
    """"auto" -> the first CUDA device this replica can see, else the CPU."""
    if setting == "cuda" or (setting == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("stage configured with device 'cuda' but no CUDA device is visible")
        return torch.device("cuda", 0)
    return torch.device("cpu")


def dtype_for(device: torch.device, gpu_dtype: str, cpu_dtype: str) -> torch.dtype:
    """A stage's compute dtype on this device (CPUs have no fast bf16/fp16 paths here)."""
    return torch_dtype(gpu_dtype if device.type == "cuda" else cpu_dtype)


def check_resident(name: str, *modules: torch.nn.Module) -> None:
    """Raise unless every module still has its weights and the device answers a small op.

    Used by each stage's `check_health()`; Ray Serve replaces a replica that fails it 3 times.
    """
    for module in modules:
        param = next(module.parameters(), None)
        if param is None or param.device.type == "meta":
            raise RuntimeError(f"{name}: weights are not resident")
        probe = torch.ones(8, device=param.device)
        if float((probe * 2).sum().item()) != 16.0:
            raise RuntimeError(f"{name}: device {param.device} gave a wrong result")


def placement_info(device: torch.device) -> dict:
    """Where this stage runs: for operators and the placement test."""
    info = {"host": socket.gethostname(), "pid": os.getpid(), "device": str(device),
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}
    if device.type == "cuda":
        info["gpu_name"] = torch.cuda.get_device_name(device)
        info["gpu_memory_allocated"] = torch.cuda.memory_allocated(device)
    return info


# ------------------------------------------------------------------ building models in code


@contextmanager
def building(dtype: torch.dtype, device: torch.device | str, seed: int):
    """Modules constructed inside are drawn from `seed`, directly in `dtype` on `device` (a
    full-size fp32 copy on the host first would not fit)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            torch.manual_seed(seed)
            yield
    finally:
        torch.set_default_dtype(previous)


def random_module(factory: Callable[[], torch.nn.Module], seed: int, dtype: torch.dtype,
                  device: torch.device | str, full_size: bool) -> torch.nn.Module:
    """A model with random weights, the same on every machine for a given seed.

    Tiny models are drawn in fp32 on the CPU (bit-identical everywhere) and then moved; full-size
    ones are drawn in `dtype` on `device`. Either way the `_keep_in_fp32_modules` stay fp32.
    """
    if full_size:
        with building(dtype, device, seed):
            model = factory()
    else:
        torch.manual_seed(seed)
        model = factory().to(device=device)
    return cast_keeping_fp32(model, dtype).eval()


def keeps_fp32(model: torch.nn.Module, name: str) -> bool:
    """The rule `from_pretrained(torch_dtype=...)` applies: a parameter or buffer whose dotted
    name contains one of the class's `_keep_in_fp32_modules` stays fp32 (Wan: rope, time
    embedder, modulation tables, norms)."""
    keep = getattr(model, "_keep_in_fp32_modules", None) or []
    return any(k in name.split(".") for k in keep)


def cast_keeping_fp32(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Cast to `dtype` except what `keeps_fp32` names -- what `from_pretrained(torch_dtype=...)`
    does for files, done here for models built in code (tensor by tensor: diffusers' `.to(dtype)`
    warns for models built in code)."""
    for name, param in model.named_parameters():
        param.data = param.data.to(torch.float32 if keeps_fp32(model, name) else dtype)
    for name, buf in model.named_buffers():
        if buf.is_floating_point():
            buf.data = buf.data.to(torch.float32 if keeps_fp32(model, name) else dtype)
    return model
