"""What a running pipeline looks like: per-replica figures gathered into one snapshot.

Each replica measures itself cheaply (a few clock reads per message, not per
item) and sends its figures with every heartbeat (``Figures``, runtime.py).
The supervisor keeps the latest of each replica (``Observer``) and turns them
into a **snapshot**: a plain dict that every view reads — the live view and
the status lines (liveview.py), the summary and its bottleneck (summary.py),
`zpipe status` (status.py), Prometheus (metrics.py), and ``Outcome.summary``.

The snapshot (JSON-serialisable; seconds and bytes, never formatted)::

    {"pipeline": str, "state": "starting" | "running" | "draining" | "ok" |
     "failed" | "interrupted", "elapsed": float, "time": float (unix),
     "total": int | None,                # the source's items, when known
     "stages": [{
        "name": str, "replicas": int, "up": int, "state": str,
        "received": int, "sent": int,     # items (order markers left out)
        "rate_in": float, "rate_out": float,   # items/s over the last RATE_WINDOW s
        "queue": int,                     # items waiting at its input (link + buffer)
        "busy": float, "blocked": float, "idle": float,  # seconds, summed over replicas
        "busy_pct": float, "blocked_pct": float, "idle_pct": float,  # % of the run
                                          # since START, per replica (idle: the rest)
        "errors": int, "errors_by_type": {exc_type: int}, "restarts": int,
        "redelivered": int,
        "dropped": int,                   # inputs passed over for newer ones (input = "latest")
        "batches": int, "batch_items": int,  # lists handed to batched calls, and their items
        "batch_size_mean": float | None,  # batch_items / batches (None: no batches)
        "rss": int, "cpu": float,         # bytes, CPU seconds (summed over replicas)
        "item_seconds": HISTOGRAM,        # time in the stage per item
        "p50": float | None, "p99": float | None,
        "end_to_end": HISTOGRAM | None,   # at a sink: source's send -> sink's receive
        "replica_figures": [{"name", "replica", "up", "pid", "host", "received",
                             "sent", "busy", "blocked", "idle", "queue", "rss",
                             "cpu", "dropped", "batches", "batch_items"}],
     }],
     "bottleneck": {"stage": str, "text": str} | None}

HISTOGRAM is ``{"bounds": [...BUCKETS], "counts": [int per bucket, the last for
what is above every bound], "sum": float, "count": int}``.
"""

from __future__ import annotations

import bisect
import math
import time
from collections.abc import Iterable, Sequence
from typing import Any

from ..wire import protocol

# Upper bounds (seconds) of the time-per-item buckets: 1 us to 100 s, six a decade
# (a quantile is interpolated within one: about 20 % at worst).
BUCKETS: tuple[float, ...] = tuple(
    round(m * 10.0 ** e, 12) for e in range(-6, 2) for m in (1.0, 1.5, 2.0, 3.0, 5.0, 7.0)
    ) + (100.0,)
RATE_WINDOW = 5.0  # seconds the rates are taken over


