"""Metrics for stages and the ingress, exported through `ray.serve.metrics` inside a Ray cluster
(they appear in the Ray dashboard and on the Prometheus endpoint) and kept in memory otherwise.

Stage classes stay free of Ray imports: they use `StageMetrics`, which binds to Ray's metric
classes only when it finds itself in a running Ray worker.

    avatar_serve_stage_latency_seconds{stage, method}   histogram
    avatar_serve_denoise_step_seconds{stage}            histogram
    avatar_serve_stage_wait_seconds{stage}              histogram (waiting for the stage's model lock)
    avatar_serve_gpu_memory_bytes{stage, kind}          gauge (where the stage has a GPU): kind =
        allocated (resident now), reserved (held by the caching allocator now), peak_allocated,
        peak_reserved (the highest since start, loading and warm-up included)
    avatar_serve_jobs_total{status}                     counter (jobs reaching a final status)
    avatar_serve_queue_depth / avatar_serve_jobs_running   gauges
    avatar_serve_talk_turns                             gauge (talk turns streaming now)
    avatar_serve_live_sessions                          gauge (live sessions open now)
    avatar_serve_turn_phase_seconds{stage, phase}      histogram: where a talk turn's time goes
        (ingress: audio_decode, first_byte; lipsync: features, first_batch, first_frames,
        first_bytes, total -- each from the start of the turn in that stage)
    avatar_serve_startup_seconds{stage}                 gauge (construction incl. warm-up)

Gauges stay in the scrape while they hold still (see `_KeptGauge`); the ingress's start at 0.
"""

from __future__ import annotations

import sys
import threading
import time
import weakref
from collections import defaultdict
from contextlib import contextmanager

# Bucket bounds, fine where our targets are (a talk turn's first byte near 0.25 s, a denoise step
# near 2 s, a request near 15 s). Fine because Ray does not export the exact sum of a histogram:
# its OpenTelemetry recorder rebuilds `_sum` from bucket midpoints, so a mean read from
# Prometheus is only as good as the buckets (with the old 0.25/0.5/1/2.5 bounds a 0.29 s first
# byte and a 2.4 s step read as 0.375 s and 1.75 s).
LATENCY_BUCKETS = [0.005, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.125, 0.15, 0.175, 0.2, 0.225,
                   0.25, 0.275, 0.3, 0.35, 0.4, 0.5, 0.6, 0.75, 1, 1.25, 1.5, 1.75, 2, 2.25, 2.5, 2.75, 3,
                   3.5, 4, 5, 6, 7.5, 10, 12.5, 15, 20, 25, 30, 45, 60, 120, 300, 900]


def _ray_metrics():
    """ray.serve.metrics when running in an initialised Ray worker, else None."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return None
    from ray.serve import metrics

    return metrics


class _Memory:
    """In-process stand-in with the same calls as Ray's metric objects."""

    def __init__(self):
        self.values: dict[tuple, list[float]] = defaultdict(list)

    def observe(self, value, tags=None):
        self.values[tuple(sorted((tags or {}).items()))].append(value)

    inc = observe

    def set(self, value, tags=None):
        self.values[tuple(sorted((tags or {}).items()))] = [value]


class _KeptGauge:
    """A Ray gauge whose last value of each tag set is sent again every export interval.

    Ray's metrics agent drops a gauge series that the process has not reported within two export
    intervals (about 20 s with Ray's default 10 s interval), and Ray's metric objects report a
    gauge only when it is set. A gauge that holds still -- the start-up time, a queue depth of 0,
    no talk turn for a minute -- would vanish from the scrape, and dashboards and alerts need it
    there. Ray has no option for this, hence the refresher (one daemon thread per process for
    every kept gauge)."""

    _kept: "weakref.WeakSet[_KeptGauge]" = weakref.WeakSet()
    _refresher: threading.Thread | None = None
    _guard = threading.Lock()

    def __init__(self, gauge, interval_s: float):
        self.gauge = gauge
        self.values: dict[tuple, float] = {}
        self.lock = threading.Lock()
        with _KeptGauge._guard:
            _KeptGauge._kept.add(self)
            if _KeptGauge._refresher is None:
                _KeptGauge._refresher = threading.Thread(target=_KeptGauge._refresh_forever, args=(interval_s,),
                                                         name="avatar-serve-gauges", daemon=True)
                _KeptGauge._refresher.start()

    def set(self, value, tags=None):
        key = tuple(sorted((tags or {}).items()))
        with self.lock:
            self.values[key] = value
            self.gauge.set(value, tags=tags)

    def refresh(self) -> None:
        with self.lock:
            for key, value in self.values.items():
                self.gauge.set(value, tags=dict(key) or None)

    @staticmethod
    def _refresh_forever(interval_s: float) -> None:
        while True:
            time.sleep(interval_s)
            for gauge in list(_KeptGauge._kept):
                try:
                    gauge.refresh()
                except Exception:  # noqa: BLE001 - a metric must never take the process down
                    pass


