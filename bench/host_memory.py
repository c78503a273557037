"""Host memory of a replica under concurrent requests, by glibc's malloc arena limit.

    python bench/host_memory.py                       # tiny lip-sync stage, 8 threads, CPU
    python bench/host_memory.py --arenas default,2,4 --rounds 8 --turns 20

Ray Serve runs a replica's sync methods on a pool of threads, and glibc gives each thread its own
malloc arena (up to 8 per core), which keeps what the thread freed. This runs the lip-sync stage
the way a replica does (talk turns, fMP4 included, from `--threads` threads at once, plus a
repeated avatar preparation now and then) in a fresh process per setting of MALLOC_ARENA_MAX
(glibc reads it once, at start), and records the process's resident memory and the time after
every round. The placement's `malloc_arena_max` (graph.py) sets the same variable for each replica.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import ROOT, git_commit, spread, started_at  # bench/common.py, beside this file


def child(args) -> None:
    """One process, one arena setting: JSON lines of (round, rss_mib, seconds)."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np
    import psutil
    from lipsync import wav  # bench/lipsync.py, beside this file

    from deployments.common.payloads import Frames
    from deployments.lipsync import LipSync
    from deployments.profiles import load_profile

    stage = LipSync(load_profile("tiny").stages.lipsync)
    frames = np.random.default_rng(0).integers(0, 256, (5, 64, 64, 3), dtype=np.uint8)
    box = (8, 8, 56, 56)
    clip = Frames(frames=frames, fps=16)
    avatar = stage.create_avatar(clip, face_box=box).prepared_id
    audios = [wav(s) for s in (0.2, 0.5, 1.0)]
    proc = psutil.Process()

    def turn(i: int) -> int:
        size = sum(len(piece) for piece in stage.speak(avatar, audios[i % 3]))
        if i % 4 == 0:  # the same avatar again: found by its content hash
            stage.create_avatar(clip, face_box=box)
        return size

    with ThreadPoolExecutor(args.threads) as pool:
        for r in range(args.rounds):
            t0 = time.perf_counter()
            list(pool.map(turn, range(r * args.turns, (r + 1) * args.turns)))
            print(json.dumps({"round": r, "rss_mib": proc.memory_info().rss / 2**20,
                              "s": time.perf_counter() - t0}), flush=True)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arenas", default="default,2,4", help="MALLOC_ARENA_MAX values; default: glibc's")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--turns", type=int, default=20, help="talk turns per round")
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "host-memory-tiny-cpu.json"))
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return 0

    results = {}
    for setting in args.arenas.split(","):
        env = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}
        if setting != "default":
            env["MALLOC_ARENA_MAX"] = setting
        cmd = [sys.executable, __file__, "--child", "--rounds", str(args.rounds), "--turns", str(args.turns),
               "--threads", str(args.threads)]
        run = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        if run.returncode:
            print(run.stderr[-3000:], file=sys.stderr)
            return run.returncode
        rounds = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
        rss = [r["rss_mib"] for r in rounds]
        later = rss[len(rss) // 2:]  # after the first half: what the process settles at
        results[setting] = {"rss_mib": [round(v, 1) for v in rss],
                            "settled_rss_mib": spread(later),
                            "round_s_median": statistics.median(r["s"] for r in rounds)}
        print(setting, json.dumps(results[setting]), flush=True)
    report = {"bench": "host_memory", "stage": "lipsync (tiny profile, CPU)", "threads": args.threads,
              "turns_per_round": args.turns, "rounds": args.rounds, "cpu_count": os.cpu_count(),
              "git_commit": git_commit(), "started_at": started_at(), "results": results}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print("wrote", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
