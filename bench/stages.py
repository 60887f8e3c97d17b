"""The zpipe stages of the benchmark pipelines.

This file is copied next to each generated pipeline.toml (as bench_stages.py),
so `zpipe launch` imports it like any user's stage module. Sinks print one
line `BENCH {json}` that the bench parses from the launcher's output.
numpy is imported only by the stage that needs it, so that it weighs on
neither the start-up time nor the idle RSS of the other stages.
"""

import json
import os
import time
from typing import Iterable

import zpipe

try:  # beside a run's pipeline.toml, as scenarios.write_pipeline copies it
    from bench_work import busy_for, spin
except ImportError:  # imported from the bench package
    from bench.work import busy_for, spin

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


def same_bytes_source(count, nbytes):
    """One `bytes` object of ``nbytes`` (not zeros: its pages are real), sent
    ``count`` times: the raw reference sends the same way (bench/raw.py, frame)."""
    data = b"\xa5" * nbytes
    for _ in range(count):
        yield data


def same_array_source(count, nbytes):
    """One float32 array of ``nbytes``, sent ``count`` times (same_bytes_source's
    twin: the small-arrays scenario compares the two)."""
    import numpy as np

    array = np.ones(nbytes // 4, dtype=np.float32)
    for _ in range(count):
        yield array


def _wait_for(path, timeout, every):
    """Until the bench creates ``path`` (it has read every replica's CPU time)."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"the bench did not create {path} within {timeout} s")
        time.sleep(every)


def gated_source(count, go, release, timeout=60.0):
    """small_source between two waits: before its first item, until the bench
    creates the file ``go``; after its last, until it creates ``release`` (so
    that no replica has ended when the bench reads their CPU times)."""
    report(event="waiting", t=time.time())
    _wait_for(go, timeout, 0.002)
    for i in range(count):
        yield small_item(i)
    # Counted in its CPU time until the last item has arrived: a look every 10 ms
    # costs it about 1 ms of CPU a second.
    _wait_for(release, timeout, 0.01)


# -- middle stages ------------------------------------------------------------

def relay(item):
    return item


def busy(item, spins):
    """spin() (bench/work.py), then the item."""
    spin(spins)
    return item


class Busy(zpipe.Stage):
    """busy() (``spins``) or busy_for() (``seconds``) per item; each replica reports
    when it finished its last item."""

    def __init__(self, spins=0, seconds=0.0):
        self.spins = spins
        self.seconds = seconds
        self.count = 0
        self.last = None

    def process(self, item):
        if self.seconds:
            busy_for(self.seconds)
        else:
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


def counted_sink(items: Iterable, count):
    """rate_sink, which also says when the ``count``-th item has arrived (the bench
    then reads every replica's CPU time, before the source lets the run end)."""
    clock = time.perf_counter
    seen = nbytes = 0
    first = last = first_wall = None
    for item in items:
        last = clock()
        if seen == 0:
            first, first_wall = last, time.time()
        seen += 1
        if hasattr(item, "nbytes"):  # a numpy array
            nbytes += item.nbytes
        if seen == count:
            report(event="arrived", t=time.time())
    seconds = (last - first) if seen else 0.0
    report(count=seen, nbytes=nbytes, seconds=seconds,
           rate=(seen - 1) / seconds if seconds > 0 else None,
           first_wall=first_wall, last_wall=first_wall + seconds if seen else None)


def sized_sink(items: Iterable):
    """Items/s and bytes/s from the first to the last item, for `bytes` items and
    numpy arrays alike (len() of the one, nbytes of the other)."""
    clock = time.perf_counter
    count = nbytes = 0
    first = last = None
    for item in items:
        last = clock()
        if count == 0:
            first = last
        count += 1
        nbytes += len(item) if type(item) is bytes else item.nbytes
    seconds = (last - first) if count else 0.0
    report(count=count, nbytes=nbytes, seconds=seconds,
           rate=(count - 1) / seconds if seconds > 0 else None)


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


# -- issue 15: batches, latest frames, concurrency ----------------------------------

def stamped_source(count, period=0.0, announce=False):
    """``count`` small items, each stamped with the time.time() of its send (``t``);
    one every ``period`` s on a schedule (start + i * period: a late item does not
    push the next ones back), or as fast as the pipeline takes them (0). ``announce``:
    report when it starts (end-to-end rates)."""
    if announce:
        report(event="start", t=time.time())
    start = time.monotonic()
    for i in range(count):
        if period:
            ahead = start + i * period - time.monotonic()
            if ahead > 0:
                time.sleep(ahead)
        yield {"id": i, "t": time.time(), "payload": "x" * 60}


def costly_batch(items, per_call, per_item):
    """A batched call (batch = {...}): ``per_call`` + ``per_item`` x len(items) seconds;
    each output carries its call's start and end (time.time()) and its batch's size."""
    start = time.time()
    time.sleep(per_call + per_item * len(items))
    end = time.time()
    return [{**item, "call": [start, end], "n": len(items)} for item in items]


def costly_item(item, per_call, per_item):
    """costly_batch's cost model, one item per call: ``per_call`` + ``per_item`` s."""
    start = time.time()
    time.sleep(per_call + per_item)
    return {**item, "call": [start, time.time()], "n": 1}


def stamped_sink(items: Iterable):
    """Per item: now - its send stamp (``latencies``, seconds), and for an item that
    went through costly_batch or costly_item, its call's duration and its batch's size."""
    latencies, calls, before, sizes = [], [], [], []
    for item in items:
        now = time.time()
        latencies.append(now - item["t"])
        call = item.get("call")
        calls.append(call[1] - call[0] if call else None)
        before.append(call[0] - item["t"] if call else None)
        sizes.append(item.get("n"))
    report(count=len(latencies), latencies=latencies, calls=calls, before=before, sizes=sizes)


def _say(path, value):
    """Write ``value`` to ``path`` as JSON, replaced whole (a reader never sees half)."""
    with open(path + ".tmp", "w") as out:
        out.write(json.dumps(value))
    os.replace(path + ".tmp", path)


def _newest(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return -1


def frame_source(count, fps, path):
    """``count`` frames at ``fps`` a second (on a schedule), each a dict with its
    sequence number and its send time (time.time()). Before handing a frame on, the
    source writes its number to ``path``: the newest frame produced so far."""
    start = time.monotonic()
    for i in range(count):
        ahead = start + i / fps - time.monotonic()
        if ahead > 0:
            time.sleep(ahead)
        _say(path, i)
        yield {"seq": i, "t": time.time()}


def latest_look(frame, path, seconds):
    """An input = "latest" stage: as its call gets a frame, how far behind the newest
    produced frame it is (``newest`` from the source's file, and the frame's age by
    its send time); then ``seconds`` of work."""
    newest = _newest(path)
    age = time.time() - frame["t"]
    time.sleep(seconds)
    return {"seq": frame["seq"], "newest": newest, "age": age}


def look_sink(items: Iterable):
    """What latest_look saw at each call, in order."""
    seen = [[item["seq"], item["newest"], item["age"]] for item in items]
    report(count=len(seen), seen=seen)


def wait_thread(item, seconds):
    """A call that waits ``seconds`` (time.sleep: a thread, with concurrency = N)."""
    time.sleep(seconds)
    return item


async def wait_async(item, seconds):
    """A call that awaits ``seconds`` (asyncio.sleep: a task on the replica's loop)."""
    import asyncio  # here: no other stage process pays for the import

    await asyncio.sleep(seconds)
    return item
