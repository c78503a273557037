"""Placement presets on fake GPUs: the tiny graph served by Ray with each preset on exactly the
GPUs it names, lip-sync at its largest replica count. Every replica starts (the shares fit), the
stages sit on the GPUs Ray gave them, and the experts never share a GPU where the preset says so.
(Ray only books fractions of a GPU; the stages run on the CPU here.)"""

from __future__ import annotations

import pytest

from deployments.profiles import PLACEMENTS
from helpers import served_graph

GPUS = {"per-stage": 5, "four-gpu": 4, "two-gpu": 2, "single-gpu": 1}
STAGES = {"encoder": "Encoder", "high": "DitExpertHigh", "low": "DitExpertLow", "decoder": "Decoder",
          "lipsync": "LipSync"}


def replica_devices(deployment: str, replicas: int) -> dict[int, str]:
    """pid -> CUDA_VISIBLE_DEVICES of each replica of `deployment` (asked until all have answered)."""
    from ray import serve

    handle = serve.get_deployment_handle(deployment, app_name="avatar-serve")
    seen: dict[int, str] = {}
    for _ in range(50):
        info = handle.info.remote().result(timeout_s=60)
        seen[info["pid"]] = info["cuda_visible_devices"]
        if len(seen) == replicas:
            break
    return seen


def test_every_preset_names_every_stage_and_experts_apart_from_two_gpus():
    assert set(GPUS) == set(PLACEMENTS)
    for preset, shares in PLACEMENTS.items():
        assert set(shares) == set(STAGES), preset
        if GPUS[preset] >= 2:  # the two experts cannot be packed onto one GPU
            assert shares["high"] + shares["low"] > 1, preset


@pytest.mark.cluster
@pytest.mark.parametrize("preset", list(GPUS))
def test_a_preset_fits_its_gpus_and_keeps_the_experts_apart(preset, tmp_path):
    lipsync = {"placement": {"autoscaling": {"min_replicas": 2, "max_replicas": 2}},
               "avatar_cache_dir": str(tmp_path / "avatars")}
    with served_graph({"placement": preset, "stages": {"lipsync": lipsync}}, num_gpus=GPUS[preset]):
        devices = {stage: replica_devices(name, 2 if stage == "lipsync" else 1) for stage, name in STAGES.items()}
    assert len(devices["lipsync"]) == 2, devices  # both replicas placed
    gpus = {d for replicas in devices.values() for d in replicas.values()}
    assert all(gpus) and gpus <= {str(i) for i in range(GPUS[preset])}, devices
    high, low = (next(iter(devices[r].values())) for r in ("high", "low"))
    assert (high != low) == (GPUS[preset] >= 2), devices
    if preset == "per-stage":  # one GPU per Wan stage
        wan = [next(iter(devices[s].values())) for s in ("encoder", "high", "low", "decoder")]
        assert len(set(wan)) == 4, devices
