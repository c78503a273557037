"""What crosses a stage boundary: numpy arrays, never torch tensors.

Ray moves numpy arrays through the object store zero-copy (workers on one node share the stored
array: Ray's documentation, "Serialization"), while a torch tensor is pickled: 100 MB took 27 ms
between two GPU replicas as numpy, 317 ms as a torch tensor (a one-off measurement, not kept in
bench/). numpy has no bfloat16, so a bf16 tensor travels as its uint16 bit pattern plus a dtype
tag; `pack`/`unpack` are the one place that knows this and every stage uses them.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from deployments.common.payloads import WireTensor

# Dtypes that have no numpy equivalent travel as a same-width integer view.
_BIT_VIEWS: dict[torch.dtype, torch.dtype] = {torch.bfloat16: torch.uint16}
_BY_NAME: dict[str, torch.dtype] = {
    str(d).removeprefix("torch."): d
    for d in (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32,
              torch.uint8, torch.bool)
}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def torch_dtype(name: str) -> torch.dtype:
    try:
        return _BY_NAME[name]
    except KeyError:
        raise ValueError(f"unsupported dtype {name!r}; expected one of {sorted(_BY_NAME)}") from None


def pack(tensor: torch.Tensor) -> WireTensor:
    """torch -> wire. Detaches, moves to CPU; bf16 becomes a uint16 view (no rounding)."""
    t = tensor.detach()
    view = _BIT_VIEWS.get(t.dtype)
    cpu = (t.view(view) if view is not None else t).cpu().contiguous()
    return WireTensor(data=cpu.numpy(), dtype=dtype_name(tensor.dtype))


def unpack(wire: WireTensor, device: torch.device | str = "cpu") -> torch.Tensor:
    """wire -> torch on `device`, bit-exact. Arrays from Ray arrive read-only, so this copies."""
    target = torch_dtype(wire.dtype)
    t = torch.from_numpy(np.array(wire.data, copy=True))
    if target in _BIT_VIEWS:
        t = t.view(target)
    elif t.dtype != target:
        raise ValueError(f"wire array of numpy dtype {wire.data.dtype} is tagged {wire.dtype}")
    return t.to(device)


def pack_tree(obj: Any) -> Any:
    """Recursively replace tensors in lists/tuples/dicts by `WireTensor`s."""
    if isinstance(obj, torch.Tensor):
        return pack(obj)
    if isinstance(obj, (list, tuple)):
        return type(obj)(pack_tree(v) for v in obj)
    if isinstance(obj, dict):
        return {k: pack_tree(v) for k, v in obj.items()}
    return obj


def unpack_tree(obj: Any, device: torch.device | str = "cpu") -> Any:
    if isinstance(obj, WireTensor):
        return unpack(obj, device)
    if isinstance(obj, (list, tuple)):
        return type(obj)(unpack_tree(v, device) for v in obj)
    if isinstance(obj, dict):
        return {k: unpack_tree(v, device) for k, v in obj.items()}
    return obj
