"""The LoRAs a request may name: the `.safetensors` files directly in `serving.lora_dirs`.

A LoRA's name is its file's name without the suffix (`style.safetensors` -> `style`), looked up in
the folders in order (the first folder holding a name wins); names are letters, digits, `_`, `.`
and `-`, and a file whose real path (symlinks resolved) leaves its folder is not listed.
`list_loras` describes each from the file's header alone (rank, tensors, bytes), never a path.
The ingress lists and checks names with this module (no torch here); each expert reads the files
(deployments/models/wan/lora_library.py).
"""

from __future__ import annotations

import json
import os
import re
import struct

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
SUFFIX = ".safetensors"
MAX_HEADER = 100 * 2**20  # safetensors' own limit on a header's size


def lora_files(dirs) -> dict[str, str]:
    """name -> real path of every LoRA file in `dirs` (first folder wins for a name)."""
    found: dict[str, str] = {}
    for folder in dirs:
        root = os.path.realpath(folder)
        try:
            entries = sorted(os.listdir(root))
        except OSError:  # a configured folder that is absent or unreadable lists nothing
            continue
        for entry in entries:
            name = entry[: -len(SUFFIX)]
            if not entry.endswith(SUFFIX) or not NAME.match(name) or name in found:
                continue
            path = os.path.realpath(os.path.join(root, entry))
            if os.path.commonpath([path, root]) == root and os.path.isfile(path):
                found[name] = path
    return found


def _header(path: str) -> dict:
    """A safetensors file's JSON header (8 bytes of little-endian length, then the JSON), read by
    hand: the safetensors package opens headers only through a tensor framework, and the ingress
    lists LoRAs without torch and without reading a tensor."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        if length > MAX_HEADER:
            raise ValueError("header too large")
        return json.loads(f.read(length))


def describe_file(name: str, path: str) -> dict:
    """{"name", "rank", "tensors", "size_bytes"}; rank and tensors None for an unreadable header
    (such a file is listed; its use is refused by the expert that reads it)."""
    rank, tensors = None, None
    try:
        header = {k: v for k, v in _header(path).items() if k != "__metadata__"}
        tensors = len(header)
        for key, info in sorted(header.items()):
            if key.endswith((".lora_A.weight", ".lora_down.weight")):
                rank = int(info["shape"][0])
                break
    except (OSError, ValueError, KeyError, TypeError, IndexError, struct.error, AttributeError):
        pass
    return {"name": name, "rank": rank, "tensors": tensors, "size_bytes": os.path.getsize(path)}


def list_loras(dirs) -> list[dict]:
    return [describe_file(name, path) for name, path in sorted(lora_files(dirs).items())]
