"""Served benchmark: start Ray and the graph as a user would (`ray start`, `serve deploy`), drive
it over HTTP like a client, and measure the same requests in process (`LocalGraph`) on the same
build. Writes one JSON file (default bench/results/serve-<profile>-<device>.json).

    # CPU, tiny random models (the profile's 32x32x9 clips):
    python bench/serve.py --profile tiny --turn-seconds 2 --turn-concurrency 1,2 --video-concurrency 1,2 --repeats 2
    # GPU, full-size random weights (one GPU per stage):
    python bench/serve.py --profile random-a14b --video-size 832x480 --video-frames 81 --turn-concurrency 1,4,8,16

Phases: (1) in process, in a subprocess so its GPU memory is freed before (2): the served graph.
Both measure one video request (the first one on its own: it may pay a compile), --repeats
sequential ones and --video-concurrency batches (different seeds); the creation of an avatar;
then a warm-up talk turn and, --repeats times per --turn-concurrency, that many turns at once
(time to the first fMP4 byte and to the last; frames = floor(turn_seconds * 25)). The served
phase adds start-up time, per-stage times from Ray's Prometheus endpoint and where each stage runs.

The cluster is this script's own (`ray start --head --block` on free ports, a child process):
it is stopped at the end, on errors and on Ctrl-C, without touching other Ray clusters on the
machine; `--ray-stop` also runs `ray stop --force`, which stops every Ray process of the user.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import io
import json
import math
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import wave
from collections import Counter, defaultdict
from datetime import datetime, timezone
from pathlib import Path

import httpx
import numpy as np
import yaml

ROOT = Path(__file__).resolve().parent.parent
APP = "avatar-serve"
STAGES = ["Encoder", "DitExpertHigh", "DitExpertLow", "Decoder", "LipSync"]
FPS = 25
PROMPT = "a portrait of a woman who smiles and talks"
AVATAR_SEED = 4242


class BenchError(RuntimeError):
    """Start-up failed: the message says why."""


class HttpFailure(RuntimeError):
    def __init__(self, r: httpx.Response):
        try:
            message = r.json()["error"]["message"]
        except Exception:  # not our error envelope
            message = r.text[:500]
        self.status = r.status_code
        super().__init__(f"HTTP {r.status_code}: {message}")


# ------------------------------------------------------------------ inputs and statistics


def portrait_png(width: int, height: int) -> bytes:
    sys.path.insert(0, str(ROOT))
    from deployments.cli import demo_image  # numpy + PIL only

    return demo_image(width, height)


def speech_wav(seconds: float, rate: int = 16000) -> bytes:
    """16 kHz mono 16-bit: a 220 Hz tone with a 3 Hz (syllable-like) amplitude envelope."""
    t = np.arange(int(seconds * rate)) / rate
    pcm = 0.3 * 32767 * np.sin(2 * np.pi * 220 * t) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t))
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(rate)
        w.writeframes(pcm.astype(np.int16).tobytes())
    return buf.getvalue()


def spread(values: list[float]) -> dict | None:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)} if values else None


async def timed(fn, *args) -> dict:
    """One call of `fn` -> {"s": seconds, ...what fn returned} or {"s", "status", "error"}."""
    t0 = time.perf_counter()
    try:
        result = await fn(*args)
    except Exception as exc:  # recorded, not fatal: the benchmark reports failures
        return {"s": time.perf_counter() - t0, "status": getattr(exc, "status", None),
                "error": f"{type(exc).__name__}: {exc}"}
    return {"s": time.perf_counter() - t0, "status": 200, **result}


def latencies(runs: list[dict]) -> dict:
    ok = [r["s"] for r in runs if "error" not in r]
    return {"latency_s": spread(ok), "runs": len(runs), "failures": len(runs) - len(ok),
            "statuses": dict(Counter(str(r["status"]) for r in runs)), "errors": [r["error"] for r in runs if "error" in r]}


# ------------------------------------------------------------------ the measurements (both phases)


async def video_phase(one, args) -> dict:
    """`one(seed)` makes one video request."""
    out = {"first": await timed(one, 0), "sequential": latencies([await timed(one, 1 + i) for i in range(args.repeats)])}
    out["concurrent"] = {}
    for n in args.video_concurrency:
        t0 = time.perf_counter()
        runs = await asyncio.gather(*(timed(one, 100 * n + i) for i in range(n)))
        out["concurrent"][str(n)] = {**latencies(runs), "wall_s": time.perf_counter() - t0}
    return out


async def turn_phase(one, args) -> dict:
    """`one()` makes one talk turn -> {"first_s", "bytes"}."""
    frames = math.floor(args.turn_seconds * FPS)
    out = {"turn_seconds": args.turn_seconds, "frames_per_turn": frames, "warmup": await timed(one), "concurrency": {}}
    for n in args.turn_concurrency:
        turns, aggregates, walls = [], [], []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            batch = await asyncio.gather(*(timed(one) for _ in range(n)))
            walls.append(time.perf_counter() - t0)
            aggregates.append(frames * sum("error" not in t for t in batch) / walls[-1])
            turns += batch
        ok = [t for t in turns if "error" not in t]
        out["concurrency"][str(n)] = {
            "batches": args.repeats, "turns": len(turns), "failures": len(turns) - len(ok),
            "errors": [t["error"] for t in turns if "error" in t], "wall_s": spread(walls),
            "first_byte_s": spread([t["first_s"] for t in ok]), "duration_s": spread([t["s"] for t in ok]),
            "fps_per_turn": spread([frames / t["s"] for t in ok]), "aggregate_fps": statistics.median(aggregates),
            "bytes": spread([t["bytes"] for t in ok])}
    return out


async def inprocess(args, request: dict, image: bytes, audio: bytes) -> dict:
    import torch

    from deployments.config import load_profile
    from deployments.local import LocalGraph

    out = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu", "torch": torch.__version__}
    t0 = time.perf_counter()
    graph = LocalGraph(load_profile(args.profile, args.overrides))
    out["load_s"] = time.perf_counter() - t0
    ingress = graph.ingress

    async def video(seed):
        return {"bytes": len((await ingress.generate({**request, "seed": seed}, image, "mp4")).mp4)}

    async def create_avatar():
        avatar, _ = ingress.create_avatar({**request, "seed": AVATAR_SEED}, image)
        while (avatar := ingress.avatar(avatar.id)).status in ("queued", "in_progress"):
            await asyncio.sleep(0.05)
        if avatar.status != "ready":
            raise RuntimeError(f"avatar {avatar.status}: {avatar.error}")
        return {"id": avatar.id}

    async def turn():
        t0, first, size = time.perf_counter(), None, 0
        async for piece in ingress.speak(avatar_id, audio, 0):
            first = time.perf_counter() - t0 if first is None else first
            size += len(piece)
        return {"first_s": first, "bytes": size}

    out["video"] = await video_phase(video, args) if not args.skip_video else None
    if not args.skip_turns:
        out["avatar"] = await timed(create_avatar)
        avatar_id = out["avatar"].get("id")
        if avatar_id:
            out["turns"] = await turn_phase(turn, args)
    return out


async def served(args, base: str, request: dict, image: bytes, audio: bytes) -> dict:
    fields = {k: str(v) for k, v in request.items()}
    picture = {"input_reference": ("portrait.png", image, "image/png")}
    async with httpx.AsyncClient(base_url=base, timeout=httpx.Timeout(args.request_timeout, connect=30)) as client:

        async def video(seed):
            r = await client.post("/v1/videos/sync", data={**fields, "seed": str(seed)}, files=picture)
            if r.status_code != 200 or not r.content:
                raise HttpFailure(r)
            return {"bytes": len(r.content)}

        async def create_avatar():
            r = await client.post("/v1/avatars", data={**fields, "seed": str(AVATAR_SEED)}, files=picture)
            if r.status_code not in (200, 201):
                raise HttpFailure(r)
            avatar, deadline = r.json(), time.monotonic() + args.request_timeout
            while avatar["status"] in ("queued", "in_progress") and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
                avatar = (await client.get(f"/v1/avatars/{avatar['id']}")).json()
            if avatar["status"] != "ready":
                raise RuntimeError(f"avatar {avatar['status']}: {avatar.get('error')}")
            return {"id": avatar["id"], "http_status": r.status_code}

        async def turn():
            files = {"audio": ("speech.wav", audio, "audio/wav")}
            t0, first, size = time.perf_counter(), None, 0
            async with client.stream("POST", f"/v1/avatars/{avatar_id}/speech", files=files) as r:
                if r.status_code != 200:
                    await r.aread()
                    raise HttpFailure(r)
                async for piece in r.aiter_raw():
                    first = time.perf_counter() - t0 if first is None else first
                    size += len(piece)
            if not size:
                raise RuntimeError("empty speech response")
            return {"first_s": first, "bytes": size}

        out = {"video": await video_phase(video, args) if not args.skip_video else None}
        if not args.skip_turns:
            out["avatar"] = await timed(create_avatar)
            avatar_id = out["avatar"].get("id")
            if avatar_id:
                out["turns"] = await turn_phase(turn, args)
    return out


# ------------------------------------------------------------------ the cluster


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli(name: str) -> str:
    path = Path(sys.executable).parent / name
    return str(path) if path.exists() else (shutil.which(name) or name)


def tail(path: Path, n: int = 30) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:]) if path.exists() else ""


def _own_session_dying_with_parent() -> None:
    """preexec_fn of `ray start --block`: Ctrl-C in the terminal does not reach it (we stop it
    ourselves, after `serve shutdown`), and it gets SIGTERM (and stops its cluster) if we die."""
    os.setsid()
    try:
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG (Linux)
    except (OSError, AttributeError):
        pass


def start_ray(args, env: dict, ports: dict, log: Path) -> subprocess.Popen:
    """`ray start --head --block` as a child process (returned at once: wait_dashboard waits)."""
    cmd = [cli("ray"), "start", "--head", "--block", f"--port={ports['gcs']}", f"--num-cpus={os.cpu_count()}",
           f"--metrics-export-port={ports['metrics']}", "--dashboard-host=127.0.0.1",
           f"--dashboard-port={ports['dashboard']}", f"--ray-client-server-port={ports['client']}",
           f"--dashboard-agent-listen-port={ports['agent']}", "--disable-usage-stats"]
    if args.num_gpus is not None:
        cmd.append(f"--num-gpus={args.num_gpus}")
    print("$", " ".join(cmd), file=sys.stderr)
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, preexec_fn=_own_session_dying_with_parent)


def wait_dashboard(proc: subprocess.Popen, args, ports: dict, log: Path) -> None:
    deadline = time.monotonic() + args.startup_timeout
    while True:
        if proc.poll() is not None:
            raise BenchError(f"ray start exited with {proc.returncode}:\n{tail(log)}")
        try:
            if httpx.get(f"http://127.0.0.1:{ports['dashboard']}/api/version", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise BenchError(f"Ray's dashboard did not answer within {args.startup_timeout} s:\n{tail(log)}")
        time.sleep(1)


def app_status(dashboard: str) -> dict | None:
    """The application's entry of `serve status` (from the same REST API the command reads)."""
    try:
        return httpx.get(f"{dashboard}/api/serve/applications/", timeout=10).json()["applications"].get(APP)
    except (httpx.HTTPError, ValueError, KeyError, AttributeError):
        return None


