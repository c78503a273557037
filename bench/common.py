"""What the bench scripts share: the repository root on sys.path, GPU-synchronised timing, the
summaries their JSON reports use, the git commit and start time they record, a free TCP port and
a WAV writer.

The scripts run as `python bench/X.py`, so Python puts bench/ first on sys.path and they import
this file, and each other, by module name (`from common import timed`; serve.py does
`from stages import ...`). Importing it puts the repository root first on sys.path, so the
`deployments` imports that follow work without an installed package. torch is imported inside
the functions that need it: serve.py's and hops.py's drivers and host_memory.py's parent process
do not load it.
"""

from __future__ import annotations

import io
import socket
import statistics
import subprocess
import sys
import time
import wave
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the repository's packages (deployments, graph) for every script


def sync(device=None) -> None:
    """Wait for the work queued on `device` when it is a CUDA device (nothing on a CPU); with
    None, on the current CUDA device when there is a GPU."""
    import torch

    if device is None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    elif torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, repeats: int, warmup: int = 1, device=None) -> list[float]:
    """Seconds per call of `fn` over `repeats` calls after `warmup` untimed ones, `device`
    synchronised (see sync) before and after each timed call. What `fn` returns is dropped."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


def timed_result(fn, repeats: int, warmup: int = 1, device=None) -> tuple[object, list[float]]:
    """timed(), and what the last call of `fn` returned. Each call's result is held until the
    next call returns, as a loop `out = fn()` holds it."""
    last = [None]

    def call() -> None:
        last[0] = fn()

    times = timed(call, repeats, warmup, device)
    return last[0], times


def once(fn, device=None) -> float:
    """Seconds of one call of `fn` (no warm-up), `device` synchronised before and after."""
    return timed(fn, 1, warmup=0, device=device)[0]


def summary(times: list[float], count: str = "n") -> dict:
    """{"median_s", "min_s", "max_s", `count`: how many} of a list of seconds."""
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), count: len(times)}


def spread(values: list[float]) -> dict | None:
    """{"min", "median", "max"} of any values; None for none."""
    return {"min": min(values), "median": statistics.median(values), "max": max(values)} if values else None


def rel(a, b) -> float:
    """Relative difference of tensor `a` from `b`: |a - b| / |b| (Frobenius norms, in fp32)."""
    return float((a.float() - b.float()).norm() / b.float().norm())


def reset_peak(device) -> None:
    """Start the CUDA allocator's peak statistics over (nothing on a CPU)."""
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def git_commit() -> str | None:
    """The repository's HEAD commit, or None outside a git checkout."""
    run = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=False)
    return run.stdout.strip() or None


def started_at() -> str:
    """Now, in UTC, to the second (ISO 8601): the reports' `started_at`."""
    return datetime.now(UTC).isoformat(timespec="seconds")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wav_bytes(pcm, rate: int) -> bytes:
    """A mono 16-bit WAV file of `pcm` (an int16 numpy array) at `rate` Hz."""
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())
    return buf.getvalue()
