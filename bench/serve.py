"""Served benchmark: start Ray and the graph as a user would (`ray start`, `serve deploy`), drive
it over HTTP like a client, and measure the same requests in process (`LocalGraph`, same build).
Writes one JSON file (default bench/results/serve-<profile>-<device>.json) and prints a summary.

    # CPU, tiny random models (the profile's 32x32x9 clips):
    python bench/serve.py --profile tiny --turn-seconds 2 --turn-concurrency 1,2 \
        --video-concurrency 1,2 --repeats 2
    # GPU, full-size random weights (one GPU per stage):
    python bench/serve.py --profile random-a14b --video-size 832x480 --video-frames 81

Both phases make the same requests: one video request on its own (does the first pay a compile?
served, it goes as a job, whose events give its stage timeline; one more job follows the
sequential requests, to compare), --repeats sequential ones, one batch per --video-concurrency
(different seeds), two at --also-size if given; an avatar (base clip + lip-sync preparation); a warm-up talk turn, then --repeats batches of each
--turn-concurrency turns at once (time to the first fMP4 byte and to the last; a turn is
floor(turn_seconds * 25) frames). Phase 1 runs in a subprocess, so its GPU memory is freed before
phase 2 serves the graph; phase 2 adds the start-up time, the avatar_serve_* metrics from Ray's
Prometheus endpoint over the whole served run, start-up warm-ups included (Ray exports histogram
sums from bucket midpoints, so means are approximate: the buckets are kept) and where each stage
runs. Before anything starts, graph:app is built once with these args to stop at once on a
profile error or a missing weight file (Serve retries a failing build 4 times).

The cluster is this script's own (`ray start --head --block` on free ports, a child process): it
is stopped at the end, on errors and on Ctrl-C, without touching other Ray clusters on the machine.
`--ray-stop` also runs `ray stop --force`, which kills every Ray process of the user.
`--ray-env VAR=VALUE` starts that cluster with Ray settings such as RAY_SERVE_THROUGHPUT_OPTIMIZED=1
(recorded as `ray_env`); the in-process phase does not see them.
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
from collections import Counter, defaultdict
from pathlib import Path

import httpx
import numpy as np
import yaml
from common import ROOT, free_port, git_commit, once, spread, started_at, wav_bytes  # bench/common.py
from live import inprocess_opener, live_levels, websocket_opener  # bench/live.py

APP = "avatar-serve"
STAGES = ["Encoder", "DitExpertHigh", "DitExpertLow", "Decoder", "LipSync"]
FPS = 25  # of lip-synced output
PROMPT = "a portrait of a woman who smiles and talks"
AVATAR_SEED = int(time.time() * 1000) % 2**31  # avatars are cached by content: a fresh one each run
FAILURES: list[str] = []  # this process's failed requests, "what: error"
T0 = float(os.environ.get("BENCH_SERVE_T0") or time.time())  # log times count from the parent's start


class BenchError(RuntimeError):
    """Start-up failed; the message says why."""


def log(message: str) -> None:
    print(f"[{time.time() - T0:7.1f} s] {message}", file=sys.stderr, flush=True)


def http_error(r: httpx.Response) -> RuntimeError:
    try:
        message = r.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):  # not the API's error envelope
        message = r.text[:500]
    exc = RuntimeError(f"HTTP {r.status_code}: {message}")
    exc.status = r.status_code
    return exc


# ------------------------------------------------------------------ inputs and statistics


def portrait_png(width: int, height: int) -> bytes:
    from deployments.cli.demo import demo_image  # numpy + PIL only

    return demo_image(width, height)


class Portraits:
    """One PNG portrait per key, each a pixel apart: the encoder keeps the image conditions of
    recent portraits, so a timed request that is meant to be a new portrait must send one the
    server has not seen. `portraits(key)`; `portraits.avatar` is the avatars' one. Made before
    any timing (`video_keys`)."""

    def __init__(self, width: int, height: int, keys=()):
        from PIL import Image

        self.avatar = portrait_png(width, height)
        self.base = np.array(Image.open(io.BytesIO(self.avatar)).convert("RGB"))
        self.made: dict[int, bytes] = {}
        for key in keys:
            self(key)

    def __call__(self, key: int) -> bytes:
        if key not in self.made:
            from PIL import Image

            pixels = self.base.copy()
            pixels[0, 0] = (key % 251, key // 251 % 251, 251)  # 251: never the avatar's own corner
            buf = io.BytesIO()
            Image.fromarray(pixels).save(buf, format="PNG")
            self.made[key] = buf.getvalue()
        return self.made[key]


REPEATED = 1  # the portrait the repeated-portrait requests send again (the first sequential one's)


def video_keys(args) -> list[int]:
    """The portrait of every timed video request (its seed); `measure` says which is which."""
    keys = [0, *range(1, 1 + args.repeats), *(100 * n + i for n in args.video_concurrency for i in range(n)),
            *range(400, 400 + args.repeats)]
    return keys + ([300, 301] if args.also_size else [])


def speech_wav(seconds: float, rate: int = 16000) -> bytes:
    """16 kHz mono 16-bit: a 220 Hz tone with a 3 Hz (syllable-like) amplitude envelope."""
    t = np.arange(int(seconds * rate)) / rate
    pcm = 0.3 * 32767 * np.sin(2 * np.pi * 220 * t) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t))
    return wav_bytes(pcm.astype(np.int16), rate)


async def timed(what: str, fn, *args) -> dict:
    """One call of `fn` -> {"s", "status", ...what fn returned}; a failure is recorded, not raised."""
    t0 = time.perf_counter()
    try:
        result = await fn(*args)
    except Exception as exc:  # noqa: BLE001 -- the benchmark reports failures and goes on
        FAILURES.append(f"{what}: {type(exc).__name__}: {exc}")
        return {"s": time.perf_counter() - t0, "status": getattr(exc, "status", None), "error": FAILURES[-1]}
    return {"s": time.perf_counter() - t0, "status": 200, **result}


def decoded_frames(mp4: bytes) -> int:
    """Video frames in an MP4 (decoded with PyAV)."""
    import av

    with av.open(io.BytesIO(mp4)) as container:
        return sum(1 for _ in container.decode(container.streams.video[0]))


def latencies(runs: list[dict]) -> dict:
    ok = [r["s"] for r in runs if "error" not in r]
    return {"latency_s": spread(ok), "runs": len(runs), "failures": len(runs) - len(ok),
            "statuses": dict(Counter(str(r["status"]) for r in runs))}


# ------------------------------------------------------------------ the measurements (both phases)


def timeline_marks(timeline: list[dict]) -> dict:
    """A job's events (seconds after the POST) -> where its time went: start of encode, each
    expert's first and last step, start of decode, completed, and the MP4 downloaded."""
    marks: dict = {}
    for e in timeline:
        if e["event"] == "stage" and e.get("state") == "started":
            marks.setdefault(f"{e['stage']}_started", e["t"])
        elif e["event"] == "step":
            marks.setdefault(f"{e['expert']}_first_step", e["t"])
            marks[f"{e['expert']}_last_step"] = e["t"]
        elif e["event"] in ("completed", "downloaded", "first_fragment"):
            marks[e["event"]] = e["t"]
    return marks