def wait_ready(base: str, dashboard: str, timeout: float) -> str:
    """Until GET /readyz answers 200 (or, without that route, the app is RUNNING and /healthz is
    200); raises BenchError at once on DEPLOY_FAILED / UNHEALTHY. -> how readiness was seen."""
    deadline, last = time.monotonic() + timeout, "no answer"
    while True:
        app = app_status(dashboard) or {}
        if app.get("status") in ("DEPLOY_FAILED", "UNHEALTHY"):
            bad = {n: d.get("message") for n, d in (app.get("deployments") or {}).items() if d.get("status") != "HEALTHY"}
            raise BenchError(f"application {app['status']}: {app.get('message')}"
                             + "".join(f"\n  {n}: {m}" for n, m in bad.items() if m))
        try:
            r = httpx.get(f"{base}/readyz", timeout=10)
            last = f"/readyz {r.status_code}: {r.text[:300]}"
            if r.status_code == 200:
                return "readyz"
            if r.status_code == 404 and app.get("status") == "RUNNING" \
                    and httpx.get(f"{base}/healthz", timeout=10).status_code == 200:
                return "serve status RUNNING (no /readyz route)"
        except httpx.HTTPError as exc:
            last = f"/readyz: {type(exc).__name__}"
        if time.monotonic() > deadline:
            raise BenchError(f"not ready after {timeout:.0f} s (app {app.get('status')}; last {last})")
        time.sleep(1)


