"""The sampler shared by the two experts: scheduler construction, the expert split, and the
scheduler state that travels with the latents from the high-noise to the low-noise expert.

diffusers' schedulers keep their whole state as plain attributes (timesteps, sigmas, step index,
UniPC's history of model outputs, ...). `export_state` copies every attribute, tensors as numpy,
and `import_state` rebuilds an identical scheduler in another process, so the split run takes
exactly the steps a one-process run takes.
"""

from __future__ import annotations

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

from deployments.common.payloads import SamplerState
from deployments.common.transport import pack_tree, unpack_tree
from deployments.config import SamplerConfig

_CLASSES = {cls.__name__: cls for cls in (UniPCMultistepScheduler, FlowMatchEulerDiscreteScheduler)}


def make_scheduler(cfg: SamplerConfig):
    """A fresh scheduler for `cfg` (flow matching, shifted by `cfg.flow_shift`)."""
    if cfg.scheduler == "unipc":
        # Wan2.2's Hub config: UniPC with flow prediction and flow sigmas.
        return UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                       flow_shift=cfg.flow_shift)
    return FlowMatchEulerDiscreteScheduler(shift=cfg.flow_shift)


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
