"""Small helpers every stage uses: device choice, dtype by device, health and placement info."""

from __future__ import annotations

import os
import socket

import torch

from deployments.transport import torch_dtype


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