METRIC = re.compile(r"^(ray_)?(avatar_serve_stage_latency_seconds_sum|avatar_serve_stage_latency_seconds_count"
                    r"|avatar_serve_gpu_memory_bytes)\{([^}]*)\}\s+(\S+)", re.M)
LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def parse_metrics(text: str) -> dict:
    """Prometheus text -> mean seconds and count per stage.method, GPU bytes per stage (series of
    several replicas summed; the `ray_`-prefixed names are used when present)."""
    found = defaultdict(lambda: defaultdict(float))
    for prefix, name, labels, value in METRIC.findall(text):
        tags = dict(LABEL.findall(labels))
        key = tags.get("stage", "?") + ("" if name.endswith("bytes") else "." + tags.get("method", "?"))
        found[prefix][(name.rsplit("_", 1)[-1], key)] += float(value)
    series = found.get("ray_") or found.get("") or {}
    latency = {k: {"mean_s": series[("sum", k)] / c, "count": int(c)}
               for (kind, k), c in sorted(series.items()) if kind == "count" and c}
    return {"stage_latency": latency, "gpu_memory_bytes": {k: v for (kind, k), v in series.items() if kind == "bytes"}}


def stage_metrics(url: str, wait_s: float = 60, settle_s: float = 11) -> dict:
    """Ray reports metrics every ~10 s: read until the counts stay the same for `settle_s`."""
    deadline, previous, seen_at = time.monotonic() + wait_s, None, time.monotonic()
    while True:
        try:
            current = parse_metrics(httpx.get(url, timeout=10).text)
        except httpx.HTTPError as exc:
            current = {"error": f"{type(exc).__name__}: {exc}"}
        if current != previous:
            previous, seen_at = current, time.monotonic()
        elif current.get("stage_latency") and time.monotonic() - seen_at >= settle_s:
            return current
        if time.monotonic() > deadline:
            return current
        time.sleep(2)


