"""Connection floods on the served graph: N event-stream listeners that never read, then N uploads
whose bodies trickle in, each held open while /healthz and a small GET are probed, with the
ingress's and the HTTP proxy's memory before, during and after.

    python bench/flood.py [--connections 2000] [--hold-s 30] [--out FILE]

The tiny profile served by a fresh local Ray cluster of its own (as tests/helpers.served_graph
does: `graph.app` through `serve.run`, HTTP on a free port); the experts are slowed to
`--step-s` a step so one job runs through the whole event-stream phase. Flood clients are raw
asyncio sockets in this process; the probes run in a thread of their own (sequential requests,
each timed from connect to the last byte, a timeout counted as the timeout). Phases, in order:
`events` (GET /v1/videos/{id}/events on the running job, then never a byte read), `uploads`
(POST /v1/videos, multipart headers and a Content-Length of 1 MB, then `--trickle-bytes` every
`--trickle-every-s`). Each phase: open N connections at once, hold them `--hold-s`, read what
each got by then (status line, Retry-After), close them all and let the ingress settle
`--settle-s`. Memory is the RSS of the ingress replica's and the proxy's processes (found among
this driver's descendants by their process titles). The Serve logs of the run are searched for
tracebacks and "unhandled error" lines. Writes JSON (default bench/results/flood-<host>.json).

The code served is whatever `deployments` imports: run it from a checkout, or with PYTHONPATH set
to another checkout to measure that one (the report records the served code's commit).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from common import ROOT, free_port, spread, started_at  # bench/common.py, beside this file

PROBE_TIMEOUT_S = 5.0
TARGET_S = 1.0  # what a probe must answer within (the goal; Kubernetes' default probe timeout)
UPLOAD_HEAD = ("POST /v1/videos HTTP/1.1\r\nHost: flood\r\nContent-Type: multipart/form-data; boundary=b\r\n"
               "Content-Length: 1000000\r\n\r\n--b\r\n")


def tiny_png() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (150, 110, 90)).save(buf, format="PNG")
    return buf.getvalue()


def code_commit() -> dict:
    """The commit (and whether the tree differs from it) of the checkout `deployments` comes from."""
    import deployments

    where = Path(deployments.__file__).resolve().parent.parent
    head = subprocess.run(["git", "-C", str(where), "rev-parse", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(where), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True)
    return {"path": str(where), "commit": head.stdout.strip() or None, "modified": bool(dirty.stdout.strip())}


def processes() -> dict:
    """{'ingress': pid, 'proxy': pid} among this process's descendants (Ray's process titles)."""
    import psutil

    found = {}
    for proc in psutil.Process().children(recursive=True):
        try:
            title = " ".join(proc.cmdline())
        except psutil.Error:
            continue
        if "ServeReplica:" in title and ":Ingress" in title:
            found["ingress"] = proc.pid
        elif "ProxyActor" in title:
            found["proxy"] = proc.pid
    return found


def rss_mb(pids: dict) -> dict:
    import psutil

    out = {}
    for name, pid in pids.items():
        try:
            out[name] = round(psutil.Process(pid).memory_info().rss / 2**20, 1)
        except psutil.Error:
            out[name] = None
    return out


class Prober:
    """Sequential GETs of /healthz and a small API route in a thread, each timed."""

    def __init__(self, base: str, small: str):
        import httpx

        self.client = httpx.Client(base_url=base, timeout=PROBE_TIMEOUT_S)
        self.small = small
        self.samples: list[tuple[float, str, float | None, int | None]] = []  # (t, route, seconds, status)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        import httpx

        while not self.stop.is_set():
            for route in ("/healthz", self.small):
                started = time.perf_counter()
                try:
                    status = self.client.get(route).status_code
                    took = time.perf_counter() - started
                except httpx.HTTPError:
                    status, took = None, None
                self.samples.append((time.monotonic(), route, took, status))
            self.stop.wait(0.2)

    def window(self, start: float, end: float) -> dict:
        out = {}
        for route, key in (("/healthz", "healthz"), (self.small, "small_get")):
            got = [(s, c) for t, r, s, c in self.samples if r == route and start <= t <= end]
            secs = [PROBE_TIMEOUT_S if s is None else s for s, _ in got]
            out[key] = {"n": len(got), "seconds": spread(secs), "timeouts": sum(s is None for s, _ in got),
                        f"over_{TARGET_S:g}_s": sum(s > TARGET_S for s in secs),
                        "not_200": sum(c != 200 for _, c in got)}
        return out


async def first_bytes(reader) -> tuple[bytes | None, float]:
    """The first bytes the server sends on a connection (b'' closed, None reset), and when."""
    try:
        data = await reader.read(4096)
    except OSError:
        data = None
    return data, time.monotonic()


async def open_flood(port: int, kind: str, n: int, path: str) -> list:
    """N connections of one kind, opened at once -> (reader, writer, answer task) each (None: the
    connect failed). The answer task reads only the first bytes the server sends (a status line
    and headers, a refusal's body), never the stream after them: a listener that never reads on."""
    head = (f"GET {path} HTTP/1.1\r\nHost: flood\r\nAccept: text/event-stream\r\n\r\n" if kind == "events"
            else UPLOAD_HEAD).encode()

    async def one():
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 16)
            writer.write(head)
            await writer.drain()
            return reader, writer, asyncio.create_task(first_bytes(reader))
        except OSError:
            return None

    return await asyncio.gather(*[one() for _ in range(n)])