async def measure(args, video, create_avatar, turn, out: dict | None = None, phases=None,
                  video_job=None, live_opener=None, video_stream=None) -> dict:
    """`video(seed, size=None, portrait=seed)` -> {"bytes"}, each request a new portrait unless
    `portrait` names an earlier one; `create_avatar()` -> {"id"}; `turn(avatar_id)` -> {"first_s", "bytes"};
    `phases()` (served only) -> the turn-phase histograms now, to take each level's own breakdown;
    `video_job(seed)` (served only) -> {"bytes", "timeline", "marks"}: the same request as a job,
    whose events say where the time went. The first request goes that way (is it slower than the
    rest, and in which stage?), and one more after the sequential ones, to compare.

    Fills `out` as it goes, so that a run stopped part-way (a time limit) still reports what it
    measured."""
    out = {} if out is None else out
    if not args.skip_video:
        log("video: the first request, then sequential, then concurrent")
        first = await timed("video first", video_job or video, 0)
        sequential = [await timed("video", video, 1 + i) for i in range(args.repeats)]
        out["video"] = {"first": first, "sequential": latencies(sequential), "concurrent": {}}
        # The same portrait again with other seeds: the encoder has its image condition already.
        repeated = [await timed("video repeated portrait", video, 200 + i, None, REPEATED)
                    for i in range(args.repeats)]
        out["video"]["repeated_portrait"] = latencies(repeated)
        if video_job is not None:
            first["via"] = "job"
            out["video"]["warm_job"] = await timed("video job", video_job, 1)  # the seed of a sequential one
        if video_stream is not None:  # jobs whose MP4 is read from /stream as it is made
            streamed = [await timed("video streamed", video_stream, 400 + i) for i in range(args.repeats)]
            ok = [r for r in streamed if "error" not in r]
            out["video"]["streamed"] = {**latencies(streamed),
                                        "first_byte_s": spread([r["first_byte_s"] for r in ok]),
                                        "same_as_content": all(r["same_as_content"] for r in ok)}
        for n in args.video_concurrency:
            t0 = time.perf_counter()
            runs = await asyncio.gather(*(timed(f"video x{n}", video, 100 * n + i) for i in range(n)))
            out["video"]["concurrent"][str(n)] = {**latencies(runs), "wall_s": time.perf_counter() - t0}
        if args.also_size:  # another size: its first request (compile or warm-up at that shape?), then one more
            log(f"video at {args.also_size}: two requests")
            first_other = await timed(f"video {args.also_size} first", video_job or video, 300, args.also_size)
            out["video"]["also_size"] = {"size": args.also_size, "first": first_other}
            first_other["via"] = "job" if video_job else "request"
            out["video"]["also_size"]["second"] = await timed(f"video {args.also_size}", video, 301, args.also_size)
    if args.skip_turns:
        return out
    log("avatar")
    out["avatar"] = await timed("avatar", create_avatar)
    if not (avatar_id := out["avatar"].get("id")):
        return out
    frames = math.floor(args.turn_seconds * FPS)
    log("talk turns: a warm-up turn, then concurrent batches")
    # Warm-up turns at once, as many as --warmup-turns, so that each lip-sync replica has served
    # (loaded the avatar from the shared folder, put its frames on the GPU) before the timed ones.
    warmups = await asyncio.gather(*(timed("turn warm-up", turn, avatar_id, i == 0) for i in range(args.warmup_turns)))
    warmup = warmups[0]
    out["turns"] = {"turn_seconds": args.turn_seconds, "frames_per_turn": frames, "concurrency": {},
                    "warmup": {k: v for k, v in warmup.items() if k != "data"}}
    if "data" in warmup:  # the stream is a valid MP4 with every frame (whatever the encoder)
        decoded = decoded_frames(warmup["data"])
        out["turns"]["warmup"]["decoded_frames"] = decoded
        if decoded != frames:
            FAILURES.append(f"turn warm-up: the MP4 decodes to {decoded} frames, expected {frames}")
    for n in args.turn_concurrency:
        before = await asyncio.to_thread(phases) if phases else None
        turns, walls, aggregates = [], [], []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            batch = await asyncio.gather(*(timed(f"turn x{n}", turn, avatar_id) for _ in range(n)))
            walls.append(time.perf_counter() - t0)
            aggregates.append(frames * sum("error" not in t for t in batch) / walls[-1])
            turns += batch
        ok = [t for t in turns if "error" not in t]
        out["turns"]["concurrency"][str(n)] = {
            "batches": args.repeats, "turns": len(turns), "failures": len(turns) - len(ok),
            "first_byte_s": spread([t["first_s"] for t in ok]), "duration_s": spread([t["s"] for t in ok]),
            "fps_per_turn": spread([frames / t["s"] for t in ok]),
            "aggregate_fps": statistics.median(aggregates), "batch_wall_s": spread(walls),
            "bytes": spread([t["bytes"] for t in ok])}
        if phases:  # where these turns' time went (means over this level's turns alone)
            out["turns"]["concurrency"][str(n)]["phases_mean_s"] = phase_delta(before, await asyncio.to_thread(phases))
    if args.turns_beside_video and not args.skip_video:
        out["turns"]["beside_video"] = await turns_beside_video(args, video, turn, avatar_id, frames)
    if args.turn_series:
        out["turns"]["series"] = await turn_series(args, create_avatar, turn)
    if args.live_sessions and live_opener is not None:
        out["live"] = {}
        await live_levels(live_opener, avatar_id, args.live_sessions, args.live_seconds, args.live_lead_in,
                          FAILURES, log, out["live"])
    return out