PLACEMENT = """
import json, sys, ray
from ray import serve
ray.init(address=sys.argv[1], log_to_driver=False, logging_level="ERROR")
out = {}
for name in sys.argv[2:]:
    try:
        out[name] = serve.get_deployment_handle(name, app_name="%s").info.remote().result(timeout_s=60)
    except Exception as exc:
        out[name] = {"error": f"{type(exc).__name__}: {exc}"}
print(json.dumps(out, default=str))
""" % APP


def placement(gcs: str, env: dict) -> dict:
    out: dict = {}
    try:
        p = subprocess.run([sys.executable, "-c", PLACEMENT, gcs, *STAGES], cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=300)
        out["stages"] = json.loads(p.stdout.strip().splitlines()[-1]) if p.returncode == 0 else None
        if p.returncode:
            out["error"] = f"exit {p.returncode}: {p.stderr[-2000:]}"
    except Exception as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"
    if shutil.which("nvidia-smi"):
        try:
            smi = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=60).stdout
            names = {str(i.get("pid")): n for n, i in (out.get("stages") or {}).items()}
            rows = [line.split(",") for line in smi.strip().splitlines() if "," in line]
            out["nvidia_smi"] = smi
            out["gpu_memory_by_replica_mib"] = {names.get(pid.strip(), "pid " + pid.strip()): float(mib)
                                                for pid, mib in rows}
        except Exception as exc:
            out["nvidia_smi_error"] = f"{type(exc).__name__}: {exc}"
    return out


def stop_ray(proc: subprocess.Popen | None, dashboard: str, env: dict, ray_stop: bool) -> None:
    """`serve shutdown -y`, then SIGTERM to our `ray start --block` (it stops its node's
    processes), SIGKILL to its process group if it lingers; `ray stop --force` only if asked."""
    if proc is not None and proc.poll() is None:
        print("stopping: serve shutdown, then our Ray node", file=sys.stderr)
        try:
            subprocess.run([cli("serve"), "shutdown", "-y", "-a", dashboard], cwd=ROOT, env=env, timeout=120,
                           stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, check=False)
        except subprocess.TimeoutExpired:
            print("serve shutdown timed out; stopping the node anyway", file=sys.stderr)
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
    if ray_stop:
        subprocess.run([cli("ray"), "stop", "--force"], env=env, timeout=120, check=False)


# ------------------------------------------------------------------ main


