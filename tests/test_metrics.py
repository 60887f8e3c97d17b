"""The Prometheus exporter, scraped over real HTTP and read with prometheus-client's parser."""

from __future__ import annotations

import urllib.error
import urllib.request
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from zpipe.watch.metrics import Exporter
from zpipe.watch.observe import BUCKETS, Histogram


def histogram(*seconds: float) -> dict[str, Any]:
    h = Histogram()
    for s in seconds:
        h.add(s)
    return h.as_dict()


def replica(name: str, index: int, up: bool, received: int, sent: int, **more: Any) -> dict:
    figures = {"name": name, "replica": index, "up": up, "pid": 1000 + index, "host": "h",
               "received": received, "sent": sent, "busy": 1.5, "blocked": 0.25,
               "idle": 3.0, "queue": 2, "rss": 50_000_000, "cpu": 1.25}
    figures.update(more)
    return figures


def stage(name: str, replicas: list[dict], **more: Any) -> dict:
    figures = {
        "name": name, "replicas": len(replicas), "up": sum(r["up"] for r in replicas),
        "state": "running",
        "received": sum(r["received"] for r in replicas),
        "sent": sum(r["sent"] for r in replicas),
        "rate_in": 10.0, "rate_out": 10.0, "queue": sum(r["queue"] for r in replicas),
        "busy": 3.0, "blocked": 0.5, "idle": 6.0,
        "busy_pct": 31.6, "blocked_pct": 5.3, "idle_pct": 63.1,
        "errors": 0, "errors_by_type": {}, "restarts": 0, "redelivered": 0, "dropped": 0,
        "rss": 100_000_000, "cpu": 2.5,
        "item_seconds": histogram(), "p50": None, "p99": None, "end_to_end": None,
        "replica_figures": replicas}
    figures.update(more)
    return figures


# 0.001 sits exactly on a bound: Prometheus' buckets are "le", so it counts there.
DETECT_TIMES = (0.0003, 0.001, 0.004, 0.004, 0.2, 75.0)
SNAPSHOT = {
    "pipeline": "cams", "state": "running", "elapsed": 12.0, "time": 1_700_000_000.0,
    "total": None, "bottleneck": {"stage": "detector", "text": "detector is busy 90%"},
    "stages": [
        stage("detector",
              [replica("detector-0", 0, True, 120, 118),
               replica("detector-1", 1, False, 80, 79, rss=None, queue=0)],
              errors=5, errors_by_type={"ValueError": 3, "KeyError": 1},
              restarts=2, redelivered=7, dropped=1, item_seconds=histogram(*DETECT_TIMES)),
        stage("writer", [replica("writer-0", 0, True, 197, 197)],
              errors=2, item_seconds=histogram(0.01, 0.02),
              end_to_end=histogram(0.5, 1.5, 2.0)),
    ]}