class Histogram:
    """Counts of observations per bucket of BUCKETS, mergeable and cheap to add to."""

    __slots__ = ("count", "counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS) + 1)
        self.sum = 0.0
        self.count = 0

    def add(self, seconds: float, times: int = 1) -> None:
        """``times`` observations of ``seconds`` each (a message's items, timed together)."""
        self.counts[bisect.bisect_left(BUCKETS, seconds)] += times
        self.sum += seconds * times
        self.count += times

    def wire(self) -> list[Any]:
        """For a heartbeat: [counts, sum] (the bounds are known to both ends)."""
        return [self.counts, self.sum]

    @classmethod
    def from_wire(cls, value: Any) -> Histogram:
        """From a heartbeat; an empty one for anything malformed."""
        histogram = cls()
        if type(value) is list and len(value) == 2 and type(value[0]) is list and \
                len(value[0]) == len(histogram.counts) and \
                all(type(c) is int and c >= 0 for c in value[0]) and \
                type(value[1]) in (int, float) and math.isfinite(value[1]):
            histogram.counts = list(value[0])
            histogram.sum = float(value[1])
            histogram.count = sum(histogram.counts)
        return histogram

    def merge(self, other: Histogram) -> None:
        for i, c in enumerate(other.counts):
            self.counts[i] += c
        self.sum += other.sum
        self.count += other.count

    def as_dict(self) -> dict[str, Any]:
        return {"bounds": list(BUCKETS), "counts": list(self.counts), "sum": self.sum,
                "count": self.count}


def quantile(histogram: dict[str, Any] | None, q: float) -> float | None:
    """The ``q`` quantile (0..1) of a snapshot HISTOGRAM, interpolated within its
    bucket (as Prometheus' histogram_quantile does); None when it is empty."""
    if not histogram or not histogram.get("count"):
        return None
    counts: Sequence[int] = histogram["counts"]
    bounds: Sequence[float] = histogram["bounds"]
    rank = q * histogram["count"]
    seen = 0
    for i, c in enumerate(counts):
        if c and seen + c >= rank:
            low = bounds[i - 1] if i else 0.0
            if i >= len(bounds):  # above every bound: say the last bound
                return bounds[-1]
            return low + (bounds[i] - low) * max(0.0, rank - seen) / c
        seen += c
    return bounds[-1]


def merged(histograms: Iterable[Histogram]) -> Histogram:
    total = Histogram()
    for h in histograms:
        total.merge(h)
    return total


class Times:
    """A replica's own clocks, kept by its main thread and read by its heartbeat thread:
    seconds asleep waiting for input (idle) and waiting for room downstream
    (blocked), since ``started``; time per item; and, at a sink, end to end."""

    __slots__ = (
        "blocked",
        "end_to_end",
        "idle",
        "items",
        "marked_at",
        "marked_blocked",
        "marked_idle",
        "marked_items",
        "started",
    )

    def __init__(self) -> None:
        self.idle = 0.0
        self.blocked = 0.0
        self.started: float | None = None  # when it began to run (monotonic)
        self.items = Histogram()
        self.end_to_end: Histogram | None = None  # a sink's
        self.marked_at: float | None = None  # the last timing point: the items since then
        self.marked_items = 0
        self.marked_idle = self.marked_blocked = 0.0

    def mark(self, now: float, items: int) -> None:
        """A timing point (a message taken in, or sent by a source): the ``items`` of
        the last point were worked on since, less the waits in between; the next
        point times these ``items``. A few operations a message, none per item."""
        self.mark_then(now, items, self.idle, self.blocked)

    def mark_then(self, now: float, items: int, idle: float, blocked: float) -> None:
        """mark(), done later: ``idle`` and ``blocked`` are the totals as they were at
        ``now`` (an inbox takes them as a message arrives, and marks once its stage
        has the items: see Inbox._fill)."""
        if self.marked_at is not None and self.marked_items:
            spent = (now - self.marked_at - (idle - self.marked_idle)
                     - (blocked - self.marked_blocked))
            self.items.add(max(spent, 0.0) / self.marked_items, self.marked_items)
        self.marked_at, self.marked_items = now, items
        self.marked_idle, self.marked_blocked = idle, blocked

    def busy(self, now: float) -> float:
        """Seconds neither idle nor blocked since it started: in the stage's calls,
        with the decoding and encoding around them."""
        if self.started is None:
            return 0.0
        return max(0.0, now - self.started - self.idle - self.blocked)


# -- the supervisor's side -------------------------------------------------------

_FLOATS = ("busy", "blocked", "idle", "cpu")
_INTS = ("queue", "rss")
_COUNTS = ("dropped", "batches", "batch_items")  # running counts: each life's added up
SNAPSHOT_EVERY = 0.25  # seconds between snapshots (views refresh at most this often)
STATUS_PER_SECOND = 20  # answers to `zpipe status` and `zpipe top`, at most


class _Life:
    """One replica's figures: its current life's latest, and its earlier lives' sums."""

    __slots__ = (
        "before",
        "e2e_before",
        "end_to_end",
        "generation",
        "items",
        "items_before",
        "now",
    )

    def __init__(self) -> None:
        self.now: dict[str, float] = {}
        self.before: dict[str, float] = {}
        self.items = Histogram()
        self.end_to_end: Histogram | None = None
        self.items_before = Histogram()
        self.e2e_before: Histogram | None = None
        self.generation = 0

    def total(self, name: str) -> float:
        return self.now.get(name, 0) + self.before.get(name, 0)


class Observer:
    """The supervisor's view of every replica's figures, and the snapshots made of them.

    ``take`` is called with the figures of each heartbeat and last report (the
    supervisor's thread); ``refresh`` makes a new snapshot at most every
    SNAPSHOT_EVERY; ``latest`` is read by views in other threads (a dict made
    whole and then assigned, never changed after).
    """

    def __init__(self, supervisor: Any) -> None:
        self.supervisor = supervisor
        self.lives: dict[str, _Life] = {}
        self.errors: dict[str, dict[str, int]] = {}  # stage -> exception type -> count
        self.history: list[tuple[float, list[tuple[int, int]]]] = []  # (time, per stage)
        self.latest: dict[str, Any] | None = None
        self.made_at = 0.0
        # The source's items: its stage's `total`, else what its replicas' len() said.
        self.declared: int | None = supervisor.spec.stages[0].total
        self.total: int | None = self.declared
        self.totals: dict[str, int] = {}
        self.answered_at = 0.0  # the last answer to a STATUS
        self.run_started: float | None = None  # START: the shares of time count from here

    def take(self, replica: Any, figures: Any) -> None:
        """The ``figures`` a replica sent (anything malformed is left out)."""
        if type(figures) is not dict:
            return
        life = self.lives.setdefault(replica.name, _Life())
        if replica.generation != life.generation:  # a new life counts from zero
            for name, value in life.now.items():
                if name != "queue" and name != "rss":
                    life.before[name] = life.before.get(name, 0) + value
            life.items_before.merge(life.items)
            if life.end_to_end is not None:
                life.e2e_before = life.e2e_before or Histogram()
                life.e2e_before.merge(life.end_to_end)
            life.now, life.items, life.end_to_end = {}, Histogram(), None
            life.generation = replica.generation
        for name in _FLOATS:
            value = figures.get(name)
            if type(value) in (int, float) and math.isfinite(value) and value >= 0:
                life.now[name] = float(value)
        for name in _INTS + _COUNTS:
            value = figures.get(name)
            if type(value) is int and value >= 0:
                life.now[name] = value
        if "items" in figures:
            life.items = Histogram.from_wire(figures["items"])
        if figures.get("end_to_end") is not None:
            life.end_to_end = Histogram.from_wire(figures["end_to_end"])
        total = figures.get("total")
        if type(total) is int and total >= 0 and self.declared is None:
            self.totals[replica.name] = total
            self.total = sum(self.totals.values())

    def error(self, stage: str, exc_type: Any) -> None:
        by_type = self.errors.setdefault(stage, {})
        name = exc_type if isinstance(exc_type, str) and exc_type else "unknown"
        by_type[name] = by_type.get(name, 0) + 1

    def refresh(self, now: float, state: str | None = None, force: bool = False) -> None:
        """Make a new snapshot if the last is SNAPSHOT_EVERY old (or ``force``)."""
        if force or now - self.made_at >= SNAPSHOT_EVERY:
            self.made_at = now
            self.latest = self._snapshot(now, state)

    def _snapshot(self, now: float, state: str | None) -> dict[str, Any]:
        sup = self.supervisor
        counts = [(st.items_in, st.items_out) for st in sup.stages]
        self.history.append((now, counts))
        while len(self.history) > 2 and now - self.history[1][0] >= RATE_WINDOW:
            self.history.pop(0)
        then, old = self.history[0]
        span = now - then
        stages = []
        for index, st in enumerate(sup.stages):
            stages.append(self._stage(index, st, counts, old[index] if index < len(old)
                                      else (0, 0), span, now))
        from .summary import bottleneck
        snapshot = {"pipeline": sup.spec.name, "state": state or self._state(),
                    "elapsed": now - sup.started_at, "time": time.time(),
                    "total": self.total, "stages": stages, "bottleneck": None}
        snapshot["bottleneck"] = bottleneck(snapshot)
        return snapshot

    def _state(self) -> str:
        sup = self.supervisor
        if not sup.running:
            return "starting"
        if any(st.status != "running" for st in sup.stages):
            return "draining"
        return "running"

    def _stage(self, index: int, st: Any, counts: list[tuple[int, int]],
               old: tuple[int, int], span: float, now: float) -> dict[str, Any]:
        sup = self.supervisor
        received, sent = counts[index]
        replicas, items, e2e = [], Histogram(), None
        sums = dict.fromkeys(_FLOATS + _INTS + _COUNTS, 0.0)
        up = 0
        for r in st.replicas:
            life = self.lives.get(r.name) or _Life()
            is_up = bool(r.hello and not r.exited and not r.gone)
            up += is_up
            figures = {name: life.total(name) for name in _FLOATS}
            figures.update({name: int(life.now.get(name, 0)) for name in _INTS})
            figures.update({name: int(life.total(name)) for name in _COUNTS})
            for name, value in figures.items():
                sums[name] += value
            items.merge(life.items_before)
            items.merge(life.items)
            for h in (life.e2e_before, life.end_to_end):
                if h is not None:
                    e2e = e2e or Histogram()
                    e2e.merge(h)
            replicas.append({"name": r.name, "replica": r.replica, "up": is_up, "pid": r.pid,
                             "host": r.host,
                             "received": r.total("received") - r.total("markers_received"),
                             "sent": r.total("sent") - r.total("markers_sent"), **figures})
        # What waits at its input: what the stage before sent and it has not taken
        # (in ZeroMQ's queues, the sockets, on the wire), and what its replicas
        # have taken in and not yet handed to their calls.
        link = max(0, sup.stages[index - 1].items_out - received) if index else 0
        # Shares of the run (from START, per replica): a stage that finished
        # early, or waited to begin, was idle for the rest of it.
        ran = (now - self.run_started) * len(st.replicas) \
            if self.run_started is not None else 0.0
        pct = {f"{name}_pct": min(100.0, 100.0 * sums[name] / ran) if ran > 0 else 0.0
               for name in ("busy", "blocked")}
        pct["idle_pct"] = max(0.0, 100.0 - pct["busy_pct"] - pct["blocked_pct"]) if ran > 0 \
            else 0.0
        items_dict = items.as_dict()
        errors_by_type = dict(self.errors.get(st.name, {}))
        restarts = sup.recovery.restarts.get(st.name, 0)
        redelivered = sup.stages[index - 1].total("redelivered") if index else 0
        return {"name": st.name, "replicas": len(st.replicas), "up": up, "state": st.status,
                "received": received, "sent": sent,
                "rate_in": (received - old[0]) / span if span > 0 else 0.0,
                "rate_out": (sent - old[1]) / span if span > 0 else 0.0,
                "queue": link + int(sums["queue"]),
                "busy": sums["busy"], "blocked": sums["blocked"], "idle": sums["idle"], **pct,
                "errors": sum(errors_by_type.values()), "errors_by_type": errors_by_type,
                "restarts": restarts, "redelivered": redelivered,
                "dropped": int(sums["dropped"]), "batches": int(sums["batches"]),
                "batch_items": int(sums["batch_items"]),
                "batch_size_mean": sums["batch_items"] / sums["batches"] if sums["batches"]
                else None,
                "rss": int(sums["rss"]), "cpu": sums["cpu"],
                "item_seconds": items_dict, "p50": quantile(items_dict, 0.5),
                "p99": quantile(items_dict, 0.99),
                "end_to_end": e2e.as_dict() if e2e is not None else None,
                "replica_figures": replicas}

    # -- status requests (status.py) ---------------------------------------------

    def asked(self, identity: str, data: bytes) -> bool:
        """Answer a STATUS from a peer that is not a replica; False if it was not one.

        Answers are rate-limited (STATUS_PER_SECOND in all): the control socket
        never drops what it sends, so a peer that asks and never reads must not
        make the supervisor hold much.
        """
        try:
            kind, _ = protocol.unpack(data)
        except ValueError:
            return False
        if kind != protocol.STATUS:
            return False
        now = time.monotonic()
        if now - self.answered_at < 1.0 / STATUS_PER_SECOND:
            return True  # too often: asked again, it is answered then
        self.answered_at = now
        self.supervisor.router.send_multipart(
            [identity.encode(), protocol.pack(protocol.SNAPSHOT, snapshot=self.latest)])
        return True
