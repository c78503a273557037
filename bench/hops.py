"""What Ray Serve's hops cost a talk turn, without models: stand-in deployments shaped like the
turn's path (HTTP multipart upload -> an async FastAPI ingress -> `options(stream=True)` call to a
stage with the decoded audio -> the stage streams fMP4-sized pieces back through the ingress), so
the served first byte minus the stage's own time is Ray Serve's share.

    python bench/hops.py [--mode default --mode throughput ...] [--requests 30] [--out FILE]

Each mode runs in its own subprocess with its own local Ray cluster, started with that mode's
environment (Ray reads these flags at process start-up): `default` is Ray Serve as shipped;
`throughput` sets RAY_SERVE_THROUGHPUT_OPTIMIZED=1 (gRPC between replicas, direct ingress, user
code on the replica's event loop; Ray 2.56+); any other mode is `NAME:VAR=VALUE,VAR=VALUE`. A
NAME ending in `@replicas` gives its variables to the replicas only (their runtime_env, as
graph.py can), not to the cluster's own processes (controller, HTTP proxy) nor to this driver.
Per mode: the time to the first byte of a turn (median of --requests, sequential), of the whole
response, and of a bare GET (the HTTP floor). Writes JSON (default bench/results/hops-<host>.json).
"""

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from common import ROOT, free_port, spread, started_at  # bench/common.py, beside this file

MODES = {"default": {}, "throughput": {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}}


def parse_mode(text: str) -> tuple[str, dict]:
    name, _, env = text.partition(":")
    if not env:
        if name not in MODES:
            raise SystemExit(f"mode {name!r}: expected one of {sorted(MODES)} or NAME:VAR=VALUE,...")
        return name, MODES[name]
    return name, dict(pair.split("=", 1) for pair in env.split(","))


def worker(args) -> dict:
    """One mode, in this (sub)process: start Ray and the two stand-ins, time requests over HTTP."""
    import httpx
    import numpy as np
    import ray
    from fastapi import FastAPI, Request
    from fastapi.responses import StreamingResponse
    from ray import serve

    piece_bytes, pieces = args.piece_kb * 1024, args.pieces
    replica_env = json.loads(os.environ.get("HOPS_REPLICA_ENV", "{}"))
    options = {"ray_actor_options": {"runtime_env": {"env_vars": replica_env}}} if replica_env else {}

    @serve.deployment(max_ongoing_requests=8, **options)
    class Stage:
        """Streams `pieces` pieces of `piece_bytes` for any audio, at once (no model)."""

        async def stream(self, pcm: np.ndarray):
            assert pcm.dtype == np.float32
            for _ in range(pieces):
                yield bytes(piece_bytes)

    app = FastAPI()

    @serve.deployment(max_ongoing_requests=16, **options)
    @serve.ingress(app)
    class Ingress:
        def __init__(self, stage):
            self.stage = stage

        @app.get("/ping")
        async def ping(self):
            return {"ok": True}

        @app.post("/speech")
        async def speech(self, request: Request):
            form = await request.form()
            data = await form["audio"].read()
            pcm = np.frombuffer(data, dtype=np.int16).astype(np.float32) / 32768  # a WAV body's PCM, roughly

            async def body():
                async for chunk in self.stage.options(stream=True).stream.remote(pcm):
                    yield chunk

            return StreamingResponse(body(), media_type="video/mp4")

    port = free_port()
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(Ingress.bind(Stage.bind()), name="hops", route_prefix="/")
        audio = bytes(args.audio_kb * 1024)
        out = {"env": {k: v for k, v in os.environ.items() if k.startswith("RAY_SERVE_")}, "replica_env": replica_env}

        async def drive() -> None:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
                for _ in range(5):  # warm both replicas and the connections
                    await client.get("/ping")
                    (await client.post("/speech", files={"audio": ("a.wav", audio, "audio/wav")})).raise_for_status()
                pings, firsts, wholes = [], [], []
                for _ in range(args.requests):
                    t0 = time.perf_counter()
                    (await client.get("/ping")).raise_for_status()
                    pings.append(time.perf_counter() - t0)
                    t0, first, size = time.perf_counter(), None, 0
                    async with client.stream("POST", "/speech", files={"audio": ("a.wav", audio, "audio/wav")}) as r:
                        r.raise_for_status()
                        async for chunk in r.aiter_raw():
                            first = time.perf_counter() - t0 if first is None else first
                            size += len(chunk)
                    wholes.append(time.perf_counter() - t0)
                    firsts.append(first)
                    assert size == piece_bytes * pieces, size
                out.update(ping_s=spread(pings), first_byte_s=spread(firsts), whole_s=spread(wholes))

        asyncio.run(drive())
        return out
    finally:
        serve.shutdown()
        ray.shutdown()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", action="append", help="default, throughput or NAME:VAR=VALUE,... (repeat; "
                                                     "default: default and throughput)")
    ap.add_argument("--requests", type=int, default=30)
    ap.add_argument("--audio-kb", type=int, default=313, help="upload size (10 s of 16 kHz 16-bit mono WAV)")
    ap.add_argument("--piece-kb", type=int, default=256, help="size of each streamed piece")
    ap.add_argument("--pieces", type=int, default=60, help="pieces per response (a 10 s turn: about 15 MB)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:  # a mode's subprocess: print its JSON on the last line
        print(json.dumps(worker(args)), flush=True)
        return 0

    report = {"bench": "hops", "host": platform.node(), "cpu_count": os.cpu_count(), "python": sys.version.split()[0],
              "started_at": started_at(),
              "shape": {"audio_kb": args.audio_kb, "piece_kb": args.piece_kb, "pieces": args.pieces,
                        "requests": args.requests},
              "modes": {}}
    import ray
    report["ray"] = ray.__version__
    for text in args.mode or ["default", "throughput"]:
        name, env = parse_mode(text)
        cmd = [sys.executable, __file__, "--worker", name, *sys.argv[1:]]
        env = {"HOPS_REPLICA_ENV": json.dumps(env)} if name.endswith("@replicas") else env
        proc = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True, timeout=900)
        if proc.returncode:
            report["modes"][name] = {"error": proc.stderr[-2000:]}
        else:
            report["modes"][name] = json.loads(proc.stdout.strip().splitlines()[-1])
        got = report["modes"][name]
        print(f"{name:12s} first byte {got.get('first_byte_s', {}).get('median', float('nan')) * 1e3:7.1f} ms  "
              f"whole {got.get('whole_s', {}).get('median', float('nan')) * 1e3:7.1f} ms  "
              f"GET {got.get('ping_s', {}).get('median', float('nan')) * 1e3:6.1f} ms"
              + ("" if "error" not in got else f"  error: {got['error'][-300:]}"), flush=True)
    out = Path(args.out or ROOT / "bench" / "results" / f"hops-{platform.node()}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
