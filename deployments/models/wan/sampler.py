"""The sampler shared by the two experts: scheduler construction, the expert split, and the
scheduler state that travels with the latents from the high-noise to the low-noise expert.

diffusers' schedulers keep their whole state as plain attributes (timesteps, sigmas, step index,
UniPC's history of model outputs, ...). `export_state` copies every attribute, tensors as numpy,
and `import_state` rebuilds an identical scheduler in another process, so the split run takes
exactly the steps a one-process run takes.
"""

from __future__ import annotations

import math

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

from deployments.common.payloads import SamplerState
from deployments.common.transport import pack_tree, unpack_tree
from deployments.config import SamplerConfig

_CLASSES = {cls.__name__: cls for cls in (UniPCMultistepScheduler, FlowMatchEulerDiscreteScheduler)}


# Pixel counts of Wan's 480p and 720p sizes (832x480, 1280x720): a clip takes the 720p shift
# when its pixel count is above their geometric mean (about 606.7k: 1024x576 stays 480p, 1024x608
# is 720p), i.e. when it is nearer 720p by ratio.
AREA_480P, AREA_720P = 832 * 480, 1280 * 720
_AREA_SPLIT = math.sqrt(AREA_480P * AREA_720P)


def flow_shift_for(cfg: SamplerConfig, width: int | None = None, height: int | None = None) -> float:
    """The flow shift of a width x height clip: `flow_shift_720p` for clips nearer 720p when the
    profile sets it (Wan's I2V advice: 3.0 at 480p, 5.0 at 720p), `flow_shift` otherwise."""
    if cfg.flow_shift_720p is not None and width is not None and height is not None \
            and width * height > _AREA_SPLIT:
        return cfg.flow_shift_720p
    return cfg.flow_shift


def make_scheduler(cfg: SamplerConfig, width: int | None = None, height: int | None = None):
    """A fresh scheduler for `cfg` (flow matching, shifted by `flow_shift_for(cfg, width, height)`)."""
    shift = flow_shift_for(cfg, width, height)
    if cfg.scheduler == "unipc":
        # Wan2.2's Hub config: UniPC with flow prediction and flow sigmas.
        return UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                       flow_shift=shift)
    return FlowMatchEulerDiscreteScheduler(shift=shift)


def set_timesteps(scheduler, cfg: SamplerConfig, num_inference_steps: int, device) -> None:
    if cfg.sigmas is not None:
        scheduler.set_timesteps(sigmas=list(cfg.sigmas), device=device)
    else:
        scheduler.set_timesteps(num_inference_steps, device=device)


def expert_for_step(cfg: SamplerConfig, index: int, timestep: float, num_train_timesteps: int) -> str:
    """Which expert runs step `index` at `timestep`: "high" or "low".

    Wan2.2: high while t >= boundary_ratio * num_train_timesteps. Distilled profiles name the
    number of high steps instead (`high_steps`).
    """
    if cfg.high_steps is not None:
        return "high" if index < cfg.high_steps else "low"
    return "high" if float(timestep) >= cfg.boundary_ratio * num_train_timesteps else "low"


def export_state(scheduler) -> SamplerState:
    attributes = {k: v for k, v in vars(scheduler).items() if k != "_internal_dict"}
    cpu = tuple(k for k, v in attributes.items()
                if isinstance(v, torch.Tensor) and v.device.type == "cpu")
    return SamplerState(class_name=type(scheduler).__name__, config=dict(scheduler.config),
                        attributes=pack_tree(attributes), cpu_attributes=cpu)


def import_state(state: SamplerState, device):
    """Rebuild the scheduler; tensors go back to the CPU or to `device`, where they came from."""
    try:
        cls = _CLASSES[state.class_name]
    except KeyError:
        raise ValueError(f"unknown scheduler class {state.class_name!r}") from None
    scheduler = cls.from_config(state.config)
    for key, value in state.attributes.items():
        setattr(scheduler, key, unpack_tree(value, "cpu" if key in state.cpu_attributes else device))
    return scheduler
