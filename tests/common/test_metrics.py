"""Metrics outside and inside Ray: gauges that hold still are sent again, so they never vanish
from the scrape (the served check is tests/test_cluster.py's gauge test)."""

from __future__ import annotations

import threading
import time

from deployments.common.metrics import IngressMetrics, _KeptGauge


class RecordingGauge:
    """Ray's Gauge calls, recorded."""

    def __init__(self):
        self.sets: list[tuple[float, dict | None]] = []
        self.lock = threading.Lock()

    def set(self, value, tags=None):
        with self.lock:
            self.sets.append((value, tags))


def test_a_kept_gauge_sends_each_tag_sets_last_value_again_while_it_holds_still():
    raw = RecordingGauge()
    gauge = _KeptGauge(raw, interval_s=0.05)
    gauge.set(3.0, tags={"stage": "high"})
    gauge.set(7.5, tags={"stage": "low"})
    gauge.set(4.0, tags={"stage": "high"})  # the last value of a tag set is the one kept
    before = len(raw.sets)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and len(raw.sets) < before + 4:
        time.sleep(0.02)
    with raw.lock:
        again = raw.sets[before:]
    assert {(v, tuple(t.items())) for v, t in again} == {(4.0, (("stage", "high"),)), (7.5, (("stage", "low"),))}


def test_a_kept_gauge_without_tags_is_sent_without_tags():
    raw = RecordingGauge()
    gauge = _KeptGauge(raw, interval_s=0.05)
    gauge.set(0)
    gauge.refresh()
    assert raw.sets == [(0, None), (0, None)]


def test_the_ingress_gauges_start_at_zero():
    metrics = IngressMetrics()
    for gauge in (metrics.queue_depth, metrics.running, metrics.turns, metrics.live):
        assert gauge.values == {(): [0]}
