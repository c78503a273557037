"""The per-request LoRA library (deployments/models/wan/lora_library.py): files by name in the
LoRA folders, listed from their headers (never a path), read on first use, checked against the
expert by name, kept in an LRU bounded in bytes."""

import os

import pytest
import torch
from safetensors.torch import save_file

from deployments.common.errors import LoraError, LoraNotFound
from deployments.common.lora_folders import list_loras, lora_files
from deployments.config_weights import RandomWeights
from deployments.models.wan.components import load_expert
from deployments.models.wan.lora_library import LoraLibrary
from helpers import LORA_RANK, TINY_INNER, lora_pairs, write_diffusers_lora


def _expert():
    return load_expert(RandomWeights(arch="tiny", seed=0), "high", torch.float32, "cpu")


def _library(model, folder, max_bytes=10**9):
    return LoraLibrary(model, "high", [str(folder)], max_bytes, "cpu", torch.float32)


def test_listing_names_rank_and_size_never_paths(tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir(), second.mkdir()
    write_diffusers_lora(first / "style.safetensors", lora_pairs(1))
    write_diffusers_lora(second / "style.safetensors", lora_pairs(2))  # the first folder wins
    write_diffusers_lora(second / "other.safetensors", lora_pairs(3))
    (second / "notes.txt").write_text("not a LoRA")
    (second / "bad name!.safetensors").write_bytes(b"x")
    outside = tmp_path / "secret.safetensors"
    write_diffusers_lora(outside, lora_pairs(4))
    os.symlink(outside, second / "escape.safetensors")  # leaves its folder: not listed
    listed = list_loras([str(first), str(second), str(tmp_path / "absent")])
    assert [e["name"] for e in listed] == ["other", "style"]
    assert listed[1] == {"name": "style", "rank": LORA_RANK, "tensors": 12,
                         "size_bytes": (first / "style.safetensors").stat().st_size}
    assert not any(str(tmp_path) in str(v) for e in listed for v in e.values())
    assert lora_files([str(first), str(second)])["style"] == str((first / "style.safetensors").resolve())


def test_unknown_and_bad_names_are_not_found(tmp_path):
    library = _library(_expert(), tmp_path)
    for name in ("nope", "../x", "", "a/b"):
        with pytest.raises(LoraNotFound):
            library.get(name)


def test_keys_that_do_not_match_the_expert_are_refused_by_name(tmp_path):
    save_file({"transformer.blocks.0.attn1.to_q.lora_A.weight": torch.ones(4, TINY_INNER + 8),
               "transformer.blocks.0.attn1.to_q.lora_B.weight": torch.ones(TINY_INNER, 4)},
              str(tmp_path / "wrong.safetensors"))
    library = _library(_expert(), tmp_path)
    with pytest.raises(LoraError, match="'wrong'.*blocks.0.attn1.to_q"):
        library.get("wrong")
    assert library.cached() == []


def test_read_once_then_cached_and_lru_bounded_in_bytes(tmp_path):
    for i, name in enumerate(("a", "b", "c")):
        write_diffusers_lora(tmp_path / f"{name}.safetensors", lora_pairs(i))
    model = _expert()
    one = _library(model, tmp_path).get("a").nbytes
    library = _library(model, tmp_path, max_bytes=2 * one)
    a = library.get("a")
    assert library.get("a") is a and library.reads == 1
    assert next(iter(a.modules.values())).A.device.type == "cpu"
    library.get("b")
    library.get("a")  # a is now the most recently used
    library.get("c")  # evicts b
    assert library.cached() == ["a", "c"] and library.cached_bytes <= 2 * one
    library.get("b")
    assert library.reads == 4 and library.cached() == ["c", "b"]


def test_a_lora_larger_than_the_cache_is_refused(tmp_path):
    write_diffusers_lora(tmp_path / "big.safetensors", lora_pairs(1))
    with pytest.raises(LoraError, match="more than its whole LoRA cache"):
        _library(_expert(), tmp_path, max_bytes=100).get("big")


def test_a_file_with_a_broken_header_is_listed_without_rank(tmp_path):
    (tmp_path / "broken.safetensors").write_bytes(b"\xff" * 16)
    assert list_loras([str(tmp_path)]) == [{"name": "broken", "rank": None, "tensors": None, "size_bytes": 16}]
    with pytest.raises(LoraError, match="not a readable LoRA file"):
        _library(_expert(), tmp_path).get("broken")