async def trickle(conns: list, nbytes: int, every_s: float, stop: asyncio.Event) -> None:
    chunk = b"x" * nbytes
    while not stop.is_set():
        for conn in conns:
            if conn is not None and not conn[1].is_closing() and not conn[2].done():
                conn[1].write(chunk)  # until the server answered
        try:
            await asyncio.wait_for(stop.wait(), every_s)
        except TimeoutError:
            pass


def answers(conns: list, opened: float) -> dict:
    """What each connection got by now: its status line's code (and whether a refusal carried
    Retry-After), 'no answer' while the server still holds it silent, 'closed' / 'reset' when it
    went without a status line; and when the refusals came, from the flood's start."""
    counts: dict[str, int] = {}
    retry_after: dict[str, int] = {}
    refused_at = []
    for conn in conns:
        if conn is None:
            key = "connect failed"
        elif not conn[2].done():
            key = "no answer"
        else:
            data, at = conn[2].result()
            match = re.match(rb"HTTP/1\.[01] (\d{3})", data or b"")
            key = match.group(1).decode() if match else {None: "reset", b"": "closed"}.get(data, "other")
            if key in ("429", "503"):
                refused_at.append(at - opened)
                if b"retry-after:" in data.lower():
                    retry_after[key] = retry_after.get(key, 0) + 1
        counts[key] = counts.get(key, 0) + 1
    return {"answers": counts, "with_retry_after": retry_after, "refused_within_s": spread(refused_at)}


def log_findings(session_dir: str) -> dict:
    """Tracebacks and 'unhandled error' lines in the run's Serve logs."""
    found = {"tracebacks": 0, "unhandled_error": 0, "files": {}}
    for path in Path(session_dir, "logs", "serve").glob("*.log"):
        text = path.read_text(errors="replace")
        tb, unhandled = text.count("Traceback (most recent call last)"), text.count("unhandled error")
        if tb or unhandled:
            found["files"][path.name] = {"tracebacks": tb, "unhandled_error": unhandled}
        found["tracebacks"] += tb
        found["unhandled_error"] += unhandled
    return found


