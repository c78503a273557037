"""Loading one Wan2.2 expert (`WanTransformer3DModel`) from single-file checkpoints.

Three layouts, all with original Wan key names (`blocks.N.self_attn.q.weight`, ...):

- safetensors, bf16 or fp32 (lightx2v distilled experts): streamed tensor by tensor into a model
  built on the meta device, each tensor read from the memory-mapped file and converted straight
  to its target dtype on the target device; no full-size fp32 copy ever exists.
- the same in fp8 e4m3 with a per-output-channel `X.weight_scale` next to each quantised
  `X.weight`: those linears become `deployments.models.wan.fp8.Fp8Linear` and stay fp8 in memory.
- GGUF (QuantStack): through diffusers' own GGUF quantizer (`from_single_file`), which keeps the
  quantised blocks resident and dequantises each linear at its forward.

The diffusers config always comes from a diffusers repo/folder (`<config>/transformer/config.json`
for the high-noise expert, `transformer_2` for the low-noise one): single files carry no config.
"""

from __future__ import annotations

from pathlib import Path

import torch
from accelerate import init_empty_weights
from diffusers import WanTransformer3DModel
from safetensors import safe_open
from torch import nn

from deployments.common.runtime import keeps_fp32
from deployments.config_weights import expert_subfolder
from deployments.models.hub import resolve_dir, resolve_file
from deployments.models.wan.fp8 import FP8, Fp8Linear, dequantize_linear_weight

SCALE_SUFFIX = ".weight_scale"
# Marker tensors some fp8 exporters add (ComfyUI's `scaled_fp8`); they carry no weights.
_IGNORED_KEYS = {"scaled_fp8"}
# Parts of diffusers' Wan converter that need real tensors (Wan-Animate's motion encoder and
# face adapter split/reshape values); a Wan2.2 I2V expert has neither.
_UNSUPPORTED_PARTS = ("motion_encoder", "face_adapter")


class CheckpointError(ValueError):
    """A checkpoint file does not match the model its config describes."""


# ------------------------------------------------------------------ key names


def wan_to_diffusers_names(keys) -> dict[str, str]:
    """Original Wan key names -> {diffusers name: original key}.

    Uses diffusers' own table, `diffusers.loaders.single_file_utils.
    convert_wan_transformer_to_diffusers` (the function `from_single_file` applies to Wan files),
    by feeding it each key as its own value: for a Wan2.2 expert it only renames keys, so the
    values come back untouched and tell which file key each diffusers name reads. No tensor is
    loaded to learn the mapping.
    """
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    keys = [k for k in keys if k not in _IGNORED_KEYS]
    bad = [k for k in keys if any(p in k for p in _UNSUPPORTED_PARTS)]
    if bad:
        raise CheckpointError(f"unsupported Wan variant (keys such as {bad[0]!r}); "
                              "only plain Wan2.x transformers load here")
    return convert_wan_transformer_to_diffusers({k: k for k in keys})


# ------------------------------------------------------------------ helpers


def _set_tensor(model: nn.Module, name: str, value: torch.Tensor) -> None:
    """Put `value` in place of the (meta) parameter or buffer `name`, without copying."""
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    if leaf in module._parameters:
        module._parameters[leaf] = nn.Parameter(value, requires_grad=False)
    elif leaf in module._buffers:
        module._buffers[leaf] = value
    else:
        raise CheckpointError(f"model has no parameter or buffer {name!r}")


def _load_config(config: str, role: str, weights_dir: str | None) -> dict:
    root = resolve_dir(config, weights_dir)
    return WanTransformer3DModel.load_config(str(root), subfolder=expert_subfolder(role),
                                             local_files_only=True)


def _swap_fp8_linears(model: nn.Module, names: list[str], dtype: torch.dtype) -> set[str]:
    """Replace the linears `names` by meta-device `Fp8Linear`s; returns the names swapped.

    Linears inside `_keep_in_fp32_modules` are left alone (their fp8 weights are dequantised to
    fp32 at load): the model reads their parameter dtype (Wan casts the timestep to the time
    embedder's dtype), which must not become float8.
    """
    swapped = set()
    for name in names:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            continue  # reported as an unexpected key by the caller
        if type(module) is not nn.Linear or keeps_fp32(model, name + ".weight"):
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, Fp8Linear(module.in_features, module.out_features,
                                         bias=module.bias is not None, device="meta",
                                         bias_dtype=dtype, compute_dtype=dtype))
        swapped.add(name)
    return swapped


# ------------------------------------------------------------------ safetensors (bf16/fp32/fp8)


