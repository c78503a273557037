"""Small helpers every stage uses: device choice, dtype by device, health and placement info,
and the one way models are built in code with random weights."""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import Callable, Iterator

import torch

from deployments.common.transport import torch_dtype


class ModelLock:
    """One model call at a time in a replica, always on the replica's one model thread.

    Ray Serve runs a replica's sync methods in a thread pool, so several requests are inside one
    stage object at once. Model work that is not re-entrant -- diffusers' VAEs keep per-call
    feature caches on the module, fast tokenizers refuse concurrent use, compiled graphs and LoRA
    switches change shared state -- runs through this: `run(fn, ...)` from a thread, or
    `await arun(fn, ...)` from a coroutine. Calls queue first in, first out on a one-thread
    executor (the queue is the lock), so requests that alternate their calls interleave: two jobs
    on one expert take turns step by step. A call still queued when its coroutine is cancelled is
    taken out of the line and never runs. `on_wait(seconds)` reports how long each call waited
    for the thread.

    The work itself runs on one thread that the lock owns (the stage's warm-up too), whichever
    thread asked for it. PyTorch keeps CUDA library state per thread -- cuDNN's attention plans
    (a thread_local cache in ATen's cudnn/MHA.cpp), cuDNN and cuBLAS handles -- so model work on a
    thread that has not run the model before builds it again: 50-80 ms per attention shape on an
    H200 (bench/thread_state.py), paid by a request whenever the pool hands it a new thread. One
    thread also keeps two calls apart by construction: a call that was abandoned once it had
    started still finishes before the next one starts.
    """

    def __init__(self, on_wait: Callable[[float], None] | None = None, name: str = "model"):
        self._on_wait = on_wait
        # The model thread computes with the torch thread count of the stage that made it (set by
        # `apply_threads` before; OpenMP's setting is per thread).
        self._pool = ThreadPoolExecutor(1, thread_name_prefix=name, initializer=torch.set_num_threads,
                                        initargs=(torch.get_num_threads(),))
        self.thread_id = self._pool.submit(threading.get_ident).result()
        self._busy = 0  # calls queued or running (`locked`)
        self._count = threading.Lock()

    def run(self, fn: Callable, *args, **kwargs):
        """`fn(*args, **kwargs)` on the model thread, after the calls queued before it; blocks
        the calling thread. Called from the model thread itself (work that `run` started calls
        into more model work), it runs at once."""
        if threading.get_ident() == self.thread_id:
            return fn(*args, **kwargs)
        return self._submit(fn, args, kwargs).result()

    def submit(self, fn: Callable, *args, **kwargs) -> Future:
        """Queue `fn(*args, **kwargs)` for the model thread without waiting -> its Future."""
        return self._submit(fn, args, kwargs)

    async def arun(self, fn: Callable, *args, **kwargs):
        """As `run`, from a coroutine: the event loop stays free while the call waits and runs. A
        caller cancelled while its call waits takes the call out of the line; work that has
        started is not interrupted: the caller gets CancelledError once it is done."""
        future = self._submit(fn, args, kwargs)
        work = asyncio.wrap_future(future)
        try:
            return await asyncio.shield(work)
        except asyncio.CancelledError:
            if not future.cancel():  # already running: let it finish before the next call starts
                await asyncio.wait([work])
            raise

    def locked(self) -> bool:
        """Whether a call is queued or running."""
        return self._busy > 0

    def _submit(self, fn: Callable, args: tuple, kwargs: dict):
        grad = torch.is_grad_enabled()  # per thread in torch: the caller's `no_grad` goes along
        queued = time.perf_counter()

        def call():
            if self._on_wait is not None:
                self._on_wait(time.perf_counter() - queued)
            with torch.set_grad_enabled(grad):
                return fn(*args, **kwargs)

        with self._count:
            self._busy += 1
        future = self._pool.submit(call)
        future.add_done_callback(self._done)  # cancelled calls too
        return future

    def _done(self, _future) -> None:
        with self._count:
            self._busy -= 1


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
        info.update(memory_report(device))
    return info


# ------------------------------------------------------------------ building models in code


@contextmanager
def default_dtype(dtype: torch.dtype):
    """Tensors made inside without a dtype are `dtype`."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


@contextmanager
def building(dtype: torch.dtype, device: torch.device | str, seed: int):
    """Modules constructed inside are drawn from `seed`, directly in `dtype` on `device` (a
    full-size fp32 copy on the host first would not fit)."""
    with default_dtype(dtype), torch.device(device):
        torch.manual_seed(seed)
        yield


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


def _parts(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The pieces a model is materialised in: each member of a ModuleList (the transformer
    blocks) and every other child; the model's own parameters come last, as the piece ""."""
    parts = []
    for name, child in model.named_children():
        if isinstance(child, torch.nn.ModuleList):
            parts += [(f"{name}.{i}", member) for i, member in enumerate(child)]
        else:
            parts.append((name, child))
    return parts + [("", model)]