async def turn_series(args, create_avatar, turn) -> dict:
    """A fresh avatar, then --turn-series talk turns one after another from the moment it is
    ready, the first ones included: what a user who just made an avatar meets."""
    log(f"a fresh avatar, then {args.turn_series} turns in a row")
    avatar = await timed("series avatar", create_avatar, AVATAR_SEED + 1)
    if "id" not in avatar:
        return {"avatar": avatar}
    runs = [await timed("series turn", turn, avatar["id"]) for _ in range(args.turn_series)]
    ok = [r for r in runs if "error" not in r]
    firsts = [r["first_s"] for r in ok]
    return {"turns": len(runs), "failures": len(runs) - len(ok), "first_byte_s": firsts,
            "first_byte_p50_s": statistics.median(firsts) if firsts else None,
            "first_byte_p95_s": sorted(firsts)[min(len(firsts) - 1, int(0.95 * len(firsts)))] if firsts else None}


async def turns_beside_video(args, video, turn, avatar_id: str, frames: int) -> dict:
    """Batches of --turns-beside-video turns at once while one video request runs (started
    --beside-delay s before the first batch, so that it is in the experts): what a live voice chat
    feels while someone else's clip is generated, and what the clip pays for the turns."""
    n = args.turns_beside_video
    log(f"talk turns x{n} beside a running video request")
    job = asyncio.ensure_future(timed("video beside turns", video, 7777))
    await asyncio.sleep(args.beside_delay)
    turns, during = [], []
    while not job.done() and len(during) < max(args.repeats, 1) * 4:
        batch = await asyncio.gather(*(timed(f"turn x{n} beside video", turn, avatar_id) for _ in range(n)))
        during.append(not job.done())  # whether the video was still running when the batch ended
        turns += batch
    video_run = await job
    ok = [t for t in turns if "error" not in t]
    return {"turns_at_once": n, "batches": len(during), "batches_fully_beside_video": sum(during),
            "turns": len(turns), "failures": len(turns) - len(ok),
            "first_byte_s": spread([t["first_s"] for t in ok]), "fps_per_turn": spread([frames / t["s"] for t in ok]),
            "video": {k: v for k, v in video_run.items() if k != "bytes"}}


async def inprocess(args, request: dict, portraits: Portraits, audio: bytes) -> dict:
    """Phase 1 (in a subprocess): every stage in this process, `LocalGraph`, through its ingress."""
    import torch

    from deployments.local import LocalGraph
    from deployments.profiles import load_profile

    out = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
           "torch": torch.__version__}
    cfg = load_profile(args.profile, args.overrides)
    # torch.compile's cache where the served replicas keep theirs (graph.py's stage_env; LocalGraph
    # leaves the process environment alone), so whichever phase runs second finds it warm.
    cache = cfg.compile_cache_dir("lipsync")
    if cache:
        out["compile_cache"] = {"dir": cache, "existed": os.path.isdir(cache)}
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
    t0 = time.perf_counter()
    ingress = LocalGraph(cfg).ingress
    out["load_s"] = time.perf_counter() - t0

    async def video(seed, size=None, portrait=None):
        asked = {**request, "seed": seed, **({"size": size} if size else {})}
        image = portraits(seed if portrait is None else portrait)
        return {"bytes": len((await ingress.generate(asked, image, "mp4")).mp4)}

    async def create_avatar(seed=AVATAR_SEED):
        avatar, _ = await ingress.create_avatar({**request, "seed": seed}, portraits.avatar)
        while (avatar := ingress.avatar(avatar.id)).status in ("queued", "in_progress"):
            await asyncio.sleep(0.05)
        if avatar.status != "ready":
            raise RuntimeError(f"avatar {avatar.status}: {avatar.error}")
        return {"id": avatar.id}

    async def turn(avatar_id, keep=False):
        t0, first, pieces = time.perf_counter(), None, []
        async for piece in ingress.speak(avatar_id, audio, 0):
            first = time.perf_counter() - t0 if first is None else first
            pieces.append(piece)
        return {"first_s": first, "bytes": sum(map(len, pieces)), **({"data": b"".join(pieces)} if keep else {})}

    return out | await measure(args, video, create_avatar, turn, live_opener=inprocess_opener(ingress))


async def diffusers_baseline(args, request: dict, image: bytes) -> dict:
    """Phase 1b (in a subprocess, --diffusers-baseline): diffusers' WanImageToVideoPipeline as a
    user runs it, in one process: plain experts and VAE (bf16, eager, unquantised) from the
    profile's weights (random ones: the same seeds), the encoder stage's text encoder, the same
    request and sampler. Its first call, then --repeats more (different seeds); up to the
    pipeline's float frames (no MP4: ours include the mux)."""
    import torch
    from stages import diffusers_pipeline, pipeline_kwargs, plain_modules  # bench/stages.py

    from deployments.common.runtime import resolve_device
    from deployments.encoder import Encoder
    from deployments.ingress import Ingress
    from deployments.profiles import load_profile

    cfg = load_profile(args.profile, args.overrides)
    t0 = time.perf_counter()
    encoder = Encoder(cfg.stages.encoder)
    device = resolve_device(cfg.stages.high.device)
    pipe = diffusers_pipeline(cfg, encoder, *plain_modules(cfg, device))
    pipe.to(device)
    out = {"what": "diffusers WanImageToVideoPipeline, plain experts and VAE (bf16 on a GPU), eager",
           "load_s": time.perf_counter() - t0}
    prepare = Ingress(None, None, None, None, cfg).prepare  # the request validated as the graph does

    def run(seed: int) -> float:
        params, pixels = prepare({**request, "seed": seed}, image)
        kwargs = pipeline_kwargs(params, pixels)
        return once(lambda: pipe(**kwargs), device)

    with torch.no_grad():
        log("diffusers baseline: the first request, then sequential")
        out["first_s"] = run(0)
        out["sequential_s"] = spread([run(1 + i) for i in range(args.repeats)])
    return out


