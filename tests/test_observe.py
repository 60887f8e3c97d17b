"""observe.py: the histograms, the replica's clocks, and figures from a real run."""

from __future__ import annotations

import time

import pytest

import zpipe
from zpipe.watch.observe import BUCKETS, Histogram, Times, quantile


def test_a_quantile_falls_in_the_bucket_of_its_rank():
    h = Histogram()
    h.add(0.002, 90)
    h.add(0.4, 10)
    snap = h.as_dict()
    assert 0.0015 < quantile(snap, 0.5) <= 0.002
    assert 0.3 < quantile(snap, 0.99) <= 0.5
    assert quantile(Histogram().as_dict(), 0.5) is None
    h.add(1e6)  # above every bound: said as the last bound
    assert quantile(h.as_dict(), 1.0) == BUCKETS[-1]


def test_histograms_travel_and_merge_and_garbage_makes_an_empty_one():
    a, b = Histogram(), Histogram()
    a.add(0.001, 3)
    b.add(0.01, 2)
    a.merge(Histogram.from_wire(b.wire()))
    assert a.count == 5 and a.sum == pytest.approx(0.023)
    for garbage in (None, [1, 2], [[1] * 3, 0.0], [[-1] * len(a.counts), 0.0],
                    [a.counts, float("nan")], "x"):
        assert Histogram.from_wire(garbage).count == 0


def test_a_timing_point_times_the_items_before_it_without_the_waits():
    times = Times()
    times.started = 100.0
    times.mark(100.0, 4)        # 4 items taken in
    times.idle += 1.0           # ... worked on, then a second waiting for input
    times.mark(103.0, 2)        # 3 s later: 2 s of work for 4 items
    assert times.items.count == 4
    assert times.items.sum == pytest.approx(2.0)
    assert times.busy(104.0) == pytest.approx(3.0)


def test_run_returns_figures_per_stage_that_match_its_counts():
    def numbers():
        yield from range(500)

    def slow(x):
        time.sleep(0.001)
        return x

    outcome = zpipe.run([zpipe.Task(numbers), zpipe.Task(slow), zpipe.Task(lambda x: None)])
    summary = outcome.summary
    assert outcome.status == "ok" and summary["state"] == "ok"
    by_name = {s["name"]: s for s in summary["stages"]}
    assert [s["received"] for s in summary["stages"]] == [0, 500, 500]
    middle = summary["stages"][1]
    assert middle["item_seconds"]["count"] == 500
    assert middle["busy"] >= 0.4  # 500 calls of at least 1 ms
    assert middle["p50"] >= 0.001
    assert summary["bottleneck"]["stage"] == middle["name"], by_name
    assert summary["stages"][2]["end_to_end"]["count"] >= 1  # stamps reached the sink


def test_run_reports_batch_sizes_and_drops_per_stage():
    def numbers():
        for i in range(400):
            time.sleep(0.0002)
            yield i

    def batched(items):
        time.sleep(0.002)
        return items

    def newest(x):
        time.sleep(0.005)
        return x

    outcome = zpipe.run([zpipe.Task(numbers),
                         zpipe.Task(batched, batch={"max_items": 16, "max_wait_ms": 2}),
                         zpipe.Task(newest, input="latest"), zpipe.Task(lambda x: None)])
    assert outcome.status == "ok"
    _, batcher, latest, sink = outcome.summary["stages"]
    assert batcher["batch_items"] == 400 and 1 <= batcher["batches"] <= 400
    assert batcher["batch_size_mean"] == batcher["batch_items"] / batcher["batches"]
    assert [r["batches"] for r in batcher["replica_figures"]] == [batcher["batches"]]
    assert latest["dropped"] > 0 and latest["dropped"] + latest["sent"] == 400
    assert sink["received"] == latest["sent"] and sink["dropped"] == 0
    assert latest["batches"] == 0 and latest["batch_size_mean"] is None