def summary(report: dict) -> str:
    def s(x, key="median"):
        return "-" if not x else f"{x[key]:.3f}" if isinstance(x, dict) else f"{x:.3f}" if isinstance(x, float) else str(x)

    phases = {"in-process": report.get("inprocess") or {}, "served": report.get("served") or {}}
    rows = [("start-up s (load / deploy->ready)", [s(phases["in-process"].get("load_s")), s(report.get("startup_s"))])]
    for label, get in [("video first s", lambda p: s((p.get("first") or {}).get("s"))),
                       ("video sequential median s", lambda p: s(p["sequential"]["latency_s"]))]:
        rows.append((label, [get(p["video"]) if p.get("video") else "-" for p in phases.values()]))
    names = sorted({n for p in phases.values() for n in ((p.get("video") or {}).get("concurrent") or {})}, key=int)
    for n in names:
        rows.append((f"video x{n} median s / wall s", [
            f"{s(c['latency_s'])} / {c['wall_s']:.3f}" if (c := ((p.get("video") or {}).get("concurrent") or {}).get(n))
            else "-" for p in phases.values()]))
    rows.append(("avatar create s", [s((p.get("avatar") or {}).get("s")) for p in phases.values()]))
    names = sorted({n for p in phases.values() for n in ((p.get("turns") or {}).get("concurrency") or {})}, key=int)
    for n in names:
        cells = []
        for p in phases.values():
            c = ((p.get("turns") or {}).get("concurrency") or {}).get(n)
            cells.append(f"{s(c['first_byte_s'])} / {s(c['fps_per_turn'], 'median')} / {c['aggregate_fps']:.1f}"
                         + (f" ({c['failures']} failed)" if c["failures"] else "") if c else "-")
        rows.append((f"turns x{n}: 1st byte s / fps/turn / agg fps", cells))
    width = max(len(r[0]) for r in rows)
    lines = [f"{'':{width}}  {'in-process':>28}  {'served':>28}"]
    lines += [f"{label:{width}}  {a:>28}  {b:>28}" for label, (a, b) in rows]
    for key, m in (report.get("stage_metrics") or {}).get("stage_latency", {}).items():
        lines.append(f"  stage {key:{width - 8}}  mean {m['mean_s'] * 1000:9.1f} ms  over {m['count']} calls")
    lines.append(f"failures: {len(report['failures'])}" + "".join(f"\n  {f}" for f in report["failures"][:20]))
    return "\n".join(lines)