async def served(args, base: str, request: dict, portraits: Portraits, audio: bytes, out: dict,
                 phases=None) -> dict:
    """Phase 2: the same requests over HTTP."""
    from deployments.api.client import AvatarClient  # here, not inside a timed request

    fields = {k: str(v) for k, v in request.items()}

    def picture(image: bytes) -> dict:
        return {"input_reference": ("portrait.png", image, "image/png")}
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    timeout = httpx.Timeout(args.request_timeout, connect=30)
    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=timeout) as client:

        async def video(seed, size=None, portrait=None):
            asked = {**fields, "seed": str(seed), **({"size": size} if size else {})}
            image = portraits(seed if portrait is None else portrait)
            r = await client.post("/v1/videos/sync", data=asked, files=picture(image))
            if r.status_code != 200 or not r.content:
                raise http_error(r)
            return {"bytes": len(r.content)}

        async def create_avatar(seed=AVATAR_SEED):
            r = await client.post("/v1/avatars", data={**fields, "seed": str(seed)}, files=picture(portraits.avatar))
            if r.status_code not in (200, 201):
                raise http_error(r)
            avatar, deadline = r.json(), time.monotonic() + args.request_timeout
            while avatar["status"] in ("queued", "in_progress") and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
                avatar = (await client.get(f"/v1/avatars/{avatar['id']}")).json()
            if avatar["status"] != "ready":
                raise RuntimeError(f"avatar {avatar['status']}: {avatar.get('error')}")
            return {"id": avatar["id"], "created": r.status_code == 201}

        async def streamed(t0, method, url, **kw) -> tuple[float | None, list[bytes]]:
            """A streamed response's pieces as they come -> (seconds from t0 to the first, pieces)."""
            first, pieces = None, []
            async with client.stream(method, url, **kw) as r:
                if r.status_code != 200:
                    await r.aread()
                    raise http_error(r)
                async for piece in r.aiter_raw():
                    first = time.perf_counter() - t0 if first is None else first
                    pieces.append(piece)
            return first, pieces

        async def turn(avatar_id, keep=False):
            files = {"audio": ("speech.wav", audio, "audio/wav")}
            t0 = time.perf_counter()  # from sending: the upload is small and local
            first, pieces = await streamed(t0, "POST", f"/v1/avatars/{avatar_id}/speech", files=files)
            if not pieces:
                raise RuntimeError("empty speech response")
            return {"first_s": first, "bytes": sum(map(len, pieces)), **({"data": b"".join(pieces)} if keep else {})}

        async def video_job(seed, size=None):
            """The same request as a job, through the project's own client (create, follow the
            events, download); the events' server times give the timeline."""
            sent, timeline = time.time(), []  # the server's event times are on this machine's clock too

            def note(e):
                timeline.append({"t": round(e["at"] - sent, 3), "event": e["event"],
                                 **{k: e[k] for k in ("stage", "state", "step", "expert") if k in e}})

            def run():
                jobs = AvatarClient(base, args.api_key, timeout=args.request_timeout)
                try:
                    asked = {**request, **({"size": size} if size else {})}
                    return jobs.generate(portraits(seed), request["prompt"], on_event=note, seed=seed,
                                         **{k: v for k, v in asked.items() if k != "prompt"})
                finally:
                    jobs.http.close()

            mp4 = await asyncio.to_thread(run)
            timeline.append({"t": round(time.time() - sent, 3), "event": "downloaded"})
            return {"bytes": len(mp4), "timeline": timeline, "marks": timeline_marks(timeline)}

        async def video_stream(seed):
            """A job whose MP4 is read from GET /v1/videos/{id}/stream, opened right after the
            POST: the first bytes' time (from sending the POST), and the bytes checked equal to
            /content's."""
            t0 = time.perf_counter()
            r = await client.post("/v1/videos", data={**fields, "seed": str(seed)}, files=picture(portraits(seed)))
            if r.status_code != 200:
                raise http_error(r)
            job_id = r.json()["id"]
            first, pieces = await streamed(t0, "GET", f"/v1/videos/{job_id}/stream")
            content = await client.get(f"/v1/videos/{job_id}/content")
            if content.status_code != 200:
                raise http_error(content)
            return {"first_byte_s": first, "bytes": len(content.content),
                    "same_as_content": b"".join(pieces) == content.content}

        return await measure(args, video, create_avatar, turn, out, phases, video_job,
                             websocket_opener(base, args.api_key), video_stream)


# ------------------------------------------------------------------ the cluster


CLI_MODULES = {"ray": "ray.scripts.scripts", "serve": "ray.serve.scripts"}


def cli(name: str) -> list[str]:
    """`ray` / `serve` as a command: the script next to this Python (the virtualenv's), else on
    PATH, else this Python running the CLI's module (for packages installed without scripts)."""
    path = Path(sys.executable).parent / name
    if path.exists():
        return [str(path)]
    found = shutil.which(name)
    return [found] if found else [sys.executable, "-m", CLI_MODULES[name]]


def _own_session_dying_with_parent() -> None:
    """preexec_fn of `ray start --block`: Ctrl-C in the terminal does not reach it (we stop it,
    after `serve shutdown`), and it gets SIGTERM, stopping its node, if this script is killed."""
    os.setsid()
    try:
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG (Linux)
    except (OSError, AttributeError):
        pass


PREFLIGHT = "import json, sys; from graph import GraphArgs, app; app(GraphArgs(**json.loads(sys.argv[1])))"


def preflight(args, env: dict) -> None:
    """Build the application as `serve deploy` will (graph:app with these args; no Ray cluster,
    nothing loaded): a profile error or a missing weight file stops us here in seconds, where
    Serve would retry the build 4 times before DEPLOY_FAILED."""
    graph_args = json.dumps({"profile": args.profile, "overrides": args.overrides})
    p = subprocess.run([sys.executable, "-c", PREFLIGHT, graph_args], cwd=ROOT, env=env, capture_output=True,
                       text=True, check=False)
    if p.returncode:
        raise BenchError("the application does not build (graph:app, as `serve deploy` would):\n"
                         + "\n".join(p.stderr.strip().splitlines()[-3:]))


