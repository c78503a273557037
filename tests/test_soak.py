"""Soak: 400 mixed requests at concurrency 8 against the served tiny graph on a Ray cluster (jobs,
synchronous videos, avatars, talk turns, cancels, bad input). Every request is answered and none
with a 5xx, every job ends (none lost or stuck), and no Ray process keeps growing. Bounded by the
count of requests, not by time: how many a second the graph serves is a benchmark's
(bench/serve.py), and pytest-timeout catches a soak that hangs."""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx
import psutil
import pytest

from helpers import free_port, get_dummy_image, png_bytes, wait_final, wait_ready, wav_bytes

APP = "avatar-serve"
REQUESTS, CONCURRENCY = 400, 8
IMAGE = png_bytes(get_dummy_image())
FILES = {"input_reference": ("p.png", IMAGE, "image/png")}
VIDEO = {"prompt": "a woman talks", "size": "32x16", "num_frames": "5", "num_inference_steps": "2"}
pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    import ray
    from ray import serve

    from graph import GraphArgs, app

    http = free_port()
    ray.init(address="local", num_cpus=4, num_gpus=0, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": http})
        overrides = {"serving": {"storage_dir": str(tmp_path_factory.mktemp("store")), "max_running_jobs": 2,
                                 "max_queued_jobs": 24, "job_timeout_s": 60}}
        serve.run(app(GraphArgs(profile="tiny", overrides=overrides)), name=APP, route_prefix="/")
        with httpx.Client(base_url=f"http://127.0.0.1:{http}", timeout=120) as client:
            yield client
    finally:
        serve.shutdown()
        ray.shutdown()


def serve_processes(*names: str) -> dict[str, psutil.Process]:
    """The processes whose command line holds one of `names`, by "pid command"."""
    out = {}
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if any(name in cmd for name in names):
            out[f"{proc.info['pid']} {cmd.split()[0]}"] = proc
    return out


def replica_memory() -> dict[str, int]:
    """Resident memory of each Serve replica and the proxy, by process id."""
    out = {}
    for name, proc in serve_processes("ServeReplica", "ProxyActor").items():
        try:
            out[name] = proc.memory_info().rss
        except psutil.Error:
            pass
    return out


def replica_environments() -> dict[str, dict[str, str]]:
    """The environment each of the app's replica processes started with, by process id."""
    return {name: proc.environ() for name, proc in serve_processes(f"ServeReplica:{APP}:").items()}


def test_mixed_requests_at_concurrency_8(served):
    client = served
    avatars = []
    for seed in range(2):  # two avatars; repeated creation of the same inputs returns them
        r = client.post("/v1/avatars", data={**VIDEO, "size": "32x32", "seed": str(seed)}, files=FILES)
        avatars.append(wait_ready(client, r.json()["id"])["id"])
    rng = random.Random(0)
    lock = threading.Lock()
    seen: list[tuple[str, int]] = []
    jobs: list[str] = []

    def job():
        r = client.post("/v1/videos", data={**VIDEO, "seed": str(rng.randrange(1000))}, files=FILES)
        if r.status_code == 200:
            with lock:
                jobs.append(r.json()["id"])
        return r

    def sync():
        return client.post("/v1/videos/sync", data={**VIDEO, "seed": str(rng.randrange(1000))}, files=FILES)

    def avatar():
        return client.post("/v1/avatars", data={**VIDEO, "size": "32x32", "seed": str(rng.randrange(2))}, files=FILES)

    def turn():
        audio = wav_bytes(rng.choice([0.2, 0.5, 1.0]), rate=16000, channels=1)
        with client.stream("POST", f"/v1/avatars/{rng.choice(avatars)}/speech",
                           files={"audio": ("a.wav", audio, "audio/wav")}) as s:
            s.read()
            return s

    def cancel():
        r = job()
        if r.status_code == 200:
            return client.delete(f"/v1/videos/{r.json()['id']}")
        return r

    def bad():
        return rng.choice([
            lambda: client.post("/v1/videos", data={**VIDEO, "size": "33x16"}, files=FILES),
            lambda: client.post("/v1/videos", data=VIDEO, files={"input_reference": ("p.png", b"junk", "image/png")}),
            lambda: client.get("/v1/videos/video_nope"),
            lambda: client.post(f"/v1/avatars/{avatars[0]}/speech", files={"audio": ("a.wav", b"junk", "audio/wav")}),
            lambda: client.post("/v1/avatars/avatar_nope/speech", files={"audio": ("a.wav", b"x", "audio/wav")}),
        ])()

    kinds = [job] * 7 + [sync] * 3 + [avatar] * 2 + [turn] * 5 + [cancel] * 2 + [bad] * 2
    snapshots = []

    def one(i):
        kind = rng.choice(kinds)
        r = kind()
        with lock:
            seen.append((kind.__name__, r.status_code))
        return r.status_code

    with ThreadPoolExecutor(CONCURRENCY) as pool:
        futures = []
        for i in range(REQUESTS):
            if i in (40, REQUESTS // 2):
                for f in futures:
                    f.result()
                # after warm-up (every code path has run once), and half way
                snapshots.append(replica_memory())
            futures.append(pool.submit(one, i))
            while sum(not f.done() for f in futures) >= CONCURRENCY:
                time.sleep(0.01)
        for f in futures:
            f.result()
    statuses = [s for _, s in seen]
    assert len(seen) == REQUESTS, f"{len(seen)} of {REQUESTS} requests answered"
    assert all(s < 500 for s in statuses), [x for x in seen if x[1] >= 500]
    counts = Counter(seen)
    print("soak:", len(seen), "requests", dict(sorted(counts.items())))
    # Each kind answered as it should: work accepted or refused with 429 (the queue is bounded),
    # bad input refused with a 4xx, and the queue never stopped accepting work for good.
    assert {s for k, s in seen if k in ("job", "sync", "avatar")} <= {200, 201, 429}, counts
    assert {s for k, s in seen if k == "turn"} <= {200, 429} and counts[("turn", 200)] > 0, counts
    assert {s for k, s in seen if k == "bad"} <= {400, 404, 409, 422}, counts
    assert counts[("job", 200)] >= 20 and counts[("sync", 200)] >= 5, counts
    # Every job accepted ends: completed, or cancelled by the soak; none lost or stuck.
    finals = {j: wait_final(client, j, timeout=120)["status"] for j in jobs}
    assert set(finals.values()) <= {"completed", "cancelled"}, finals
    listed = {j["id"] for j in client.get("/v1/videos", params={"limit": 100}).json()["data"]}
    assert listed <= set(jobs) and len(listed) == min(100, len(jobs))
    for avatar_id in avatars:  # every turn slot was given back: turns are admitted again
        r = client.post(f"/v1/avatars/{avatar_id}/speech", files={"audio": ("a.wav", wav_bytes(0.3), "audio/wav")})
        assert r.status_code == 200, r.text
    # Memory settles rather than grows with the requests served: a leak adds about as much in
    # each half of the soak, so no process may grow by 100 MiB or more in both halves, nor by 400
    # MiB in all. One step in one half is allocator behaviour, not a leak: glibc hands freed
    # arenas back or keeps them as threads come and go (seen in CI: the lip-sync replica -5 MiB in
    # the first half, +140 MiB in the second).
    baseline, half = snapshots[0], snapshots[-1]
    end = replica_memory()
    first = {p: (half[p] - baseline[p]) // 2**20 for p in baseline if p in half}
    second = {p: (end[p] - half[p]) // 2**20 for p in half if p in end}
    print("soak memory growth, MiB, first half:", first, "second half:", second)
    assert second and first
    # Each stage replica started with glibc's arenas bounded (placement.malloc_arena_max): with an
    # arena per request thread, the lip-sync replica grew 198 then 137 MiB in a CI soak.
    arenas = {p: env.get("MALLOC_ARENA_MAX") for p, env in replica_environments().items()}
    assert len(arenas) == 6 and set(arenas.values()) == {"2"}, arenas
    leaking = {p: (first[p], second[p]) for p in second if p in first and min(first[p], second[p]) >= 100}
    assert not leaking, leaking
    total = {p: (end[p] - baseline[p]) // 2**20 for p in baseline if p in end}
    assert max(total.values()) < 400, sorted(total.items(), key=lambda kv: -kv[1])