def _materialise(model: torch.nn.Module, prefix: str, part: torch.nn.Module, dtype: torch.dtype,
                 device: torch.device | str, recurse: bool) -> None:
    """Give the meta parameters of `part` real storage on `device` and random values.

    Values: each submodule's own `reset_parameters()` where it has one (linears, convs, layer
    norms: PyTorch's default initialisers); what is left gets ones (1-D weights: norm scales) or
    N(0, 1/fan_in) (the modulation tables), about what the constructors draw. Speed does not depend
    on the values; they only have to be finite and of a sane scale.
    """
    modules = list(part.named_modules(prefix=prefix)) if recurse else [(prefix, part)]
    for mod_name, module in modules:
        own = [(n, p) for n, p in module._parameters.items() if p is not None and p.is_meta]
        if not own:
            continue
        for n, p in own:
            full = f"{mod_name}.{n}" if mod_name else n
            kind = torch.float32 if keeps_fp32(model, full) else dtype
            module._parameters[n] = torch.nn.Parameter(torch.empty(p.shape, dtype=kind, device=device),
                                                       requires_grad=False)
        reset = getattr(module, "reset_parameters", None)
        if reset is not None and module is not model:
            reset()
            continue
        for n, _ in own:
            p = module._parameters[n]
            if p.dim() == 1 and n == "weight":
                p.data.fill_(1.0)
            else:
                p.data.normal_(0.0, p.shape[-1] ** -0.5)
    for _, module in modules:
        for n, b in module._buffers.items():
            if b is not None and not b.is_meta and b.device != torch.device(device):
                module._buffers[n] = b.to(device)


@torch.no_grad()
def random_module_in_parts(factory: Callable[[], torch.nn.Module], seed: int, dtype: torch.dtype,
                           device: torch.device | str,
                           finish_part: Callable[[str, torch.nn.Module], None] | None = None
                           ) -> torch.nn.Module:
    """A full-size model with random weights, made one piece at a time so that the peak is the
    finished model plus one piece.

    The skeleton is built on the meta device (buffers real: RoPE tables are computed in
    `__init__`); then each piece (`_parts`: every transformer block, every other child, the
    model's own parameters) gets storage on `device` in `dtype` (fp32 for `_keep_in_fp32_modules`),
    random values from `seed + i`, and is handed to `finish_part(name, piece)` -- e.g. fp8
    quantisation -- before the next is made. For a 14 B expert quantised to fp8 this holds 14.6 GB
    plus one 0.7 GB bf16 block at most, where building in bf16 first peaks at 28.6 GB (and the
    allocator keeps those blocks cached after the quantisation frees them).
    """
    from accelerate import init_empty_weights

    with default_dtype(dtype), init_empty_weights(include_buffers=False):
        model = factory()
    for i, (name, part) in enumerate(_parts(model)):
        torch.manual_seed(seed + i)
        _materialise(model, name, part, dtype, device, recurse=part is not model)
        if finish_part is not None and part is not model:
            finish_part(name, part)
    left = [n for n, p in model.named_parameters() if p.is_meta]
    if left:
        raise RuntimeError(f"parameters left on the meta device: {left[:5]}")
    return model.eval()


def release_cached_memory(device: torch.device) -> None:
    """Hand the blocks that loading freed (a bf16 copy, file buffers) back to the driver, so the
    replica's footprint is its weights plus what its forwards use."""
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def memory_report(device: torch.device) -> dict:
    """GPU memory of this process on `device`, in bytes: resident (allocated now), reserved by
    the caching allocator now, and the peaks of both since start."""
    if device.type != "cuda":
        return {}
    return {"gpu_memory_allocated": torch.cuda.memory_allocated(device),
            "gpu_memory_reserved": torch.cuda.memory_reserved(device),
            "gpu_memory_peak_allocated": torch.cuda.max_memory_allocated(device),
            "gpu_memory_peak_reserved": torch.cuda.max_memory_reserved(device)}


def log_memory(logger, what: str, device: torch.device) -> None:
    """One start-up line with the stage's GPU memory (resident and peak), for operators."""
    m = memory_report(device)
    if m:
        gib = 1024 ** 3
        logger.info("%s: %.1f GiB resident, %.1f GiB reserved, peak %.1f GiB allocated / %.1f GiB "
                    "reserved (loading and warm-up included)", what, m["gpu_memory_allocated"] / gib,
                    m["gpu_memory_reserved"] / gib, m["gpu_memory_peak_allocated"] / gib,
                    m["gpu_memory_peak_reserved"] / gib)
