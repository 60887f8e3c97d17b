"""The zpipe stages of the benchmark pipelines.

This file is copied next to each generated pipeline.toml (as bench_stages.py),
so `zpipe launch` imports it like any user's stage module. Sinks print one
line `BENCH {json}` that the bench parses from the launcher's output.
numpy is imported only by the stage that needs it, so that it weighs on
neither the start-up time nor the idle RSS of the other stages.
"""

import json
import time
from typing import Iterable

import zpipe


def report(**fields):
    print("BENCH " + json.dumps(fields), flush=True)


def small_item(i):
    """About 100 bytes once msgpacked (the same item as the raw reference)."""
    return {"id": i, "payload": "x" * 60, "v": 1.5}


# -- sources ------------------------------------------------------------------

def small_source(count):
    for i in range(count):
        yield small_item(i)


def announced_source(count):
    """small_source that first reports when it starts (end-to-end timing)."""
    report(event="start", t=time.time())
    yield from small_source(count)


def array_source(count, nbytes):
    import numpy as np

    array = np.ones(nbytes // 4, dtype=np.float32)
    for _ in range(count):
        yield array


def latency_source(count, pause):
    for i in range(count):
        yield {"id": i, "t": time.monotonic_ns(), "payload": "x" * 60}
        time.sleep(pause)


def paced_source(count, seconds):
    """small_source spread over at least ``seconds`` (a soak lasts that long however
    fast the pipeline is); reports when it starts."""
    report(event="start", t=time.time())
    start = time.monotonic()
    for i in range(count):
        if i % 1000 == 0:
            ahead = start + seconds * i / count - time.monotonic()
            if ahead > 0:
                time.sleep(ahead)
        yield small_item(i)


def idle_source(wait, count):
    report(event="idle", t=time.time())
    time.sleep(wait)
    for i in range(count):
        yield small_item(i)


def bytes_source(count, nbytes):
    report(event="flow", t=time.time())
    for _ in range(count):
        yield bytes(nbytes)


# -- middle stages ------------------------------------------------------------

def relay(item):
    return item


def busy(item, spins):
    """A pure-Python busy loop (spins is calibrated to ~2 ms by the bench)."""
    x = 0
    for k in range(spins):
        x += k
    return item


class Busy(zpipe.Stage):
    """busy() per item; each replica reports when it finished its last item."""

    def __init__(self, spins):
        self.spins = spins
        self.count = 0
        self.last = None

    def process(self, item):
        busy(item, self.spins)
        self.count += 1
        self.last = time.time()
        return item

    def teardown(self):
        report(event="replica_done", t=self.last, count=self.count)


# -- sinks --------------------------------------------------------------------

def rate_sink(items: Iterable):
    """Items/s and bytes/s from the first to the last item; wall times of both."""
    clock = time.perf_counter
    count = nbytes = 0
    first = last = first_wall = None
    writable = None
    for item in items:
        last = clock()
        if count == 0:
            first, first_wall = last, time.time()
        count += 1
        if hasattr(item, "nbytes"):  # a numpy array
            nbytes += item.nbytes
            if writable is None:
                writable = bool(item.flags.writeable)
    seconds = (last - first) if count else 0.0
    report(count=count, nbytes=nbytes, seconds=seconds,
           rate=(count - 1) / seconds if seconds > 0 else None,
           first_wall=first_wall,
           last_wall=first_wall + seconds if count else None,
           writable=writable)


def id_sink(items: Iterable, count):
    """How often each id in range(count) arrived: every id at least once, and the
    duplicates (arrivals beyond the first); items/s from the first to the last item.
    It reports even when the run is stopped under it (``ended`` false then)."""
    clock = time.perf_counter
    copies = bytearray(count)  # per id, saturating at 255
    received = unexpected = 0
    first = last = None
    ended = False
    try:
        for item in items:
            last = clock()
            if first is None:
                first = last
            received += 1
            i = item["id"]
            if type(i) is int and 0 <= i < count:
                if copies[i] < 255:
                    copies[i] += 1
            else:
                unexpected += 1
        ended = True
    finally:
        _report_ids(copies, count, received, unexpected, first, last, ended)


def _report_ids(copies, count, received, unexpected, first, last, ended):
    missing = copies.count(0)
    first_missing, at = [], copies.find(0)
    while at >= 0 and len(first_missing) < 10:
        first_missing.append(at)
        at = copies.find(0, at + 1)
    distinct = count - missing
    seconds = (last - first) if received else 0.0
    report(count=received, distinct=distinct, duplicates=received - unexpected - distinct,
           missing=missing, first_missing=first_missing, unexpected=unexpected,
           max_copies=max(copies) if count else 0,
           twice_or_more=count - missing - copies.count(1), seconds=seconds,
           rate=(received - 1) / seconds if seconds > 0 else None, ended=ended)


def latency_sink(items: Iterable, warmup):
    latencies = [time.monotonic_ns() - item["t"] for item in items]
    report(count=len(latencies), latencies_ns=latencies[warmup:])


def slow_sink(items: Iterable, delay):
    count = 0
    for _ in items:
        time.sleep(delay)
        count += 1
    report(count=count)
