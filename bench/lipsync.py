"""Lip-sync speed: frames per second of a talk turn at several batch sizes, time to the first
fragmented-MP4 chunk, and aggregate frames per second with several concurrent streams.

    python bench/lipsync.py                          # tiny random models on the CPU
    python bench/lipsync.py --arch full --device cuda  # MuseTalk-size random models, fp16 (speed only)

A talk turn here is what the ingress hands the stage: 16 kHz PCM for an avatar prepared from an
81-frame 832x480 base clip (16 fps). Writes JSON to bench/results/.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch
from common import ROOT, once, timed_result, wav_bytes  # bench/common.py, beside this file

from deployments.common.payloads import Frames
from deployments.config import LipSyncConfig
from deployments.config_weights import RandomWeights
from deployments.lipsync import LipSync


def wav(seconds: float, rate: int = 24000) -> bytes:
    """Speech-like test audio: a few harmonics with a syllable-rate envelope, as a WAV file."""
    t = np.arange(int(seconds * rate)) / rate
    voice = sum(np.sin(2 * np.pi * f * t) / k for k, f in enumerate((140, 280, 420, 700), start=1))
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 4 * t)
    return wav_bytes((0.2 * voice * envelope * 32767).astype(np.int16), rate)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="tiny", choices=["tiny", "full"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seconds", type=float, default=10.0, help="audio per talk turn")
    ap.add_argument("--batches", default="8,32")
    ap.add_argument("--streams", default="1,2,4")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None)
    ap.add_argument("--channels-last", type=int, default=1)
    ap.add_argument("--cudnn-benchmark", type=int, default=0)
    ap.add_argument("--compile", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=8, help="the stage's batch (talk turns, first chunk)")
    args = ap.parse_args()

    cfg = LipSyncConfig(weights=RandomWeights(arch=args.arch), device=args.device,
                        channels_last=bool(args.channels_last), cudnn_benchmark=bool(args.cudnn_benchmark),
                        compile=bool(args.compile), batch_size=args.batch_size)
    stage = LipSync(cfg)
    device = stage.device
    rng = np.random.RandomState(0)
    clip = rng.randint(0, 256, (81, 480, 832, 3), dtype=np.uint8)
    t0 = time.perf_counter()
    info = stage.create_avatar(Frames(frames=clip, fps=16), face_box=(316, 100, 516, 330))
    avatar = stage.get_avatar(info.prepared_id)
    prepare_s = time.perf_counter() - t0
    audio = wav(args.seconds)
    pcm = stage.admit(audio).pcm
    n_frames = int(args.seconds * cfg.fps)

    # warm-up (kernels, cuDNN autotuning, compilation, allocator) at every batch size used
    for batch in {8, 32, cfg.batch_size, *(int(b) for b in args.batches.split(","))}:
        for _ in stage.pipeline.frames(avatar, pcm[: 16000 * 3], batch_size=batch):
            pass

    results: dict = {"prepare_s": prepare_s, "frames_per_turn": n_frames, "speak": {}, "first_chunk": {},
                     "concurrent": {}}
    for batch in (int(b) for b in args.batches.split(",")):
        frames, times = timed_result(
            lambda batch=batch: sum(len(c) for c in stage.pipeline.frames(avatar, pcm, batch_size=batch)),
            args.repeats, warmup=0, device=device)
        assert frames == n_frames
        results["speak"][f"batch_{batch}"] = {"median_s": statistics.median(times),
                                              "fps": n_frames / statistics.median(times)}

    # Time to first chunk: from the audio file's bytes to the first fMP4 bytes (decode included).
    firsts, totals = [], []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        stream = stage.speak(info.prepared_id, audio)
        next(stream)
        firsts.append(time.perf_counter() - t0)
        for _ in stream:
            pass
        totals.append(time.perf_counter() - t0)
    results["first_chunk"] = {"median_s": statistics.median(firsts), "turn_median_s": statistics.median(totals),
                              "turn_fps_with_mux": n_frames / statistics.median(totals),
                              "keyframe_interval": cfg.mp4_keyframe_interval, "batch_size": cfg.batch_size}

    # Several talk turns at once on one stage (threads, as concurrent requests on one replica).
    for k in (int(s) for s in args.streams.split(",")):
        done = []

        def turn():
            done.append(sum(len(c) for c in stage.pipeline.frames(avatar, pcm, batch_size=32)))

        threads = [threading.Thread(target=turn) for _ in range(k)]

        def all_turns(threads=threads):
            for th in threads:
                th.start()
            for th in threads:
                th.join()

        elapsed = once(all_turns, device)
        results["concurrent"][f"streams_{k}"] = {"s": elapsed, "aggregate_fps": sum(done) / elapsed,
                                                 "per_stream_fps": sum(done) / elapsed / k}

    report = {"bench": "lipsync", "arch": args.arch, "device": str(device),
              "settings": {"channels_last": cfg.channels_last, "cudnn_benchmark": cfg.cudnn_benchmark,
                           "compile": cfg.compile},
              "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
              "dtype": str(stage.pipeline.dtype), "torch": torch.__version__, "audio_seconds": args.seconds,
              "weights": "random (speed does not depend on weight values)", "results": results}
    out = Path(args.out or ROOT / "bench" / "results" / f"lipsync-{args.arch}-{device.type}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(json.dumps(results, indent=1))
    print("wrote", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
