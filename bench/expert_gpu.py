"""One full-size Wan2.2 expert on a GPU: bf16 vs fp8 forward time and weight memory, the fp8
`_scaled_mm` self-check, and the load time of a full-size fp8 file written by this script.

    python bench/expert_gpu.py [--size 832x480 --frames 81] [--repeats 3] [--file /tmp/x.safetensors]

Random weights (speed does not depend on weight values). Writes bench/results/expert-gpu.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from common import ROOT, rel, reset_peak, sync, timed_result  # bench/common.py, beside this file

from deployments.config_weights import RandomWeights
from deployments.models.wan.checkpoints import load_wan_safetensors
from deployments.models.wan.components import load_expert
from deployments.models.wan.fp8 import Fp8Linear, gpu_selfcheck, to_fp8


def weight_bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


def forward_times(model, inputs, repeats: int, dev: torch.device) -> tuple[list[float], torch.Tensor]:
    """One warm-up forward, then `repeats` timed: (seconds each, the last output)."""
    with torch.no_grad():
        out, times = timed_result(lambda: model(**inputs, return_dict=False)[0], repeats, device=dev)
    return times, out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="832x480")
    ap.add_argument("--frames", type=int, default=81)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--file", default="/tmp/expert_fp8.safetensors")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "expert-gpu.json"))
    ap.add_argument("--arch", default="a14b", help="tiny: a CPU dry run of this script")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--compile", action="store_true", help="compile each block (compile_repeated_blocks)")
    ap.add_argument("--no-file", action="store_true", help="skip writing and loading the fp8 file")
    args = ap.parse_args()
    dev = torch.device(args.device)
    text_dim = 4096 if args.arch == "a14b" else 32
    w, h = (int(v) for v in args.size.split("x"))
    t = (args.frames - 1) // 4 + 1
    report = {"bench": "expert_gpu", "arch": args.arch,
              "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None, "torch": torch.__version__,
              "weights": "random (speed does not depend on weight values)",
              "shape": {"latents": [1, 36, t, h // 8, w // 8], "tokens": t * (h // 16) * (w // 16)},
              "repeats": args.repeats}
    report["fp8_selfcheck"] = gpu_selfcheck(args.device, m=256, k=256, n=512) if dev.type != "cuda" else gpu_selfcheck()
    print(json.dumps(report["fp8_selfcheck"], default=str))

    g = torch.Generator("cpu").manual_seed(0)
    inputs = {"hidden_states": torch.randn(1, 36, t, h // 8, w // 8, generator=g).to(dev, torch.bfloat16),
              "timestep": torch.tensor([900.0], device=dev),
              "encoder_hidden_states": torch.randn(1, 512, text_dim, generator=g).to(dev, torch.bfloat16)}

    t0 = time.perf_counter()
    model = load_expert(RandomWeights(arch=args.arch), "high", torch.bfloat16, dev)
    sync(dev)
    report["bf16"] = {"build_s": time.perf_counter() - t0, "weight_bytes": weight_bytes(model)}
    report["compiled"] = args.compile
    if args.compile:
        model.compile_repeated_blocks(fullgraph=True)
    reset_peak(dev)
    times, ref = forward_times(model, inputs, args.repeats, dev)
    report["bf16"].update(forward_s=times, median_s=statistics.median(times),
                          peak_bytes=torch.cuda.max_memory_allocated() if dev.type == "cuda" else None)
    print("bf16", report["bf16"])

    # fp8: quantise the block linears in place (rowwise e4m3), as the lightx2v fp8 files are.
    to_fp8(model)
    if args.compile:
        torch._dynamo.reset()
        model.compile_repeated_blocks(fullgraph=True)
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    reset_peak(dev)
    report["fp8"] = {"weight_bytes": weight_bytes(model),
                     "fp8_linears": sum(isinstance(m, Fp8Linear) for m in model.modules())}
    times, out8 = forward_times(model, inputs, args.repeats, dev)
    report["fp8"].update(forward_s=times, median_s=statistics.median(times),
                         peak_bytes=torch.cuda.max_memory_allocated() if dev.type == "cuda" else None, rel_err_vs_bf16=rel(out8, ref),
                         used_scaled_mm=any(getattr(m, "_scaled_mm_ok", False) for m in model.modules()))
    print("fp8", report["fp8"])

    if args.no_file:
        Path(args.out).write_text(json.dumps(report, indent=2, default=str))
        print("wrote", args.out)
        return 0
    # A full-size fp8 file in the original Wan layout (what lightx2v publishes), then a timed load.
    from safetensors.torch import save_file
    from test_checkpoints import original_name  # the test's independent inverse name mapping

    config = dict(model.config)
    state = {}
    for name, tensor in model.state_dict().items():
        state[original_name(name)] = tensor.detach().to("cpu").contiguous()
    t0 = time.perf_counter()
    save_file(state, args.file)
    report["file"] = {"path": args.file, "bytes": Path(args.file).stat().st_size,
                      "write_s": time.perf_counter() - t0}
    del model, state
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    t0 = time.perf_counter()
    loaded = load_wan_safetensors(args.file, config, torch.bfloat16, dev)
    sync(dev)
    report["file"]["load_s"] = time.perf_counter() - t0
    _, out_loaded = forward_times(loaded, inputs, 1, dev)
    report["file"]["rel_diff_loaded_vs_quantised"] = rel(out_loaded, out8)
    print("file", report["file"])

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2, default=str))
    print("wrote", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
