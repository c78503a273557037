"""How fast /healthz and /readyz answer while the ingress holds slow clients: the measurement the
tests leave out (they check that a probe answers at all, tests/api/test_hostile.py and
tests/test_cluster.py). The in-process graph (`LocalGraph`) behind uvicorn on a real socket, as
one ingress replica serves it.

    python bench/probes.py [--profile tiny] [--probes 50] [--stuck 80] [--trickling 8] [--out FILE]

Per load: probes of each route, one after another, each timed from connect to the last byte.
Loads: `idle`; `stuck`: connections that sent their headers and one byte of a 100-byte body and
then nothing; `trickling`: connections that send one byte of their body every 0.3 s. Both hold
their request open at the ingress for the whole measurement (the body deadline is raised above
it). Writes JSON (default bench/results/probes-<host>.json) with each route's latencies and how
many passed 1 s, Kubernetes' default probe timeout.
"""

import argparse
import json
import platform
import socket
import threading
import time
from pathlib import Path

from common import ROOT, git_commit, spread, started_at  # bench/common.py, beside this file

PROBE_TIMEOUT_S = 1.0  # Kubernetes' default timeoutSeconds
HEADERS = (b"POST /v1/videos HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
           b"Content-Length: 100\r\n\r\n{")


def serve(args) -> tuple[str, callable]:
    """The graph's app under uvicorn in a thread -> (base URL, stop)."""
    from deployments.local import LocalGraph, serve_in_thread
    from deployments.profiles import load_profile

    overrides = {"serving": {"body_timeout_s": 3600.0}}  # the held bodies stay held
    return serve_in_thread(LocalGraph(load_profile(args.profile, overrides)).app())


def probe(client, url: str, n: int) -> dict:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        r = client.get(url)
        times.append(time.perf_counter() - t0)
        assert r.status_code == 200, (url, r.status_code)
        time.sleep(0.02)
    return {"seconds": spread(times), f"over_{PROBE_TIMEOUT_S:g}_s": sum(t > PROBE_TIMEOUT_S for t in times),
            "n": n}


def hold(port: int, stuck: int, trickling: int) -> tuple[callable, list]:
    """Open the slow clients -> (stop, sockets)."""
    socks = []
    for _ in range(stuck + trickling):
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(HEADERS)
        socks.append(s)
    done = threading.Event()

    def trickle():
        while not done.wait(0.3):
            for s in socks[stuck:]:
                try:
                    s.sendall(b" ")
                except OSError:
                    pass

    thread = threading.Thread(target=trickle, daemon=True)
    thread.start()

    def stop():
        done.set()
        thread.join()
        for s in socks:
            s.close()

    return stop, socks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="tiny")
    parser.add_argument("--probes", type=int, default=50, help="probes of each route under each load")
    parser.add_argument("--stuck", type=int, default=80)
    parser.add_argument("--trickling", type=int, default=8)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    import httpx

    report = {"started_at": started_at(), "commit": git_commit(), "host": platform.node(), "profile": args.profile,
              "stuck": args.stuck, "trickling": args.trickling, "loads": {}}
    base, stop_server = serve(args)
    port = int(base.rsplit(":", 1)[1])
    try:
        with httpx.Client(base_url=base, timeout=60) as client:
            client.get("/readyz")  # the stages' first info() calls
            for load, (stuck, trickling) in {"idle": (0, 0), "stuck": (args.stuck, 0),
                                             "trickling": (0, args.trickling)}.items():
                release, _ = hold(port, stuck, trickling)
                time.sleep(1.0)  # let the ingress take every connection
                try:
                    report["loads"][load] = {route: probe(client, route, args.probes)
                                             for route in ("/healthz", "/readyz")}
                finally:
                    release()
                print(load, json.dumps(report["loads"][load]))
    finally:
        stop_server()
    out = args.out or ROOT / "bench" / "results" / f"probes-{platform.node()}.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print("wrote", out)


if __name__ == "__main__":
    main()
