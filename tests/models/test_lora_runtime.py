"""Per-request LoRAs applied unmerged (deployments/models/wan/lora_runtime.py): no LoRA is bit for
bit the base model, one LoRA at strength s equals its weights merged at s, hooks never outlive
the step (even one that raised), fp8 and peft-wrapped base layers take them alike."""

import pytest
import torch
from safetensors.torch import save_file

from deployments.common.errors import LoraError
from deployments.config_weights import RandomWeights
from deployments.models.wan.components import load_expert
from deployments.models.wan.lora import LoraManager
from deployments.models.wan.lora_match import prepare_lora
from deployments.models.wan.lora_runtime import LoraRuntime, runtime_lora
from helpers import DIFFUSERS_LORA_NAMES, lora_pairs, run_expert, write_diffusers_lora

# fp32 on a CPU: the unmerged sum x W^T + s (x A^T) B^T and the merged x (W + s B A)^T differ
# only by rounding order.
MERGE_ATOL = 1e-4


def _expert(role="high"):
    return load_expert(RandomWeights(arch="tiny", seed=0), role, torch.float32, "cpu")




def _runtime_lora(model, tmp_path, name="a", seed=1, scale=1.0):
    path = write_diffusers_lora(tmp_path / f"{name}.safetensors", lora_pairs(seed), scale)
    return runtime_lora(prepare_lora(model, name, path, role="high"), "cpu", torch.float32)


@torch.no_grad()
def _merge(model, pairs, strength: float):
    """W += strength * up @ down on each targeted linear: the merged reference."""
    for (i, name), (down, up) in pairs.items():
        layer = model.get_submodule(f"blocks.{i}.{DIFFUSERS_LORA_NAMES[name]}")
        layer.weight += strength * up @ down


def test_no_lora_is_bit_identical_and_no_hook_outlives_a_step(tmp_path):
    model = _expert()
    base = run_expert(model)
    runtime = LoraRuntime(model)
    lora = _runtime_lora(model, tmp_path)
    with runtime.applied([]):
        assert torch.equal(run_expert(model), base)
    with runtime.applied([(lora, 1.0)]):
        assert not torch.allclose(run_expert(model), base, atol=1e-3)
    assert torch.equal(run_expert(model), base)  # the hooks went with the step
    assert not any(m._forward_hooks for m in model.modules())
    with runtime.applied([(lora, 0.0)]):  # strength 0: off on this expert
        assert torch.equal(run_expert(model), base)


def test_hooks_are_removed_when_the_step_raises(tmp_path):
    model = _expert()
    base = run_expert(model)
    lora = _runtime_lora(model, tmp_path)
    with pytest.raises(RuntimeError, match="step failed"), LoraRuntime(model).applied([(lora, 1.0)]):
        run_expert(model)
        raise RuntimeError("step failed")
    assert torch.equal(run_expert(model), base)
    assert not any(m._forward_hooks for m in model.modules())


@pytest.mark.parametrize("strength", [1.0, 0.6, -0.5])
def test_one_lora_equals_its_weights_merged(tmp_path, strength):
    model = _expert()
    lora = _runtime_lora(model, tmp_path)
    with LoraRuntime(model).applied([(lora, strength)]):
        unmerged = run_expert(model)
    merged_model = _expert()
    _merge(merged_model, lora_pairs(1), strength)
    merged = run_expert(merged_model)
    assert not torch.allclose(merged, run_expert(_expert()), atol=1e-3)
    torch.testing.assert_close(unmerged, merged, atol=MERGE_ATOL, rtol=0)


def test_alpha_over_rank_is_applied(tmp_path):
    """A Wan-style file with alpha: scale = strength * alpha / rank, as when merged."""
    model = _expert()
    pairs = lora_pairs(3)
    sd = {}
    for (i, name), (down, up) in pairs.items():
        base = f"diffusion_model.blocks.{i}.{ {'q': 'self_attn.q', 'v': 'self_attn.v', 'ffn0': 'ffn.0'}[name]}"
        sd.update({f"{base}.lora_down.weight": down.contiguous(), f"{base}.lora_up.weight": up.contiguous(),
                   f"{base}.alpha": torch.tensor(2.0)})
    save_file(sd, str(tmp_path / "w.safetensors"))
    lora = runtime_lora(prepare_lora(model, "w", tmp_path / "w.safetensors", role="high"), "cpu", torch.float32)
    with LoraRuntime(model).applied([(lora, 0.8)]):
        unmerged = run_expert(model)
    merged_model = _expert()
    _merge(merged_model, pairs, 0.8 * 2.0 / 4)  # alpha 2, rank 4
    torch.testing.assert_close(unmerged, run_expert(merged_model), atol=MERGE_ATOL, rtol=0)


def test_two_loras_add(tmp_path):
    model = _expert()
    a, b = _runtime_lora(model, tmp_path, "a", 1), _runtime_lora(model, tmp_path, "b", 2)
    with LoraRuntime(model).applied([(a, 0.7), (b, 0.3)]):
        unmerged = run_expert(model)
    merged_model = _expert()
    _merge(merged_model, lora_pairs(1), 0.7)
    _merge(merged_model, lora_pairs(2), 0.3)
    torch.testing.assert_close(unmerged, run_expert(merged_model), atol=MERGE_ATOL, rtol=0)


def test_adds_on_top_of_an_admin_adapter(tmp_path):
    """A peft-wrapped linear (an admin LoRA active): the delta goes on its base layer, so the
    output is admin LoRA + request LoRA; the admin adapter's removal leaves the hooks' target."""
    model = _expert()
    request_lora = _runtime_lora(model, tmp_path, "req", 1)
    LoraManager(model, "high").load("admin", write_diffusers_lora(tmp_path / "adm.safetensors",
                                                                  lora_pairs(2)), target="high")
    with LoraRuntime(model).applied([(request_lora, 1.0)]):
        both = run_expert(model)
    merged_model = _expert()
    _merge(merged_model, lora_pairs(1), 1.0)
    _merge(merged_model, lora_pairs(2), 1.0)
    torch.testing.assert_close(both, run_expert(merged_model), atol=MERGE_ATOL, rtol=0)


def test_fp8_expert_takes_a_request_lora(tmp_path):
    """Fp8Linear is hooked like any linear: the delta is the same as on the bf16/fp32 model,
    computed in the expert's dtype."""
    from deployments.models.wan.fp8 import Fp8Linear, to_fp8

    model = _expert()
    lora = _runtime_lora(model, tmp_path)
    to_fp8(model)
    assert isinstance(model.blocks[0].attn1.to_q, Fp8Linear)
    base = run_expert(model)
    with LoraRuntime(model).applied([(lora, 1.0)]):
        with_lora = run_expert(model)
    assert torch.equal(run_expert(model), base)
    # Same delta as the merged LoRA's on the fp32 model, within fp8's own error of the base.
    ref_model = _expert()
    ref_base = run_expert(ref_model)
    _merge(ref_model, lora_pairs(1), 1.0)
    ref_delta = run_expert(ref_model) - ref_base
    assert (with_lora - base - ref_delta).abs().max() < 0.1 * ref_delta.abs().max()


def test_full_deltas_are_refused_by_name(tmp_path):
    model = _expert()
    sd = {"diffusion_model.blocks.0.ffn.2.diff": torch.ones(24, 32)}
    save_file(sd, str(tmp_path / "d.safetensors"))
    with pytest.raises(LoraError, match="blocks.0.ffn.2.diff"):
        runtime_lora(prepare_lora(model, "d", tmp_path / "d.safetensors", role="high"), "cpu", torch.float32)
