"""What a GPU call costs the first time it runs in a new thread.

PyTorch keeps some CUDA library state per thread: the cuDNN attention (SDPA) execution plans
(`getMHAGraphCache_`, thread_local in aten/src/ATen/native/cudnn/MHA.cpp) and the cuDNN / cuBLAS
handles. A stage warmed up in its constructor's thread and then called from a thread pool (Ray
Serve's, asyncio's default executor) pays that set-up again in the first request of every new
thread. This measures it: each op is warmed in the main thread, timed again there, then timed
as the first call of fresh threads (and the second call in each of them).

    python bench/thread_state.py --out bench/results/thread-state-h200.json
    python bench/thread_state.py --expert --warmup-forwards 1   # a full-size random fp8 expert

`--expert` builds the profile's high-noise expert as its replica does (fp8, compiled, warmed up
with `--warmup-forwards` forwards at the profile's shape) and times the forwards that follow:
three through its model thread (as requests run them), then one in this thread, new to the model.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from common import once  # bench/common.py, beside this file


def in_new_thread(fn) -> tuple[float, float]:
    """(first call, second call) of `fn` in a thread that has run nothing else."""
    out = []
    t = threading.Thread(target=lambda: out.extend([once(fn), once(fn)]))
    t.start()
    t.join()
    return out[0], out[1]


def expert(args) -> dict:
    import deployments.dit_expert as dit
    from deployments.profiles import load_profile

    dit.WARMUP_FORWARDS = args.warmup_forwards
    cfg = load_profile(args.profile, args.overrides)
    if not cfg.stages.high.warmup:
        raise SystemExit(f"profile {args.profile} warms its experts up at no shape (stages.high.warmup)")
    t0 = time.perf_counter()
    ex = dit.DitExpert(cfg.stages.high, cfg.sampler, "high")
    built = time.perf_counter() - t0
    shape = cfg.stages.high.warmup[0]
    x, ctx = ex.warmup_inputs(shape.width, shape.height, shape.num_frames)

    def forward():
        with torch.no_grad():
            return once(lambda: ex._forward_synchronised(x, ctx))

    through = [ex.model.run(forward) for _ in range(3)]
    report = {"bench": "thread_state", "mode": "expert", "device": str(ex.device),
              "torch": torch.__version__, "profile": args.profile, "warmup_forwards": args.warmup_forwards,
              "shape": [shape.width, shape.height, shape.num_frames], "build_and_warm_up_s": built,
              "forwards_on_model_thread_s": through, "forward_in_a_thread_new_to_the_model_s": forward()}
    print(json.dumps(report, indent=2))
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=3, help="fresh threads per op")
    ap.add_argument("--out", default=None)
    ap.add_argument("--expert", action="store_true", help="time a full-size expert's forwards after its warm-up")
    ap.add_argument("--profile", default="random-a14b", help="for --expert")
    ap.add_argument("--warmup-forwards", type=int, default=2, help="for --expert")
    ap.add_argument("--overrides", type=json.loads, default={}, help="for --expert: JSON merged into the profile")
    args = ap.parse_args()
    if args.expert:
        out = Path(args.out or Path(__file__).parent / "results" / "thread-state-expert.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(expert(args), indent=2))
        print(f"wrote {out}")
        return
    dev = torch.device("cuda")
    # Wan2.2 A14B at 832x480x81: self-attention over 32,760 tokens, cross-attention to 512, 40 x 128
    q = torch.randn(1, 40, 32760, 128, device=dev, dtype=torch.bfloat16)
    ctx = torch.randn(1, 40, 512, 128, device=dev, dtype=torch.bfloat16)
    # MuseTalk's UNet (SD 1.5 shape): 8 heads of 40 over 32x32 latents, cross-attention to 50 audio tokens
    uq = torch.randn(8, 8, 1024, 40, device=dev, dtype=torch.bfloat16)
    ua = torch.randn(8, 8, 50, 40, device=dev, dtype=torch.bfloat16)
    a8 = torch.randn(4096, 5120, device=dev).to(torch.float8_e4m3fn)
    b8 = torch.randn(5120, 5120, device=dev).to(torch.float8_e4m3fn).t()
    one = torch.ones((), device=dev)
    conv = torch.nn.Conv3d(16, 5120, (1, 2, 2), stride=(1, 2, 2)).to(dev, torch.bfloat16)
    lat = torch.randn(1, 16, 21, 60, 104, device=dev, dtype=torch.bfloat16)
    ops = {
        "sdpa self-attention 32760 tokens (cuDNN)": lambda: F.scaled_dot_product_attention(q, q, q),
        "sdpa cross-attention 32760 x 512 (cuDNN)": lambda: F.scaled_dot_product_attention(q, ctx, ctx),
        "sdpa UNet self 1024 tokens, d 40": lambda: F.scaled_dot_product_attention(uq, uq, uq),
        "sdpa UNet cross 1024 x 50, d 40": lambda: F.scaled_dot_product_attention(uq, ua, ua),
        "fp8 scaled_mm 4096x5120x5120 (cuBLASLt)": lambda: torch._scaled_mm(a8, b8, one, one, out_dtype=torch.bfloat16),
        "conv3d patch embedding (cuDNN)": lambda: conv(lat),
    }
    report = {"bench": "thread_state", "device": torch.cuda.get_device_name(0), "torch": torch.__version__,
              "cudnn": torch.backends.cudnn.version(), "ops": {}}
    with torch.no_grad():
        for name, fn in ops.items():
            cold = once(fn)  # the process's first call
            warm = statistics.median(once(fn) for _ in range(5))
            fresh = [in_new_thread(fn) for _ in range(args.threads)]
            report["ops"][name] = {
                "first_call_in_process_ms": cold * 1e3, "warm_same_thread_ms": warm * 1e3,
                "first_call_in_new_thread_ms": [f * 1e3 for f, _ in fresh],
                "second_call_in_that_thread_ms": [s * 1e3 for _, s in fresh]}
            print(f"{name}: same thread {warm * 1e3:.1f} ms; first call in a new thread "
                  f"{statistics.median(f for f, _ in fresh) * 1e3:.1f} ms, then "
                  f"{statistics.median(s for _, s in fresh) * 1e3:.1f} ms", flush=True)
    out = Path(args.out or Path(__file__).parent / "results" / "thread-state.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
