"""Time each stage and the whole request, in process, against diffusers' one-process pipeline
built from the very same modules (the baseline, measured in the same run).

    python bench/stages.py --profile tiny [--repeats 5] [--size 32x32 --frames 9 --steps 4]

Writes JSON to bench/results/ (see bench/README.md for the method).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from common import summary, timed_result  # bench/common.py, beside this file
from diffusers import WanImageToVideoPipeline

from deployments.local import LocalGraph
from deployments.media.video import encode_mp4
from deployments.models.wan.sampler import make_scheduler
from deployments.profiles import load_profile


def measured(fn, device, repeats: int, warmup: int = 1):
    """(`fn`'s last result, {"median_s", "min_s", "max_s", "runs"} of its timed calls)."""
    out, times = timed_result(fn, repeats, warmup, device)
    return out, summary(times, count="runs")


def plain_modules(cfg, device: torch.device):
    """diffusers as a user runs it: its own experts and VAE from the profile's weights (random
    ones: the same seeds as the graph's), bf16 on a GPU (fp32 on a CPU), eager, unquantised."""
    from deployments.models.wan.components import load_expert, load_vae

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    transformers = tuple(load_expert(cfg.stages.high.weights, role, dtype, device) for role in ("high", "low"))
    return transformers, load_vae(cfg.stages.decoder.weights, dtype, device)


def diffusers_pipeline(cfg, encoder, transformers, vae) -> WanImageToVideoPipeline:
    """diffusers' WanImageToVideoPipeline with the encoder stage's tokenizer and text encoder,
    these experts and VAE, and the profile's sampler (its sigmas too)."""
    scheduler = make_scheduler(cfg.sampler)
    if cfg.sampler.sigmas is not None:
        st = scheduler.set_timesteps
        scheduler.set_timesteps = lambda n, device=None: st(sigmas=cfg.sampler.sigmas, device=device)
    pipe = WanImageToVideoPipeline(tokenizer=encoder.tokenizer, text_encoder=encoder.text_encoder, vae=vae,
                                   scheduler=scheduler, transformer=transformers[0],
                                   transformer_2=transformers[1], boundary_ratio=cfg.sampler.boundary_ratio)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipeline_kwargs(params, pixels: np.ndarray) -> dict:
    """The pipeline's arguments for one of our validated requests (frames as float arrays)."""
    return dict(image=PIL.Image.fromarray(pixels), prompt=params.prompt, negative_prompt=params.negative_prompt,
                height=params.height, width=params.width, num_frames=params.num_frames,
                num_inference_steps=params.num_inference_steps, guidance_scale=params.guidance_scale,
                guidance_scale_2=params.guidance_scale_2,
                generator=torch.Generator().manual_seed(params.seed), output_type="np")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", default="tiny")
    ap.add_argument("--size", default=None, help="WIDTHxHEIGHT (default: the profile's)")
    ap.add_argument("--frames", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-baseline", action="store_true")
    ap.add_argument("--out", default=None)
    ap.add_argument("--quantize", choices=["none", "fp8"], default=None, help="override the experts' quantize")
    ap.add_argument("--plain-baseline", action="store_true",
                    help="the baseline gets its own plain experts and VAE (bf16, eager, unquantised, random "
                         "weights of the same seeds) instead of the graph's modules: diffusers as a user runs it")
    args = ap.parse_args()

    overrides = {}
    if args.quantize:
        overrides = {"stages": {r: {"quantize": args.quantize} for r in ("high", "low")}}
    cfg = load_profile(args.profile, overrides)
    request = {"prompt": "a portrait of a woman who smiles and talks", "seed": 0}
    if args.size:
        request["size"] = args.size
    if args.frames:
        request["num_frames"] = args.frames
    if args.steps:
        request["num_inference_steps"] = args.steps

    t0 = time.perf_counter()
    graph = LocalGraph(cfg)
    load_s = time.perf_counter() - t0
    enc, high, low, dec = (h.target for h in (graph.encoder, graph.high, graph.low, graph.decoder))
    device = high.device
    image = np.random.RandomState(0).randint(0, 256, (480, 832, 3), dtype=np.uint8)
    params, pixels = graph.ingress.prepare(request, image)

    results: dict = {}
    cond, results["encode"] = measured(lambda: enc.encode(params, pixels), device, args.repeats)
    s_high, results["dit_high"] = measured(lambda: high.denoise(cond), device, args.repeats)
    s_low, results["dit_low"] = measured(lambda: low.denoise(cond, s_high), device, args.repeats)
    frames, results["decode"] = measured(lambda: dec.decode(s_low), device, args.repeats)
    try:
        import av  # noqa: F401
        output = "mp4"
        _, results["mp4_mux"] = measured(lambda: encode_mp4(frames.frames, frames.fps), device, args.repeats)
    except ImportError:  # a GPU host without PyAV: time the request up to uint8 frames
        output = "frames"
    _, results["request_in_process"] = measured(
        lambda: asyncio.run(graph.ingress.run(params, pixels, output)), device, args.repeats)
    results["request_in_process"]["output"] = output
    n_high = sum(s.expert == "high" for s in s_low.steps)
    results["dit_high"]["steps"], results["dit_low"]["steps"] = n_high, len(s_low.steps) - n_high

    if not args.no_baseline:
        # diffusers' one-process pipeline on the same modules and settings (output_type="np" and
        # our uint8 conversion + mux are excluded from both sides' denoise numbers alike).
        transformers, vae = (high.transformer, low.transformer), dec.vae
        if args.plain_baseline:
            transformers, vae = plain_modules(cfg, device)
        pipe = diffusers_pipeline(cfg, enc, transformers, vae)
        kwargs = pipeline_kwargs(params, pixels)
        _, results["diffusers_pipeline_baseline"] = measured(lambda: pipe(**kwargs), device, args.repeats)

    report = {
        "bench": "stages", "profile": cfg.name, "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "cpu_count": os.cpu_count(), "host": platform.node(), "torch": torch.__version__,
        "weights": "random (speed does not depend on weight values)" if cfg.stages.high.weights.kind == "random"
        else cfg.stages.high.weights.kind,
        "request": {"width": params.width, "height": params.height, "num_frames": params.num_frames,
                    "steps": params.num_inference_steps, "guidance": [params.guidance_scale, params.guidance_scale_2]},
        "load_s": load_s, "results": results,
    }
    report["quantize"] = cfg.stages.high.quantize
    report["compile"] = cfg.stages.high.compile
    report["baseline"] = "plain bf16 experts and VAE, eager" if args.plain_baseline else "the graph's modules"
    out = Path(args.out or Path(__file__).parent / "results" / f"stages-{cfg.name}-{device.type}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    for name, r in results.items():
        print(f"{name:30s} median {r['median_s'] * 1000:9.1f} ms  ({r['runs']} runs)")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