def load_wan_safetensors(path: str | Path, config: dict, dtype: torch.dtype,
                         device: torch.device | str) -> WanTransformer3DModel:
    """One expert from a single safetensors file with original Wan key names.

    `config`: the diffusers transformer config (dict). bf16/fp32 tensors are converted to `dtype`
    (fp32 for `_keep_in_fp32_modules`); fp8 linears (`X.weight` float8_e4m3fn + `X.weight_scale`
    fp32 (out,) or (out, 1)) become `Fp8Linear` with their fp8 weight resident.
    """
    device = torch.device(device)
    with safe_open(str(path), framework="pt", device="cpu") as f:
        names = wan_to_diffusers_names(list(f.keys()))  # diffusers name -> file key
        fp8_targets = sorted(n[: -len(SCALE_SUFFIX)] for n in names if n.endswith(SCALE_SUFFIX))

        # Parameters on meta, buffers (RoPE tables, computed in __init__) real: nothing is
        # allocated for weights until the file's tensors are assigned.
        with init_empty_weights(include_buffers=False):
            model = WanTransformer3DModel.from_config(config)
        fp8_linears = _swap_fp8_linears(model, fp8_targets, dtype)

        expected = model.state_dict(keep_vars=True)
        dequantised = {t + ".weight" for t in fp8_targets if t not in fp8_linears}
        # Scales of dequantised linears are consumed with their weight, not assigned.
        provided = {n for n in names if not (n.endswith(SCALE_SUFFIX)
                                             and n[: -len(SCALE_SUFFIX)] + ".weight" in dequantised)}
        missing = sorted(set(expected) - provided)
        unexpected = sorted(provided - set(expected))
        if missing or unexpected:
            raise CheckpointError(
                f"{path}: does not match the config's model: {len(missing)} missing "
                f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. "
                f"{[names[u] for u in unexpected[:3]]})")

        for name in provided:
            tensor = f.get_tensor(names[name])
            target = expected[name]
            module_name = name.rpartition(".")[0]
            if module_name in fp8_linears and name.endswith(".weight"):
                if tensor.dtype != FP8:
                    raise CheckpointError(f"{names[name]} has a weight_scale but dtype {tensor.dtype}"
                                          f" (expected {FP8})")
                value = tensor.to(device)
            elif module_name in fp8_linears and name.endswith(SCALE_SUFFIX):
                value = tensor.reshape(-1).to(device=device, dtype=torch.float32)
            elif name in dequantised:
                scale = f.get_tensor(names[name[: -len(".weight")] + SCALE_SUFFIX])
                value = dequantize_linear_weight(tensor, scale, torch.float32).to(device)
            else:
                if tensor.dtype == FP8:
                    raise CheckpointError(f"{names[name]} is float8 but has no weight_scale")
                want = torch.float32 if keeps_fp32(model, name) else dtype
                value = tensor.to(device=device, dtype=want)
            if value.device.type == "cpu" and value.data_ptr() % 64:
                # safetensors hands back CPU tensors at arbitrary alignment; CPU GEMM kernels pick
                # different code paths (and summation orders) by alignment, so re-home such
                # tensors: same results as a model built in memory, and full-speed kernels.
                value = value.clone()
            if tuple(value.shape) != tuple(target.shape):
                raise CheckpointError(f"{names[name]}: shape {tuple(value.shape)} in the file, "
                                      f"{tuple(target.shape)} in the model")
            _set_tensor(model, name, value)

    # Only the non-persistent buffers (RoPE tables) are still on the CPU; they stay fp32 as in
    # from_pretrained (`rope` is in `_keep_in_fp32_modules`).
    for name, buf in list(model.named_buffers()):
        if buf.device != device:
            _set_tensor(model, name, buf.to(device))
    return model.eval()


def load_wan_safetensors_expert(weights, role: str, dtype: torch.dtype, device,
                                weights_dir: str | None = None) -> WanTransformer3DModel:
    """`WanSafetensorsWeights` -> expert. Raises `MissingWeightsError` for absent files."""
    path = resolve_file(weights.repo, weights.filename, weights_dir)
    config = _load_config(weights.config, role, weights_dir)
    return load_wan_safetensors(path, config, dtype, device)


# ------------------------------------------------------------------ GGUF


def load_gguf(path: str | Path, config_dir: str | Path, subfolder: str, dtype: torch.dtype,
              device: torch.device | str) -> WanTransformer3DModel:
    """One expert from a GGUF file through diffusers' GGUF quantizer.

    diffusers 0.42.1 reads every tensor of the file into RAM (`load_gguf_checkpoint`), renames the
    keys with `convert_wan_transformer_to_diffusers`, turns the linears whose weights are quantised
    into `GGUFLinear` (dequantised to `compute_dtype` at each forward) and loads F32/F16 tensors in
    `torch_dtype`, keeping `_keep_in_fp32_modules` in fp32. `config` must be passed: the automatic
    detection maps any Wan file to a Wan2.1 repo.
    """
    from diffusers import GGUFQuantizationConfig

    model = WanTransformer3DModel.from_single_file(
        str(path),
        quantization_config=GGUFQuantizationConfig(compute_dtype=dtype),
        config=str(config_dir),
        subfolder=subfolder,
        torch_dtype=dtype,
        local_files_only=True,
    )
    return model.to(device).eval()


def load_gguf_expert(weights, role: str, dtype: torch.dtype, device,
                     weights_dir: str | None = None) -> WanTransformer3DModel:
    """`GGUFWeights` -> expert. Raises `MissingWeightsError` for absent files."""
    path = resolve_file(weights.repo, weights.filename, weights_dir)
    config_dir = resolve_dir(weights.config, weights_dir)
    return load_gguf(path, config_dir, expert_subfolder(role), dtype, device)
