"""The fast-path options of the video stages on one GPU, each against the plain path, in one run:

- attention kernels at the expert's self-attention shape (1 x 32,760 tokens x 40 heads x 128):
  PyTorch SDPA's flash, cuDNN and memory-efficient backends, SageAttention (8-bit QK) when the
  `sageattention` package is installed, and cuDNN's FP8 flash attention through
  `nvidia-cudnn-frontend` when that is installed (per-tensor e4m3 scales, quantising included);
  time and error against an fp32 reference;
- one full-size fp8 expert built the way the stage builds it (block by block, random weights):
  load time and peak memory, then one forward (= one denoise step, no CFG) per attention backend
  (diffusers' `set_attention_backend`, and our `cudnn_fp8`), then compiled
  (`compile_repeated_blocks`) with the fastest; peak and resident memory after each;
- the Wan VAE: decode in bf16 plain / with cuDNN autotuning / channels-last, encode in fp32 / bf16.

    python bench/gpu_paths.py [--size 832x480 --frames 81] [--repeats 3] [--skip-expert] [--skip-vae]

Random weights (speed does not depend on weight values). Writes bench/results/gpu-paths.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from common import ROOT, git_commit, once, rel, reset_peak, started_at, summary, sync, timed

from deployments.common.runtime import memory_report, release_cached_memory
from deployments.config_weights import RandomWeights
from deployments.models.wan.components import latent_shape, load_expert, load_vae, set_conv_format

GIB = 1024 ** 3


def log(message: str) -> None:
    print(f"[gpu_paths {time.strftime('%H:%M:%S')}] {message}", flush=True)


DEV = torch.device("cuda")


def peak_gib() -> float:
    return round(torch.cuda.max_memory_allocated() / GIB, 2) if DEV.type == "cuda" else 0.0


def gib(report: dict) -> dict:
    return {k.replace("gpu_memory_", "") + "_gib": round(v / GIB, 2) for k, v in report.items()}


# ------------------------------------------------------------------ attention kernels


def attention(args, tokens: int) -> dict:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    heads, dim = 40, 128
    g = torch.Generator(DEV.type).manual_seed(0)
    q, k, v = (torch.randn(1, heads, tokens, dim, device=DEV, dtype=torch.bfloat16, generator=g)
               for _ in range(3))
    # Reference: fp32 math on the first 1024 queries (the whole score matrix would be 170 GB).
    ref = F.scaled_dot_product_attention(q[:, :, :1024].float(), k.float(), v.float())
    flops = 4 * tokens * tokens * dim * heads  # QK^T and PV
    out = {"shape": [1, heads, tokens, dim], "dtype": "bfloat16", "backends": {}}
    kernels = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
               "efficient": SDPBackend.EFFICIENT_ATTENTION}
    for name, backend in kernels.items():
        try:
            with sdpa_kernel([backend]):
                times = timed(lambda: F.scaled_dot_product_attention(q, k, v), args.repeats + 2, device=DEV)
                o = F.scaled_dot_product_attention(q, k, v)
            out["backends"][name] = {**summary(times), "tflops": flops / statistics.median(times) / 1e12,
                                     "rel_error": rel(o[:, :, :1024], ref)}
        except RuntimeError as exc:
            out["backends"][name] = {"error": str(exc).splitlines()[0][:300]}
        log(f"attention {name}: {out['backends'][name]}")
    with torch.no_grad():  # what PyTorch picks by itself
        times = timed(lambda: F.scaled_dot_product_attention(q, k, v), args.repeats + 2, device=DEV)
    out["backends"]["default"] = {**summary(times), "tflops": flops / statistics.median(times) / 1e12}
    try:
        import importlib.metadata as md

        from sageattention import sageattn

        version = md.version("sageattention")
        times = timed(lambda: sageattn(q, k, v, tensor_layout="HND", is_causal=False), args.repeats + 2,
                      device=DEV)
        o = sageattn(q, k, v, tensor_layout="HND", is_causal=False)
        out["backends"]["sage"] = {**summary(times), "version": version,
                                   "tflops": flops / statistics.median(times) / 1e12,
                                   "rel_error": rel(o[:, :, :1024], ref)}
    except Exception as exc:  # not installed, or its kernels do not build here
        out["backends"]["sage"] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"}
    log(f"attention sage: {out['backends']['sage']}")
    try:
        import importlib.metadata as md

        from fa3_fwd_interface import flash_attn_func

        def fa3(q, k, v):
            return flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)

        times = timed(lambda: fa3(q, k, v), args.repeats + 2, device=DEV)
        o = fa3(q, k, v)
        out["backends"]["fa3_bf16"] = {**summary(times), "version": md.version("fa3-fwd"),
                                       "tflops": flops / statistics.median(times) / 1e12,
                                       "rel_error": rel(o[:, :, :1024], ref)}
    except Exception as exc:  # not installed, or its kernels do not load here
        out["backends"]["fa3_bf16"] = {"error": f"{type(exc).__name__}: {str(exc)[:500]}"}
    log(f"attention fa3_bf16: {out['backends']['fa3_bf16']}")
    from deployments.models.wan import fp8_attention  # the experts' 8-bit attention, (B, S, H, D)

    eight_bit = {fp8_attention.NAME: (fp8_attention.attention, fp8_attention.quantise,
                                      torch.ops.avatar_serve.fp8_sdpa, "nvidia-cudnn-frontend"),
                 fp8_attention.FA3_NAME: (fp8_attention.attention_fa3, fp8_attention.quantise_per_head,
                                          torch.ops.avatar_serve.fa3_fp8_sdpa, "fa3-fwd")}
    for name, (function, quantise, op, package) in eight_bit.items():
        try:
            import importlib.metadata as md

            def fp8(q, k, v, run=function):
                return run(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)

            # cuDNN: the first call chooses its plan
            times = timed(lambda: fp8(q, k, v), args.repeats + 2, device=DEV)
            o = fp8(q, k, v)
            fused = torch.compile(function)  # the scaling fused, as in a compiled block
            compiled = timed(lambda: fp8(q, k, v, fused), args.repeats + 2, device=DEV)
            quantised = [quantise(t.transpose(1, 2)) for t in (q, k, v)]
            kernel = timed(lambda: op(*(t for t, _ in quantised), *(d for _, d in quantised)), args.repeats + 2,
                           device=DEV)
            out["backends"][name] = {**summary(times), "version": md.version(package),
                                     "tflops": flops / statistics.median(times) / 1e12,
                                     "rel_error": rel(o[:, :, :1024], ref),
                                     "compiled_median_s": statistics.median(compiled),
                                     "kernel_alone_median_s": statistics.median(kernel),
                                     "kernel_alone_tflops": flops / statistics.median(kernel) / 1e12,
                                     "plans": fp8_attention.PLAN_TIMES.get((1, tokens, heads, dim))
                                     if name == fp8_attention.NAME else None}
        except Exception as exc:  # not installed, or no FP8 attention engine for this GPU
            out["backends"][name] = {"error": f"{type(exc).__name__}: {str(exc)[:500]}"}
        log(f"attention {name}: {out['backends'][name]}")
    return out


# ------------------------------------------------------------------ one fp8 expert


def use_attention(model, backend: str) -> None:
    """A diffusers attention backend for every attention, or `cudnn_fp8` / `fa3_fp8` (the experts'
    8-bit self-attention, deployments/models/wan/fp8_attention.py) as `attention_backend` sets it."""
    from diffusers.models.transformers.transformer_wan import WanAttnProcessor

    from deployments.models.wan import fp8_attention

    for block in model.blocks:
        block.attn1.set_processor(WanAttnProcessor())
    eight_bit = backend in fp8_attention.BACKENDS
    model.set_attention_backend("native" if eight_bit else backend)
    if eight_bit:  # self-attention in 8 bits, cross-attention as PyTorch picks
        fp8_attention.use_fp8_self_attention(model, DEV, backend)


def expert(args, width: int, height: int, frames: int) -> dict:
    dev = DEV
    release_cached_memory(dev)
    reset_peak(dev)
    t0 = time.perf_counter()
    model = load_expert(RandomWeights(arch=args.arch, seed=0), "high", torch.bfloat16, dev, quantize="fp8")
    sync(dev)
    out = {"quantize": "fp8", "load_s": time.perf_counter() - t0, "after_load": gib(memory_report(dev))}
    release_cached_memory(dev)
    out["after_release"] = gib(memory_report(dev))
    log(f"expert built: {out}")
    shape = latent_shape(width, height, frames)
    g = torch.Generator("cpu").manual_seed(1)
    config = model.config
    inputs = {"hidden_states": torch.randn(1, config.in_channels, *shape[2:], generator=g).to(dev, torch.bfloat16),
              "timestep": torch.full((1,), 900.0, device=dev),
              "encoder_hidden_states": torch.randn(1, 512, config.text_dim, generator=g).to(dev, torch.bfloat16),
              "return_dict": False}
    out["tokens"] = shape[2] * (shape[3] // 2) * (shape[4] // 2)
    out["eager"], reference = {}, None
    with torch.no_grad():
        for backend in args.backends:
            try:
                use_attention(model, backend)
                reset_peak(dev)
                times = timed(lambda: model(**inputs), args.repeats, device=dev)
                y = model(**inputs)[0]
            except Exception as exc:
                out["eager"][backend] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"}
                log(f"expert eager {backend}: {out['eager'][backend]}")
                continue
            reference = y if reference is None else reference
            out["eager"][backend] = {**summary(times), "rel_vs_first": rel(y, reference),
                                     **gib(memory_report(dev))}
            log(f"expert eager {backend}: {out['eager'][backend]}")
        ok = {b: r for b, r in out["eager"].items() if "median_s" in r}
        fastest = min(ok, key=lambda b: ok[b]["median_s"])
        # Compiled: the fastest eager backend, and each 8-bit one besides (they differ most compiled).
        out["compiled_by_backend"] = {}
        for backend in dict.fromkeys([fastest, *(b for b in ok if b in args.compile_backends)]):
            torch._dynamo.reset()
            use_attention(model, backend)
            model.compile_repeated_blocks(fullgraph=True)
            reset_peak(dev)
            first = once(lambda: model(**inputs), dev)
            times = timed(lambda: model(**inputs), args.repeats, warmup=0, device=dev)
            y = model(**inputs)[0]
            result = {"attention_backend": backend, "first_call_s": first, **summary(times),
                      "rel_vs_eager_first": rel(y, reference), **gib(memory_report(dev))}
            if args.profile:
                result["profile"] = kernel_profile(lambda: model(**inputs))
            out["compiled_by_backend"][backend] = result
            log(f"expert compiled {backend}: { {k: v for k, v in result.items() if k != 'profile'} }")
        out["compiled"] = min(out["compiled_by_backend"].values(), key=lambda r: r["median_s"])
    return out


def kernel_profile(fn, top: int = 25) -> dict:
    """One call of `fn` under torch.profiler: GPU time by kind of kernel (attention, GEMM, the
    rest) and the `top` kernels by total time. Where a step's time goes, to aim the next change."""
    from torch.profiler import ProfilerActivity, profile

    cuda = DEV.type == "cuda"
    sync(DEV)
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        fn()
        sync(DEV)
    kinds = {"attention": ("fmha", "flash", "attn", "sdpa", "cudnn_generated"),
             "gemm": ("gemm", "cutlass", "xmma", "nvjet", "scaled_mm", "sm90_", "cublas")}
    by_kind, kernels = {"attention": 0.0, "gemm": 0.0, "other": 0.0}, []
    for event in prof.key_averages():
        us = event.self_device_time_total if cuda else event.self_cpu_time_total
        if not us or event.count == 0:
            continue
        name = event.key.lower()
        kind = next((k for k, words in kinds.items() if any(w in name for w in words)), "other")
        by_kind[kind] += us / 1e6
        kernels.append({"name": event.key[:160], "kind": kind, "calls": event.count, "total_s": us / 1e6})
    kernels.sort(key=lambda k: -k["total_s"])
    return {"by_kind_s": by_kind, "total_s": sum(by_kind.values()), "top": kernels[:top]}