def start_ray(args, env: dict, ports: dict, log_file: Path) -> subprocess.Popen:
    cmd = [*cli("ray"), "start", "--head", "--block", f"--port={ports['gcs']}", f"--num-cpus={os.cpu_count()}",
           f"--metrics-export-port={ports['metrics']}", "--dashboard-host=127.0.0.1",
           f"--dashboard-port={ports['dashboard']}", f"--ray-client-server-port={ports['client']}",
           f"--dashboard-agent-listen-port={ports['agent']}", "--disable-usage-stats"]
    cmd += [f"--num-gpus={args.num_gpus}"] if args.num_gpus is not None else []
    log("$ " + " ".join(cmd))
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log_file.open("wb"), stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL,
                            preexec_fn=_own_session_dying_with_parent)  # noqa: PLW1509 -- no threads yet


def wait_dashboard(proc: subprocess.Popen, dashboard: str, timeout: float, log_file: Path) -> None:
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            if httpx.get(f"{dashboard}/api/version", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    output = "\n".join(log_file.read_text(errors="replace").splitlines()[-30:])
    raise BenchError(f"ray start exited with {proc.returncode}:\n{output}" if proc.poll() is not None
                     else f"Ray's dashboard did not answer within {timeout:.0f} s:\n{output}")


def app_status(dashboard: str) -> dict:
    """The application's entry in what `serve status` prints (read from the REST API it reads)."""
    try:
        apps = httpx.get(f"{dashboard}/api/serve/applications/", timeout=10).json()["applications"]
        return apps.get(APP) or {}
    except (httpx.HTTPError, ValueError, KeyError, AttributeError):
        return {}


def wait_ready(base: str, dashboard: str, timeout: float) -> str:
    """Until GET /readyz answers 200 (or, without that route, the app is RUNNING and /healthz
    answers); BenchError at once on DEPLOY_FAILED / UNHEALTHY. -> how readiness was seen."""
    deadline, last, seen = time.monotonic() + timeout, "no answer", set()
    while True:
        app = app_status(dashboard)
        news = [f"application {app.get('status') or 'not deployed yet'}"] + [
            f"{name} {d.get('status')}: " + " ... ".join(dict.fromkeys([m[0], m[-1]]))  # a traceback's ends
            for name, d in (app.get("deployments") or {}).items()
            if (m := [line for line in (d.get("message") or "").splitlines() if line.strip()])]
        for line in news:  # e.g. a replica's constructor failing while Serve retries it
            if line not in seen:
                seen.add(line)
                log(line)
        if app.get("status") in ("DEPLOY_FAILED", "UNHEALTHY"):
            details = [app.get("message") or ""] + [
                f"{n}: {d.get('status')}: {d.get('message')}"
                for n, d in (app.get("deployments") or {}).items() if d.get("status") != "HEALTHY"]
            last = ([line for line in "\n".join(details).splitlines() if line.strip()] or ["?"])[-1]
            raise BenchError("\n".join(details) + f"\n\napplication {app['status']}: {last}")
        try:
            r = httpx.get(f"{base}/readyz", timeout=10)
            last = f"/readyz {r.status_code}: {r.text[:300]}"
            if r.status_code == 200:
                return "/readyz"
            if r.status_code == 404 and app.get("status") == "RUNNING" \
                    and httpx.get(f"{base}/healthz", timeout=10).status_code == 200:
                return "serve status RUNNING (no /readyz route)"
        except httpx.HTTPError as exc:
            last = f"/readyz: {type(exc).__name__}"
        if time.monotonic() > deadline:
            raise BenchError(f"not ready after {timeout:.0f} s (application {app.get('status')}, {last})")
        time.sleep(1)


METRIC = re.compile(r"^(ray_)?avatar_serve_(\w+?)(_bucket|_sum|_count)?\{([^}]*)\}\s+(\S+)", re.MULTILINE)
LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')
TAGS = ("stage", "method", "phase", "status")  # ours; Ray adds its own (worker, replica, ...)


def parse_metrics(text: str) -> dict:
    """Prometheus text -> {metric (avatar_serve_ dropped): {"stage.method" or other tags: value}};
    a histogram's value is {count, mean_s, buckets: {upper bound s: calls}}. Replicas are summed;
    the `ray_`-prefixed names are used when present."""
    found = defaultdict(lambda: defaultdict(float))
    for prefix, name, part, labels, value in METRIC.findall(text):
        tags = dict(LABEL.findall(labels))
        key = ".".join(tags[t] for t in TAGS if t in tags) or "-"
        found[prefix][(name, key, part, tags.get("le"))] += float(value)
    series = found.get("ray_") or found.get("") or {}
    out: dict = defaultdict(dict)
    for (name, key, part, _), value in sorted(series.items()):
        if not part:
            out[name][key] = value
        elif part == "_count" and value:
            cumulative = sorted((float(le), c) for (n, k, p, le), c in series.items()
                                if (n, k, p) == (name, key, "_bucket"))
            buckets = {f"{le:g}": int(c - b)
                       for (le, c), (_, b) in zip(cumulative, [(0, 0), *cumulative]) if c > b}
            out[name][key] = {"count": int(value), "mean_s": series[(name, key, "_sum", None)] / value,
                              "buckets": buckets}
    return dict(out)


def phase_delta(before: dict, after: dict) -> dict:
    """Mean seconds per phase over the turns between two readings of the turn-phase histograms."""
    out = {}
    for key, a in after.items():
        b = before.get(key) or {"count": 0, "mean_s": 0.0}
        if isinstance(a, dict) and a["count"] > b["count"]:
            out[key] = (a["mean_s"] * a["count"] - b["mean_s"] * b["count"]) / (a["count"] - b["count"])
    return out


def stage_metrics(url: str, wait_s: float = 60, settle_s: float = 3, need: str = "stage_latency_seconds") -> dict:
    """Ray exports metrics every second here (RAY_metrics_report_interval_ms below; 10 s by
    default): read until they stay the same for `settle_s`."""
    deadline, previous, since = time.monotonic() + wait_s, None, time.monotonic()
    while True:
        try:
            current = parse_metrics(httpx.get(url, timeout=10).text)
        except httpx.HTTPError as exc:
            current = {"error": f"{type(exc).__name__}: {exc}"}
        if current != previous:
            previous, since = current, time.monotonic()
        if (need in current and time.monotonic() - since >= settle_s) \
                or time.monotonic() > deadline:
            return current
        time.sleep(0.5)


PLACEMENT = """
import json, sys, ray
from ray import serve
from ray.util.state import list_actors
ray.init(address=sys.argv[1], log_to_driver=False, logging_level="ERROR")
out = {"stages": {}, "replica_pids": {}}
for name in sys.argv[3:]:
    try:
        handle = serve.get_deployment_handle(name, app_name=sys.argv[2])
        out["stages"][name] = handle.info.remote().result(timeout_s=60)
    except Exception as exc:
        out["stages"][name] = {"error": f"{type(exc).__name__}: {exc}"}
for actor in list_actors(filters=[("state", "=", "ALIVE")], limit=10000):
    if (actor.class_name or "").startswith(f"ServeReplica:{sys.argv[2]}:"):
        out["replica_pids"][str(actor.pid)] = actor.class_name.rsplit(":", 1)[-1]
print(json.dumps(out, default=str))
"""


def placement(gcs: str, env: dict) -> dict:
    """Each stage's info() (host, pid, device, GPU memory), every replica's pid, and nvidia-smi's
    memory per replica."""
    out: dict = {}
    try:
        p = subprocess.run([sys.executable, "-c", PLACEMENT, gcs, APP, *STAGES], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=300, check=True)
        out = json.loads(p.stdout.strip().splitlines()[-1])
    except Exception as exc:  # noqa: BLE001 -- recorded, not fatal
        out["error"] = f"{type(exc).__name__}: {exc} {getattr(exc, 'stderr', '') or ''}"[-3000:]
    if shutil.which("nvidia-smi"):
        try:
            query = ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"]
            smi = subprocess.run(query, capture_output=True, text=True, timeout=60, check=True).stdout
            names = out.get("replica_pids") or {}
            names |= {str(i.get("pid")): n for n, i in (out.get("stages") or {}).items()}
            out["nvidia_smi"] = smi
            rows = [[v.strip() for v in line.split(",")] for line in smi.splitlines() if "," in line]
            out["gpu_memory_by_replica_mib"] = {f"{names.get(pid, 'other')} (pid {pid})": float(mib)
                                                for pid, mib in rows}
        except Exception as exc:  # noqa: BLE001 -- recorded, not fatal
            out["nvidia_smi_error"] = f"{type(exc).__name__}: {exc}"
    return out


def stop_ray(proc: subprocess.Popen | None, dashboard: str, env: dict, ray_stop: bool) -> None:
    """`serve shutdown -y`, then SIGTERM to our `ray start --block` (it stops its node's
    processes), SIGKILL to its process group if it lingers; `ray stop --force` only if asked."""
    if proc is not None and proc.poll() is None:
        log("stopping: serve shutdown -y, then our Ray node")
        try:
            subprocess.run([*cli("serve"), "shutdown", "-y", "-a", dashboard], cwd=ROOT, env=env, timeout=120,
                           stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, check=False)
        except subprocess.TimeoutExpired:
            log("serve shutdown timed out; stopping the node anyway")
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
    if ray_stop:
        subprocess.run([*cli("ray"), "stop", "--force"], env=env, timeout=120, check=False)
    log("stopped")


# ------------------------------------------------------------------ main


def dig(d, *keys):
    for k in keys:
        d = d.get(k) if isinstance(d, dict) else None
    return d


def fmt(x, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


def summary(report: dict, args) -> str:
    phases = [report.get("inprocess") or {}, report.get("served") or {}]
    rows = [("start-up s (build | to ready)", [fmt(phases[0].get("load_s")), fmt(report["startup_s"])])]
    rows += [] if args.skip_video else [
        ("video first s", [fmt(dig(p, "video", "first", "s")) for p in phases]),
        ("video sequential median s",
         [fmt(dig(p, "video", "sequential", "latency_s", "median")) for p in phases])]
    for n in [] if args.skip_video else map(str, args.video_concurrency):
        rows.append((f"video x{n}: median s, batch s", [
            f"{fmt(dig(p, 'video', 'concurrent', n, 'latency_s', 'median'))}, "
            f"{fmt(dig(p, 'video', 'concurrent', n, 'wall_s'))}" for p in phases]))
    if args.also_size and not args.skip_video:
        rows.append((f"video {args.also_size}: first s, second s", [
            f"{fmt(dig(p, 'video', 'also_size', 'first', 's'))}, {fmt(dig(p, 'video', 'also_size', 'second', 's'))}"
            for p in phases]))
    rows += [] if args.skip_turns else [("avatar ready s", [fmt(dig(p, "avatar", "s")) for p in phases])]
    for n in [] if args.skip_turns else map(str, args.turn_concurrency):
        rows.append((f"turns x{n}: 1st byte s, fps/turn, total fps", [
            f"{fmt(dig(c, 'first_byte_s', 'median'))}, {fmt(dig(c, 'fps_per_turn', 'median'), '.1f')}, "
            f"{fmt(dig(c, 'aggregate_fps'), '.1f')}"
            + (f" ({c['failures']} failed)" if dig(c, "failures") else "")
            for c in (dig(p, "turns", "concurrency", n) for p in phases)]))
    if args.turns_beside_video and not (args.skip_turns or args.skip_video):
        beside = [dig(p, "turns", "beside_video") for p in phases]
        rows.append((f"turns x{args.turns_beside_video} beside a video: 1st byte s, fps/turn, video s", [
            f"{fmt(dig(b, 'first_byte_s', 'median'))}, {fmt(dig(b, 'fps_per_turn', 'median'), '.1f')}, "
            f"{fmt(dig(b, 'video', 's'), '.1f')}" for b in beside]))
    if args.turn_series and not args.skip_turns:
        rows.append((f"{args.turn_series} turns on a new avatar: 1st byte p50, p95 s", [
            f"{fmt(dig(p, 'turns', 'series', 'first_byte_p50_s'))}, {fmt(dig(p, 'turns', 'series', 'first_byte_p95_s'))}"
            for p in phases]))
    for n in map(str, args.live_sessions):
        rows.append((f"live x{n}: 1st frame p50/p95 s, lag p50 ms, real-time", [
            f"{fmt(dig(c, 'first_frame_s', 'p50'))}/{fmt(dig(c, 'first_frame_s', 'p95'))}, "
            f"{fmt(dig(c, 'lag_ms', 'p50'), '.0f')}, {dig(c, 'kept_real_time')}/{dig(c, 'sessions')}"
            for c in (dig(p, "live", "levels", n) for p in phases)]))
    extra = []
    if base := report.get("diffusers_baseline"):
        ratios = ", ".join(f"{k} {v:.2f}x" for k, v in (report.get("vs_diffusers") or {}).items())
        extra.append(f"diffusers' pipeline in process: first {fmt(base.get('first_s'))} s, sequential median "
                     f"{fmt(dig(base, 'sequential_s', 'median'))} s; ours / diffusers (sequential medians): "
                     f"{ratios or '-'}")
    for n in [] if args.skip_turns else map(str, args.turn_concurrency):
        got = dig(report, "served", "turns", "concurrency", n, "phases_mean_s") or {}
        if got:
            extra.append(f"served turns x{n}, mean s per phase: "
                         + ", ".join(f"{k} {v:.3f}" for k, v in sorted(got.items(), key=lambda kv: kv[1])))
    for which in ("first", "warm_job", "also_size"):
        marks = dig(report, "served", "video", which, "marks") or dig(report, "served", "video", which, "first", "marks")
        if marks:
            extra.append(f"served video {which.replace('_', ' ')} (a job), s after the POST: "
                         + ", ".join(f"{k} {v:.3f}" for k, v in sorted(marks.items(), key=lambda kv: kv[1])))
    width = max(len(label) for label, _ in rows)
    lines = [f"{'':{width}}  {'in-process':>24}  {'served':>24}"]
    lines += [f"{label:{width}}  {a:>24}  {b:>24}" for label, (a, b) in rows] + extra
    for name, values in (report.get("stage_metrics") or {}).items():
        for key, m in values.items() if isinstance(values, dict) and name.endswith("seconds") else ():
            if isinstance(m, dict):
                lines.append(f"{name} {key}: {m['count']} x ~{m['mean_s'] * 1000:.0f} ms, "
                             f"by bucket {m['buckets']}")
    lines.append(f"failures: {len(report['failures'])}")
    lines += [f"  {f}" for f in report["failures"][:20]]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ints = lambda text: [int(v) for v in text.split(",") if v.strip()]
    ap.add_argument("--profile", default="tiny")
    ap.add_argument("--overrides", type=json.loads, default={}, help="JSON merged into the profile")
    ap.add_argument("--port", type=int, default=8000, help="Serve's HTTP port")
    ap.add_argument("--out", default=None, help="default bench/results/serve-<profile>-<device>.json")
    ap.add_argument("--video-concurrency", type=ints, default=[1, 4])
    ap.add_argument("--video-size", default=None, help="WIDTHxHEIGHT (default: the profile's)")
    ap.add_argument("--video-frames", type=int, default=None, help="default: the profile's")
    ap.add_argument("--also-size", default=None,
                    help="WIDTHxHEIGHT: after the rest of the video requests, two at this size (the first as a job)")
    ap.add_argument("--turn-concurrency", type=ints, default=[1, 4, 8, 16])
    ap.add_argument("--turn-seconds", type=float, default=10.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--turns-beside-video", type=int, default=0,
                    help="then batches of this many turns at once while a video request runs (0: skip)")
    ap.add_argument("--beside-delay", type=float, default=3.0, help="seconds between starting that video and the turns")
    ap.add_argument("--warmup-turns", type=int, default=2, help="concurrent warm-up turns (one per lip-sync replica)")
    ap.add_argument("--turn-series", type=int, default=0,
                    help="a fresh avatar, then this many talk turns in a row, its first ones included")
    ap.add_argument("--live-sessions", type=ints, default=[],
                    help="live sessions at once, per level (e.g. 1,4,16): over the WebSocket served (bench/live.py)")
    ap.add_argument("--live-seconds", type=float, default=10.0, help="speech per live session, sent at real-time pace")
    ap.add_argument("--live-lead-in", type=float, default=1.0, help="idle seconds before a live session speaks")
    ap.add_argument("--diffusers-baseline", action="store_true",
                    help="also time diffusers' one-process pipeline (plain bf16 experts and VAE, eager) on the "
                         "same request, in its own subprocess after the in-process phase")
    ap.add_argument("--baseline-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--skip-inprocess", action="store_true")
    ap.add_argument("--skip-served", action="store_true", help="phase 1 alone (in process)")
    ap.add_argument("--skip-video", action="store_true")
    ap.add_argument("--skip-turns", action="store_true")
    ap.add_argument("--startup-timeout", type=float, default=900, help="seconds")
    ap.add_argument("--request-timeout", type=float, default=3600, help="per request or avatar, seconds")
    ap.add_argument("--num-gpus", type=int, default=None, help="for `ray start` (default: Ray counts them)")
    ap.add_argument("--ray-env", action="append", default=[], metavar="VAR=VALUE",
                    help="an environment variable for `ray start` (so for every Ray process and replica), "
                         "e.g. RAY_SERVE_THROUGHPUT_OPTIMIZED=1; repeat for more")
    ap.add_argument("--api-key", default=os.environ.get("AVATAR_SERVE_API_KEY"),
                    help="when the profile sets api_keys (default: $AVATAR_SERVE_API_KEY)")
    ap.add_argument("--ray-stop", action="store_true",
                    help="also `ray stop --force` at the end (stops every Ray cluster of the user)")
    ap.add_argument("--inprocess-worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()

    request = {"prompt": PROMPT, "size": args.video_size, "num_frames": args.video_frames}
    request = {k: v for k, v in request.items() if v is not None}
    width, height = (int(v) for v in (args.video_size or "832x480").split("x"))
    portraits, audio = Portraits(width, height, video_keys(args)), speech_wav(args.turn_seconds)
    if args.inprocess_worker:  # phase 1, in the subprocess: JSON on stdout's last line
        result = asyncio.run(inprocess(args, request, portraits, audio))
        print(json.dumps({**result, "failures": FAILURES}, default=str))
        return 0
    if args.baseline_worker:  # phase 1b, likewise
        print(json.dumps(asyncio.run(diffusers_baseline(args, request, portraits.avatar)), default=str))
        return 0

    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", args.port))
        except OSError:
            print(f"error: port {args.port} is in use (choose another with --port)", file=sys.stderr)
            return 2
    env = {**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled"),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",  # Serve is shut down before the node stops
           "RAY_metrics_report_interval_ms": "1000",  # per-level phase breakdowns settle in seconds
           "BENCH_SERVE_T0": str(T0)}
    try:
        ray_env = dict(pair.split("=", 1) for pair in args.ray_env)
    except ValueError:
        print(f"error: --ray-env takes VAR=VALUE, got {args.ray_env}", file=sys.stderr)
        return 2
    report = {"bench": "serve", "profile": args.profile, "overrides": args.overrides, "device": None,
              "git_commit": git_commit(), "started_at": started_at(), "cpu_count": os.cpu_count(),
              "request": request, "ray_env": ray_env, "startup_s": None, "inprocess": None, "diffusers_baseline": None,
              "served": None, "stage_metrics": None,
              "placement": None, "failures": []}
    ports = {k: free_port() for k in ("gcs", "dashboard", "metrics", "client", "agent")}
    dashboard, base = f"http://127.0.0.1:{ports['dashboard']}", f"http://127.0.0.1:{args.port}"
    tmp = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    (tmp / "serve_config.yaml").write_text(yaml.safe_dump({
        "proxy_location": "HeadOnly", "http_options": {"host": "127.0.0.1", "port": args.port},
        "applications": [{"name": APP, "route_prefix": "/", "import_path": "graph:app",
                          "args": {"profile": args.profile, "overrides": args.overrides}}]}, sort_keys=False))

    def interrupted(*_):
        raise KeyboardInterrupt

    proc, previous_sigterm = None, signal.signal(signal.SIGTERM, interrupted)
    try:
        log("building the application (graph:app) to check the profile and its weights")
        preflight(args, env)
        if not args.skip_inprocess:
            log("phase 1: in process (a subprocess)")
            worker = [sys.executable, __file__, *sys.argv[1:], "--inprocess-worker"]
            p = subprocess.run(worker, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True, check=False)
            try:
                report["inprocess"] = json.loads(p.stdout.strip().splitlines()[-1])
                report["device"] = report["inprocess"]["device"]
                report["failures"] += [f"in-process: {f}" for f in report["inprocess"].pop("failures")]
            except (IndexError, ValueError, KeyError):
                report["failures"].append(f"in-process: exit {p.returncode}, no result (see above)")
        if args.diffusers_baseline:
            log("phase 1b: diffusers' pipeline (a subprocess)")
            worker = [sys.executable, __file__, *sys.argv[1:], "--baseline-worker"]
            p = subprocess.run(worker, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True, check=False)
            try:
                report["diffusers_baseline"] = json.loads(p.stdout.strip().splitlines()[-1])
            except (IndexError, ValueError):
                report["failures"].append(f"diffusers baseline: exit {p.returncode}, no result (see above)")

        if not args.skip_served:
            from deployments.profiles import load_profile

            cache = load_profile(args.profile, args.overrides).compile_cache_dir("lipsync")
            report["compile_cache"] = {"dir": cache, "existed_before_served": bool(cache) and os.path.isdir(cache)}
            log("phase 2: served")
            t0 = time.perf_counter()
            proc = start_ray(args, {**env, **ray_env}, ports, tmp / "ray-start.log")
            wait_dashboard(proc, dashboard, args.startup_timeout, tmp / "ray-start.log")
            report["ray_start_s"] = time.perf_counter() - t0
            log("$ serve deploy")
            t0 = time.perf_counter()
            deploy = subprocess.run([*cli("serve"), "deploy", str(tmp / "serve_config.yaml"), "-a", dashboard],
                                    cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
            if deploy.returncode:
                raise BenchError(f"serve deploy failed ({deploy.returncode}):\n{deploy.stdout}{deploy.stderr}")
            report["ready_by"] = wait_ready(base, dashboard, args.startup_timeout)
            report["startup_s"] = time.perf_counter() - t0
            log(f"ready {report['startup_s']:.1f} s after serve deploy (seen by {report['ready_by']})")
            report["served"] = {}
            metrics_url = f"http://127.0.0.1:{ports['metrics']}/metrics"
            asyncio.run(served(args, base, request, portraits, audio, report["served"],
                               phases=lambda: stage_metrics(metrics_url, wait_s=20, settle_s=2.5,
                                                            need="turn_phase_seconds").get("turn_phase_seconds", {})))
            report["failures"] += [f"served: {f}" for f in FAILURES]
            log("reading the metrics")
            report["stage_metrics"] = stage_metrics(metrics_url)
            log("placement")
            report["placement"] = placement(f"127.0.0.1:{ports['gcs']}", env)
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        report["failures"].append(f"error: {exc}")
        status = 1
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM (e.g. `timeout`): keep what was measured
        log("interrupted: writing what was measured so far")
        report["interrupted"] = True
        status = 130
    else:
        status = 1 if report["failures"] else 0
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # let the clean-up finish
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        stop_ray(proc, dashboard, env, args.ray_stop)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, previous_sigterm)
        shutil.rmtree(tmp, ignore_errors=True)

    baseline = dig(report, "diffusers_baseline", "sequential_s", "median")
    if baseline:  # ours over diffusers', sequential medians of the same request
        ours = {k: dig(report, k, "video", "sequential", "latency_s", "median") for k in ("inprocess", "served")}
        report["vs_diffusers"] = {k: v / baseline for k, v in ours.items() if v}
    if report["device"] is None:  # no in-process phase: the GPU a stage reports, else cpu
        infos = (dig(report, "placement", "stages") or {}).values()
        gpus = [i["gpu_name"] for i in infos if isinstance(i, dict) and i.get("gpu_name")]
        report["device"] = gpus[0] if gpus else "cpu"
    slug = re.sub(r"[^a-z0-9]+", "-", report["device"].lower()).strip("-").removeprefix("nvidia-")
    out = Path(args.out or ROOT / "bench" / "results" / f"serve-{args.profile}-{slug}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str))
    print(summary(report, args))
    print(f"wrote {out}")
    return status


if __name__ == "__main__":
    sys.exit(main())
