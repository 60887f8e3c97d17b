"""Prometheus exporter: serves a running pipeline's snapshot at ``/metrics``.

The supervisor owns the figures; this module only translates the latest
snapshot (the dict described in observe.py) into Prometheus metric families on
each scrape. It keeps a registry of its own, so nothing else a process may have
registered with prometheus-client's global REGISTRY leaks into (or collides
with) the pipeline's metrics.

Counters are the snapshot's running totals (received, sent, seconds busy ...);
Prometheus computes rates from them. Per-replica metrics carry the labels
``pipeline``, ``stage`` and ``replica`` (the replica's name, e.g. "detector-1");
per-stage ones ``pipeline`` and ``stage``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import MetricsHandler
from prometheus_client.utils import floatToGoString

from .httpd import Served, serve

# (metric name without "_total", replica_figures key, help) for per-replica counters.
REPLICA_COUNTERS = (
    ("zpipe_items_received", "received", "Items a replica has received."),
    ("zpipe_items_sent", "sent", "Items a replica has sent on."),
    ("zpipe_busy_seconds", "busy", "Seconds a replica spent working on items."),
    ("zpipe_blocked_seconds", "blocked", "Seconds a replica waited for the next stage."),
    ("zpipe_idle_seconds", "idle", "Seconds a replica waited for input."),
    ("zpipe_replica_cpu_seconds", "cpu", "CPU seconds a replica's process has used."),
)
REPLICA_GAUGES = (
    ("zpipe_queue_items", "queue", "Items waiting at a replica's input."),
    ("zpipe_replica_up", "up", "1 while a replica is up, else 0."),
    ("zpipe_replica_rss_bytes", "rss", "Resident memory of a replica's process."),
)
STAGE_COUNTERS = (
    ("zpipe_restarts", "restarts", "Replica restarts of a stage."),
    ("zpipe_redelivered", "redelivered", "Items a stage received again after a loss."),
    ("zpipe_dropped", "dropped", "Items a stage passed over for newer ones (input = latest)."),
    ("zpipe_batches", "batches", "Lists of items a stage's batched calls were given."),
    ("zpipe_batch_items", "batch_items", "Items in the lists a stage's batched calls were given."),
)
STAGE_HISTOGRAMS = (
    ("zpipe_item_seconds", "item_seconds", "Time in the stage per item."),
    ("zpipe_end_to_end_seconds", "end_to_end", "Source's send to sink's receive, per item."),
)
REPLICA_LABELS = ["pipeline", "stage", "replica"]
STAGE_LABELS = ["pipeline", "stage"]


def histogram_buckets(histogram: dict[str, Any]) -> list[tuple[str, float]]:
    """A snapshot HISTOGRAM's per-bucket counts as Prometheus' cumulative ``le`` buckets."""
    buckets, seen = [], 0
    for bound, count in zip(histogram["bounds"], histogram["counts"]):
        seen += count
        buckets.append((floatToGoString(bound), seen))
    # The last count is what lies above every bound: it belongs to +Inf only.
    buckets.append(("+Inf", sum(histogram["counts"])))
    return buckets


class SnapshotCollector:
    """Builds the metric families from a fresh snapshot at every scrape."""

    def __init__(self, snapshot: Callable[[], dict | None], pipeline: str) -> None:
        self.snapshot = snapshot
        self.pipeline = pipeline

    def collect(self) -> Iterator[Metric]:
        snap = self.snapshot()  # one read: every family describes the same moment
        stages: list[dict[str, Any]] = snap["stages"] if snap else []
        for kind, table in ((CounterMetricFamily, REPLICA_COUNTERS),
                            (GaugeMetricFamily, REPLICA_GAUGES)):
            for name, key, doc in table:
                yield self.per_replica(kind(name, doc, labels=REPLICA_LABELS), key, stages)
        for name, key, doc in STAGE_COUNTERS:
            family = CounterMetricFamily(name, doc, labels=STAGE_LABELS)
            for stage in stages:
                family.add_metric([self.pipeline, stage["name"]], float(stage.get(key) or 0))
            yield family
        # The run's mean batch size, for a dashboard that wants one number; over a
        # window it is rate(zpipe_batch_items_total) / rate(zpipe_batches_total).
        # Not a histogram: a replica would have to ship one more bucket array in
        # every heartbeat for what is read as this one figure (and the lists'
        # sizes are bounded by max_items anyway).
        mean = GaugeMetricFamily("zpipe_batch_size_mean", "Mean items per batched call of a "
                                 "stage, over the run (stages with batched calls only).",
                                 labels=STAGE_LABELS)
        for stage in stages:
            if stage.get("batches"):
                mean.add_metric([self.pipeline, stage["name"]],
                                float(stage.get("batch_items") or 0) / stage["batches"])
        yield mean
        errors = CounterMetricFamily("zpipe_errors", "Items a stage failed on, by exception.",
                                     labels=STAGE_LABELS + ["exception"])
        for stage in stages:
            by_type = dict(stage.get("errors_by_type") or {})
            # Errors whose type was not reported still count, so the sum is the total.
            unknown = stage["errors"] - sum(by_type.values())
            if unknown > 0:
                by_type["unknown"] = by_type.get("unknown", 0) + unknown
            for exception, count in sorted(by_type.items()):
                errors.add_metric([self.pipeline, stage["name"], exception], float(count))
        yield errors
        for name, key, doc in STAGE_HISTOGRAMS:
            family = HistogramMetricFamily(name, doc, labels=STAGE_LABELS)
            for stage in stages:
                histogram = stage.get(key)
                if histogram is not None:  # end_to_end exists at sinks only
                    family.add_metric([self.pipeline, stage["name"]],
                                      histogram_buckets(histogram), histogram["sum"])
            yield family

    def per_replica(self, family: Any, key: str, stages: list[dict[str, Any]]) -> Metric:
        """``family`` with one sample per replica of each stage, from its ``key`` figure."""
        for stage in stages:
            for replica in stage["replica_figures"]:
                value = replica.get(key)
                if value is not None:  # e.g. no rss for a replica not started yet
                    family.add_metric([self.pipeline, stage["name"], replica["name"]],
                                      float(value))
        return family


class Exporter:
    """A ``/metrics`` HTTP endpoint over ``snapshot()``, in a daemon thread."""

    def __init__(self, snapshot: Callable[[], dict | None], pipeline: str) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(SnapshotCollector(snapshot, pipeline))
        self.served: Served | None = None

    def start(self, port: int, address: str = "127.0.0.1") -> int:
        """Serve on ``address:port`` (0: a free port); the port actually bound."""
        # prometheus-client's own handler, on a server that stops at once (httpd.py).
        self.served = serve(MetricsHandler.factory(self.registry), address, port, "metrics")
        return self.served.port

    def close(self) -> None:
        """Stop serving and release the port; safe to call twice."""
        if self.served is not None:
            self.served.close()