async def phase(kind: str, args, port: int, path: str, prober: Prober, pids: dict) -> dict:
    before = rss_mb(pids)
    t0 = time.monotonic()
    conns = await open_flood(port, kind, args.connections, path)
    opened = time.monotonic()
    stop = asyncio.Event()
    trickler = asyncio.create_task(trickle(conns, args.trickle_bytes, args.trickle_every_s, stop)
                                   if kind == "uploads" else stop.wait())
    peak = dict(before)
    while time.monotonic() < opened + args.hold_s:
        await asyncio.sleep(1.0)
        now = rss_mb(pids)
        peak = {k: max(v or 0, now.get(k) or 0) for k, v in peak.items()}
    held = time.monotonic()
    got = answers(conns, t0)
    stop.set()
    await trickler
    for conn in conns:
        if conn is not None:
            conn[2].cancel()
            conn[1].close()
    await asyncio.sleep(args.settle_s)
    result = {"connections": args.connections, "open_s": round(opened - t0, 2), "hold_s": args.hold_s,
              **got, "probes_during": prober.window(t0, held), "probes_after": prober.window(held + 2, time.monotonic()),
              "rss_mb": {"before": before, "peak": peak, "after": rss_mb(pids)}}
    print(kind, json.dumps(result), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=2000, help="connections of each phase")
    parser.add_argument("--hold-s", type=float, default=30.0)
    parser.add_argument("--settle-s", type=float, default=15.0)
    parser.add_argument("--step-s", type=float, default=0.5, help="seconds of each denoise step (the job's length)")
    parser.add_argument("--trickle-bytes", type=int, default=1024)
    parser.add_argument("--trickle-every-s", type=float, default=0.5)
    parser.add_argument("--phases", default="events,uploads")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--edge", action="store_true",
                        help="the admission gates also in Ray Serve's HTTP proxy (proxy_middlewares; README, Floods)")
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if args.edge:  # before Ray starts: the proxy's process reads it
        os.environ["RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"] = "deployments.api.admission:proxy_middlewares"
    import httpx
    import ray
    from ray import serve

    from graph import GraphArgs, app

    phases = args.phases.split(",")
    steps = int((len(phases) * (args.hold_s + args.settle_s + 60)) / args.step_s) + 1
    storage = tempfile.mkdtemp(prefix="avatar-serve-flood-")
    overrides = {"stages": {r: {"simulate_step_seconds": args.step_s} for r in ("high", "low")},
                 "limits": {"max_steps": max(steps, 20)}, "serving": {"storage_dir": storage}}
    report = {"started_at": started_at(), "code": code_commit(), "host": platform.node(), "cpus": os.cpu_count(),
              "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "phases": {}}
    port = free_port()
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    session_dir = ray._private.worker._global_node.get_session_dir_path()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(app(GraphArgs(profile="tiny", overrides=overrides)), name="avatar-serve", route_prefix="/")
        base = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=base, timeout=60) as client:
            while client.get("/readyz").status_code != 200:
                time.sleep(0.5)
            job = client.post("/v1/videos", data={"prompt": "a flood", "size": "32x32", "num_frames": "5",
                                                  "num_inference_steps": str(steps)},
                              files={"input_reference": ("p.png", tiny_png(), "image/png")})
            job.raise_for_status()
            job_id = job.json()["id"]
            for _ in range(5):  # warm: the routes' first calls
                client.get("/healthz"), client.get(f"/v1/videos/{job_id}")
        pids = processes()
        time.sleep(2.0)
        report["rss_mb_start"] = rss_mb(pids)
        prober = Prober(base, f"/v1/videos/{job_id}")
        prober.thread.start()
        time.sleep(3.0)
        report["probes_idle"] = prober.window(0, time.monotonic())
        for kind in phases:
            report["phases"][kind] = asyncio.run(phase(kind, args, port, f"/v1/videos/{job_id}/events", prober, pids))
        prober.stop.set()
        prober.thread.join()
        report["rss_mb_end"] = rss_mb(pids)
        report["rss_mb_growth"] = {k: round((report["rss_mb_end"][k] or 0) - (v or 0), 1)
                                   for k, v in report["rss_mb_start"].items()}
        report["job_status"] = httpx.get(f"{base}/v1/videos/{job_id}", timeout=30).json().get("status")
    finally:
        serve.shutdown()
        ray.shutdown()
    report["logs"] = log_findings(session_dir)
    out = args.out or ROOT / "bench" / "results" / f"flood-{platform.node()}.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print("wrote", out)


if __name__ == "__main__":
    main()
