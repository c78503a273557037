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
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import PIL.Image
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from diffusers import WanImageToVideoPipeline  # noqa: E402

from deployments.local import LocalGraph  # noqa: E402
from deployments.media.video import encode_mp4  # noqa: E402
from deployments.models.wan.sampler import make_scheduler  # noqa: E402
from deployments.profiles import load_profile  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, repeats: int, warmup: int = 1):
    for _ in range(warmup):
        out = fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return out, {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
                 "runs": len(times)}


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
    cond, results["encode"] = timed(lambda: enc.encode(params, pixels), device, args.repeats)
    s_high, results["dit_high"] = timed(lambda: high.denoise(cond), device, args.repeats)
    s_low, results["dit_low"] = timed(lambda: low.denoise(cond, s_high), device, args.repeats)
    frames, results["decode"] = timed(lambda: dec.decode(s_low), device, args.repeats)
    try:
        import av  # noqa: F401
        output = "mp4"
        _, results["mp4_mux"] = timed(lambda: encode_mp4(frames.frames, frames.fps), device, args.repeats)
    except ImportError:  # a GPU host without PyAV: time the request up to uint8 frames
        output = "frames"
    _, results["request_in_process"] = timed(
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
        _, results["diffusers_pipeline_baseline"] = timed(lambda: pipe(**kwargs), device, args.repeats)

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