# ------------------------------------------------------------------ VAE


def vae(args, width: int, height: int, frames: int) -> dict:
    dev = DEV
    out = {"decode": {}, "encode": {}}
    shape = latent_shape(width, height, frames)
    g = torch.Generator("cpu").manual_seed(2)
    latents = torch.randn(*shape, generator=g)
    video = torch.rand(1, 3, frames, height, width, generator=g) * 2 - 1
    vae_bf16 = load_vae(RandomWeights(arch=args.arch, seed=0), torch.bfloat16, dev)
    z = latents.to(dev, torch.bfloat16)
    torch.backends.cudnn.benchmark = False
    variants = [("plain", False, False), ("cudnn_benchmark", True, False), ("channels_last", False, True),
                ("channels_last+benchmark", True, True)]
    reference = None
    with torch.no_grad():
        for name, bench, channels_last in variants:
            torch.backends.cudnn.benchmark = bench
            if channels_last:
                set_conv_format(vae_bf16, torch.channels_last_3d)
            reset_peak(dev)
            times = timed(lambda: vae_bf16.decode(z, return_dict=False), args.repeats, device=dev)
            y = vae_bf16.decode(z, return_dict=False)[0]
            reference = y if reference is None else reference
            out["decode"][name] = {**summary(times), "rel_vs_plain": rel(y, reference),
                                   "peak_allocated_gib": peak_gib()}
            log(f"vae decode {name}: {out['decode'][name]}")
        set_conv_format(vae_bf16, torch.contiguous_format)
        vae_fp32 = load_vae(RandomWeights(arch=args.arch, seed=0), torch.float32, dev)
        encoded = {}
        for bench in (False, True):
            torch.backends.cudnn.benchmark = bench
            for dtype, model in ((torch.float32, vae_fp32), (torch.bfloat16, vae_bf16)):
                name = f"{str(dtype).split('.')[-1]}{'+benchmark' if bench else ''}"
                x = video.to(dev, dtype)
                reset_peak(dev)
                times = timed(lambda: model.encode(x).latent_dist.mode(), args.repeats, device=dev)
                encoded[name] = model.encode(x).latent_dist.mode().float()
                out["encode"][name] = {**summary(times), "rel_vs_float32": rel(encoded[name], encoded["float32"]),
                                       "peak_allocated_gib": peak_gib()}
                log(f"vae encode {name}: {out['encode'][name]}")
        set_conv_format(vae_fp32, torch.channels_last_3d)  # what the decoder does, for the encoder
        x = video.to(dev, torch.float32)
        for bench in (False, True):
            torch.backends.cudnn.benchmark = bench
            name = f"float32+channels_last{'+benchmark' if bench else ''}"
            reset_peak(dev)
            times = timed(lambda: vae_fp32.encode(x).latent_dist.mode(), args.repeats, device=dev)
            y = vae_fp32.encode(x).latent_dist.mode().float()
            out["encode"][name] = {**summary(times), "rel_vs_float32": rel(y, encoded["float32"]),
                                   "peak_allocated_gib": peak_gib()}
            log(f"vae encode {name}: {out['encode'][name]}")
    torch.backends.cudnn.benchmark = False
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="832x480")
    ap.add_argument("--frames", type=int, default=81)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--backends", default="native,_native_cudnn,_native_flash,_native_efficient,cudnn_fp8",
                    help="diffusers attention backends to time in the expert, comma-separated")
    ap.add_argument("--compile-backends", default="cudnn_fp8,fa3_fp8",
                    help="backends compiled besides the fastest eager one, comma-separated")
    ap.add_argument("--profile", action="store_true",
                    help="profile one compiled step per backend: GPU time by kind of kernel")
    ap.add_argument("--skip-attention", action="store_true")
    ap.add_argument("--skip-expert", action="store_true")
    ap.add_argument("--skip-vae", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "gpu-paths.json"))
    ap.add_argument("--arch", default="a14b", help="random weights' size (tiny: a CPU smoke run)")
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    args.backends = [b for b in args.backends.split(",") if b]
    args.compile_backends = [b for b in args.compile_backends.split(",") if b]
    global DEV
    DEV = torch.device(args.device)
    if DEV.type == "cuda" and not torch.cuda.is_available():
        print("error: needs a CUDA GPU (or --device cpu --arch tiny for a smoke run)", file=sys.stderr)
        return 2
    width, height = (int(v) for v in args.size.split("x"))
    report = {"bench": "gpu_paths", "device": torch.cuda.get_device_name(0) if DEV.type == "cuda" else "cpu", "torch": torch.__version__,
              "git_commit": git_commit(), "weights": "random (speed only)", "started_at": started_at(),
              "request": {"width": width, "height": height, "num_frames": args.frames}}
    shape = latent_shape(width, height, args.frames)
    sections = [("attention", not args.skip_attention, lambda: attention(args, shape[2] * shape[3] * shape[4] // 4)),
                ("expert", not args.skip_expert, lambda: expert(args, width, height, args.frames)),
                ("vae", not args.skip_vae, lambda: vae(args, width, height, args.frames))]
    for name, wanted, run in sections:
        if not wanted:
            continue
        try:
            report[name] = run()
        except Exception as exc:  # one section failing must not lose the others' numbers
            report[name] = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
            log(f"{name} failed: {report[name]['error']}")
        release_cached_memory(DEV)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2))
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