def scrape(port: int) -> dict[tuple[str, frozenset], float]:
    """Every sample at ``/metrics``, by (sample name, its labels)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        assert response.status == 200
        text = response.read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def labels(**kw: str) -> frozenset:
    return frozenset({"pipeline": "cams", **kw}.items())


@pytest.fixture
def exporter():
    exporters: list[Exporter] = []

    def make(snapshot=lambda: SNAPSHOT) -> Exporter:
        exporters.append(Exporter(snapshot, "cams"))
        return exporters[-1]
    yield make
    for e in exporters:
        e.close()


def test_per_replica_figures(exporter):
    samples = scrape(exporter().start(0))
    for st in SNAPSHOT["stages"]:
        for r in st["replica_figures"]:
            at = labels(stage=st["name"], replica=r["name"])
            assert samples["zpipe_items_received_total", at] == r["received"]
            assert samples["zpipe_items_sent_total", at] == r["sent"]
            assert samples["zpipe_busy_seconds_total", at] == r["busy"]
            assert samples["zpipe_blocked_seconds_total", at] == r["blocked"]
            assert samples["zpipe_idle_seconds_total", at] == r["idle"]
            assert samples["zpipe_replica_cpu_seconds_total", at] == r["cpu"]
            assert samples["zpipe_queue_items", at] == r["queue"]
            assert samples["zpipe_replica_up", at] == (1.0 if r["up"] else 0.0)
    assert samples["zpipe_replica_rss_bytes", labels(stage="detector", replica="detector-0")] \
        == 50_000_000
    # An unknown figure is left out rather than exported as 0.
    assert ("zpipe_replica_rss_bytes", labels(stage="detector", replica="detector-1")) \
        not in samples


def test_per_stage_counters_and_errors(exporter):
    samples = scrape(exporter().start(0))
    detector, writer = labels(stage="detector"), labels(stage="writer")
    assert samples["zpipe_restarts_total", detector] == 2
    assert samples["zpipe_redelivered_total", detector] == 7
    assert samples["zpipe_dropped_total", detector] == 1
    assert samples["zpipe_restarts_total", writer] == 0

    errors = {dict(key)["exception"]: value for (name, key), value in samples.items()
              if name == "zpipe_errors_total" and dict(key)["stage"] == "detector"}
    # 5 errors, 4 with a type: the one left over is "unknown", so they add up.
    assert errors == {"ValueError": 3, "KeyError": 1, "unknown": 1}
    assert samples["zpipe_errors_total", labels(stage="writer", exception="unknown")] == 2


def buckets(samples: dict, name: str, stage_name: str) -> dict[float, float]:
    return {float(dict(key)["le"]): value for (sample, key), value in samples.items()
            if sample == name + "_bucket" and dict(key)["stage"] == stage_name}


def test_histograms_are_cumulative(exporter):
    samples = scrape(exporter().start(0))
    got = buckets(samples, "zpipe_item_seconds", "detector")
    assert sorted(got) == sorted(BUCKETS) + [float("inf")]
    for bound, count in got.items():
        assert count == sum(1 for t in DETECT_TIMES if t <= bound), bound
    assert got[0.001] == 2 and got[70.0] == 5 and got[100.0] == 6 and got[float("inf")] == 6
    at = labels(stage="detector")
    assert samples["zpipe_item_seconds_count", at] == len(DETECT_TIMES)
    assert samples["zpipe_item_seconds_sum", at] == pytest.approx(sum(DETECT_TIMES))

    # end_to_end only where the snapshot has one: the writer (a sink), not the detector.
    assert buckets(samples, "zpipe_end_to_end_seconds", "detector") == {}
    end = buckets(samples, "zpipe_end_to_end_seconds", "writer")
    assert end[1.0] == 1 and end[3.0] == 3 and end[float("inf")] == 3
    assert samples["zpipe_end_to_end_seconds_count", labels(stage="writer")] == 3
    assert samples["zpipe_end_to_end_seconds_sum", labels(stage="writer")] == \
        pytest.approx(4.0)


def test_each_scrape_reads_a_fresh_snapshot(exporter):
    current: dict = {"snapshot": None}
    port = exporter(lambda: current["snapshot"]).start(0)
    # Before the first snapshot: a valid, empty answer, not an error.
    assert scrape(port) == {}
    current["snapshot"] = SNAPSHOT
    at = labels(stage="writer", replica="writer-0")
    assert scrape(port)["zpipe_items_sent_total", at] == 197


def test_close_frees_the_port(exporter):
    first = exporter()
    port = first.start(0)
    scrape(port)
    first.close()
    first.close()  # twice is harmless
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5)
    assert exporter().start(port) == port
    scrape(port)


def test_batches_are_counted_and_their_mean_size_is_a_gauge(exporter):
    batched = stage("batcher", [replica("batcher-0", 0, True, 90, 90)],
                    batches=30, batch_items=90, batch_size_mean=3.0)
    plain = stage("writer", [replica("writer-0", 0, True, 90, 0)])
    samples = scrape(exporter(lambda: {**SNAPSHOT, "stages": [batched, plain]}).start(0))
    at = labels(stage="batcher")
    assert samples["zpipe_batches_total", at] == 30
    assert samples["zpipe_batch_items_total", at] == 90
    assert samples["zpipe_batch_size_mean", at] == 3.0
    # A stage without batched calls has no mean (rather than a made-up 0).
    assert ("zpipe_batch_size_mean", labels(stage="writer")) not in samples
    assert samples["zpipe_batches_total", labels(stage="writer")] == 0