def failures_of(phase: str, result: dict | None) -> list[str]:
    """Every failed request in a phase's result, as 'phase: error'."""
    out = []

    def walk(x):
        if isinstance(x, dict):
            if isinstance(x.get("error"), str):
                out.append(f"{phase}: {x['error']}")
            for v in x.values():
                walk(v)
            out.extend(f"{phase}: {e}" for e in x.get("errors", []) if isinstance(x.get("errors"), list))
        elif isinstance(x, list):
            for v in x:
                walk(v)

    walk(result)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="tiny")
    ap.add_argument("--overrides", type=json.loads, default={}, help="JSON merged into the profile")
    ap.add_argument("--port", type=int, default=8000, help="Serve's HTTP port")
    ap.add_argument("--out", default=None, help="default bench/results/serve-<profile>-<device>.json")
    ints = lambda text: [int(v) for v in text.split(",") if v.strip()]  # noqa: E731
    ap.add_argument("--video-concurrency", type=ints, default=[1, 4])
    ap.add_argument("--video-size", default=None, help="WIDTHxHEIGHT (default: the profile's)")
    ap.add_argument("--video-frames", type=int, default=None)
    ap.add_argument("--turn-concurrency", type=ints, default=[1, 4, 8, 16])
    ap.add_argument("--turn-seconds", type=float, default=10.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-inprocess", action="store_true")
    ap.add_argument("--skip-video", action="store_true")
    ap.add_argument("--skip-turns", action="store_true")
    ap.add_argument("--startup-timeout", type=float, default=900)
    ap.add_argument("--request-timeout", type=float, default=3600, help="per HTTP request / avatar preparation")
    ap.add_argument("--num-gpus", type=float, default=None, help="passed to `ray start` (default: Ray detects)")
    ap.add_argument("--ray-stop", action="store_true", help="also run `ray stop --force` at the end")
    ap.add_argument("--inprocess-worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()

    request = {"prompt": PROMPT} | ({"size": args.video_size} if args.video_size else {}) \
        | ({"num_frames": args.video_frames} if args.video_frames else {})
    width, height = (int(v) for v in (args.video_size or "832x480").split("x"))
    image, audio = portrait_png(width, height), speech_wav(args.turn_seconds)
    if args.inprocess_worker:  # phase 1, in the subprocess: JSON on stdout's last line
        print(json.dumps(asyncio.run(inprocess(args, request, image, audio)), default=str))
        return 0

    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", args.port))
        except OSError:
            print(f"error: port {args.port} is in use (pick another with --port)", file=sys.stderr)
            return 2
    env = {**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled"),
           "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
           "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}  # we shut Serve down before stopping the node
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    report = {"bench": "serve", "profile": args.profile, "overrides": args.overrides, "device": None,
              "git_commit": commit or None, "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "cpu_count": os.cpu_count(), "request": request, "startup_s": None, "inprocess": None, "served": None,
              "stage_metrics": None, "placement": None, "failures": []}
    ports = {k: free_port() for k in ("gcs", "dashboard", "metrics", "client", "agent")}
    dashboard, base = f"http://127.0.0.1:{ports['dashboard']}", f"http://127.0.0.1:{args.port}"
    tmp = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    config = tmp / "serve_config.yaml"
    config.write_text(yaml.safe_dump({
        "proxy_location": "HeadOnly", "http_options": {"host": "127.0.0.1", "port": args.port},
        "applications": [{"name": APP, "route_prefix": "/", "import_path": "graph:app",
                          "args": {"profile": args.profile, "overrides": args.overrides}}]}, sort_keys=False))

    def interrupted(*_):
        raise KeyboardInterrupt

    proc, previous_sigterm = None, signal.signal(signal.SIGTERM, interrupted)
    try:
        if not args.skip_inprocess:
            print("phase 1: in process (a subprocess)", file=sys.stderr)
            p = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--inprocess-worker"], cwd=ROOT, env=env,
                               stdout=subprocess.PIPE, text=True)
            try:
                report["inprocess"] = json.loads(p.stdout.strip().splitlines()[-1])
                report["device"] = report["inprocess"]["device"]
            except (IndexError, ValueError):
                report["failures"].append(f"in-process: exit {p.returncode}, no result (see stderr above)")
            report["failures"] += failures_of("in-process", report["inprocess"])

        print("phase 2: served", file=sys.stderr)
        t0 = time.perf_counter()
        proc = start_ray(args, env, ports, tmp / "ray-start.log")
        wait_dashboard(proc, args, ports, tmp / "ray-start.log")
        report["ray_start_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        deploy = subprocess.run([cli("serve"), "deploy", str(config), "-a", dashboard], cwd=ROOT, env=env,
                                capture_output=True, text=True, timeout=300)
        if deploy.returncode:
            raise BenchError(f"serve deploy failed ({deploy.returncode}):\n{deploy.stdout}{deploy.stderr}")
        report["ready_by"] = wait_ready(base, dashboard, args.startup_timeout)
        report["startup_s"] = time.perf_counter() - t0
        print(f"ready after {report['startup_s']:.1f} s ({report['ready_by']})", file=sys.stderr)
        report["served"] = asyncio.run(served(args, base, request, image, audio))
        report["failures"] += failures_of("served", report["served"])
        print("reading stage metrics", file=sys.stderr)
        report["stage_metrics"] = stage_metrics(f"http://127.0.0.1:{ports['metrics']}/metrics")
        report["placement"] = placement(f"127.0.0.1:{ports['gcs']}", env)
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # let the clean-up finish
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        stop_ray(proc, dashboard, env, args.ray_stop)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, previous_sigterm)
        shutil.rmtree(tmp, ignore_errors=True)

    if report["device"] is None:
        infos = ((report["placement"] or {}).get("stages") or {}).values()
        report["device"] = next((i["gpu_name"] for i in infos if isinstance(i, dict) and i.get("gpu_name")), "cpu")
    slug = re.sub(r"[^a-z0-9]+", "-", report["device"].lower()).strip("-").removeprefix("nvidia-")
    out = Path(args.out or ROOT / "bench" / "results" / f"serve-{args.profile}-{slug}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str))
    print(summary(report))
    print(f"wrote {out}")
    return 1 if report["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