def _gauge_refresh_s() -> float:
    """Half of Ray's metrics export interval (`metrics_report_interval_ms`, floored at 1 s as Ray
    does), so each export sees every kept gauge at least once."""
    import ray

    return max(ray._config.metrics_report_interval_ms(), 1000) / 2000.0


def _make(kind: str, name: str, description: str, tag_keys: tuple[str, ...], **kw):
    metrics = _ray_metrics()
    if metrics is None:
        return _Memory()
    made = getattr(metrics, kind)(name, description=description, tag_keys=tag_keys, **kw)
    return _KeptGauge(made, _gauge_refresh_s()) if kind == "Gauge" else made


class StageMetrics:
    def __init__(self, stage: str):
        self.stage = stage
        self.latency = _make("Histogram", "avatar_serve_stage_latency_seconds",
                             "Latency of a stage method", ("stage", "method"), boundaries=LATENCY_BUCKETS)
        self.step = _make("Histogram", "avatar_serve_denoise_step_seconds", "Time of one denoise step",
                          ("stage",), boundaries=LATENCY_BUCKETS)
        self.gpu_memory = _make("Gauge", "avatar_serve_gpu_memory_bytes",
                                "GPU memory of the stage's process, by kind", ("stage", "kind"))
        self.wait = _make("Histogram", "avatar_serve_stage_wait_seconds",
                          "Time a request waited for the stage's model (other requests were using it)",
                          ("stage",), boundaries=LATENCY_BUCKETS)
        self.phase = _phase_histogram()
        self.startup = _make("Gauge", "avatar_serve_startup_seconds",
                             "Time the stage took to load and warm up", ("stage",))

    @contextmanager
    def timed(self, method: str):
        started = time.perf_counter()
        try:
            yield
        finally:
            self.latency.observe(time.perf_counter() - started, tags={"stage": self.stage, "method": method})
            self._gpu_memory()

    def observe_phase(self, phase: str, seconds: float) -> None:
        self.phase.observe(seconds, tags={"stage": self.stage, "phase": phase})

    def started(self, seconds: float) -> None:
        self.startup.set(seconds, tags={"stage": self.stage})
        self._gpu_memory()  # loading and warm-up peaks, before any request

    def observe_wait(self, seconds: float) -> None:
        self.wait.observe(seconds, tags={"stage": self.stage})

    def observe_step(self, seconds: float) -> None:
        self.step.observe(seconds, tags={"stage": self.stage})

    def _gpu_memory(self) -> None:
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_available():
            cuda = torch.cuda
            for kind, value in (("allocated", cuda.memory_allocated()), ("reserved", cuda.memory_reserved()),
                                ("peak_allocated", cuda.max_memory_allocated()),
                                ("peak_reserved", cuda.max_memory_reserved())):
                self.gpu_memory.set(float(value), tags={"stage": self.stage, "kind": kind})


class TurnClock:
    """Seconds from the start of a talk turn to the first time each phase is reached (fed to
    `avatar_serve_turn_phase_seconds` and the turn's log line)."""

    def __init__(self):
        self.started = time.perf_counter()
        self.marks: dict[str, float] = {}

    def mark(self, phase: str) -> None:
        if phase not in self.marks:
            self.marks[phase] = time.perf_counter() - self.started


def _phase_histogram():
    return _make("Histogram", "avatar_serve_turn_phase_seconds",
                 "Time from the start of a talk turn in a stage to each of its phases",
                 ("stage", "phase"), boundaries=LATENCY_BUCKETS)


class IngressMetrics:
    def __init__(self):
        self.jobs = _make("Counter", "avatar_serve_jobs_total", "Jobs by final status", ("status",))
        self.queue_depth = _make("Gauge", "avatar_serve_queue_depth", "Jobs waiting to run", ())
        self.running = _make("Gauge", "avatar_serve_jobs_running", "Jobs running", ())
        self.turns = _make("Gauge", "avatar_serve_talk_turns", "Talk turns streaming now", ())
        self.live = _make("Gauge", "avatar_serve_live_sessions", "Live sessions open now", ())
        self.phase = _phase_histogram()
        # Every gauge in the scrape from the start: an idle deployment reads 0, not a missing series.
        self.load(0, 0)
        self.talk_turns(0)
        self.live_sessions(0)

    def observe_phase(self, phase: str, seconds: float) -> None:
        self.phase.observe(seconds, tags={"stage": "ingress", "phase": phase})

    def talk_turns(self, n: int) -> None:
        self.turns.set(n)

    def live_sessions(self, n: int) -> None:
        self.live.set(n)

    def finished(self, status: str) -> None:
        self.jobs.inc(1, tags={"status": status})

    def load(self, queued: int, running: int) -> None:
        self.queue_depth.set(queued)
        self.running.set(running)
