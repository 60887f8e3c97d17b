"""What a running pipeline shows while it runs: a live table on a terminal,
periodic status lines on a stderr that is not one.

``LiveView`` redraws a per-stage table from ``snapshot()`` (observe.py's dict)
a few times a second, with a progress bar and ETA when the source's total is
known, and prints stages' output lines above it.  ``StatusLines`` writes one
plain line per stage every ``interval`` seconds; it has no thread of its own,
its owner calls ``tick(now)`` from its loop.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any, Self

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from .summary import build_table, human_duration, human_rate, optional_columns, title

Snapshot = Callable[[], "dict[str, Any] | None"]


def _rate(i: int, stage: dict[str, Any]) -> float:
    # A source receives nothing: its pace is what it sends.
    return float(stage.get("rate_out" if i == 0 else "rate_in") or 0.0)


def _progress(snap: dict[str, Any]) -> RenderableType | None:
    total, stages = snap.get("total"), snap.get("stages") or []
    if type(total) is not int or not stages:
        return None
    sent = int(stages[0].get("sent") or 0)
    rate = _rate(0, stages[0])
    remaining = max(0, total - sent)
    eta = human_duration(remaining / rate) if rate > 0 else "—"
    grid = Table.grid(padding=(0, 1))
    grid.add_row(ProgressBar(total=max(total, 1), completed=min(sent, total), width=40),
                 f"{sent:,}/{total:,}", f"{100.0 * sent / total if total else 100.0:.0f} %",
                 f"ETA {eta}")
    return grid


def frame(snap: dict[str, Any] | None, width: int | None = None) -> RenderableType:
    """One frame of the live view for a snapshot (``starting…`` before the first);
    with a ``width``, the least needed columns are left out until it fits."""
    if snap is None:
        return Text("starting…")
    stages = snap.get("stages") or []

    def pct(key: str) -> list[str]:
        return [f"{float(s.get(key) or 0):.0f} %" for s in stages]

    columns = [
        ("stage", [str(s.get("name", "?")) for s in stages]),
        ("replicas", [f"{s.get('up', 0)}/{s.get('replicas', 0)}" for s in stages]),
        ("in", [f"{int(s.get('received') or 0):,}" for s in stages]),
        ("out", [f"{int(s.get('sent') or 0):,}" for s in stages]),
        ("rate", [human_rate(_rate(i, s)) for i, s in enumerate(stages)]),
        ("queue", [f"{int(s.get('queue') or 0):,}" for s in stages]),
        ("busy", pct("busy_pct")), ("blocked", pct("blocked_pct")), ("idle", pct("idle_pct")),
        ("errors", [f"{int(s.get('errors') or 0):,}" for s in stages]),
        ("restarts", [f"{int(s.get('restarts') or 0):,}" for s in stages])]
    columns += optional_columns(stages)  # dropped, batch: when a stage has them
    table = build_table(title(snap), columns, width, ("idle", "replicas", "restarts", "blocked"))
    progress = _progress(snap)
    return Group(table, progress) if progress is not None else table


class LiveView:
    """The live table on a terminal; ``print_line`` puts output above it."""

    def __init__(self, snapshot: Snapshot, console: Console | None = None,
                 refresh_per_second: float = 4) -> None:
        self._snapshot = snapshot
        self.console = console or Console(stderr=True)
        self._refresh_per_second = refresh_per_second
        # Made at start: rich's Live calls get_renderable already when built.
        self._live: Live | None = None
        self._lock = threading.Lock()

    def renderable(self) -> RenderableType:
        """The current frame, rebuilt from ``snapshot()``."""
        try:
            return frame(self._snapshot(), self.console.width)
        except Exception as exc:  # noqa: BLE001 - a bad snapshot must not kill the refresh thread
            return Text(f"zpipe: live view: {type(exc).__name__}: {exc}")

    def start(self) -> None:
        with self._lock:
            if self._live is None:
                # transient: the frame is cleared at stop, the summary takes its place.
                # stdout is left alone: it may carry the pipeline's data, not ours to take.
                self._live = Live(get_renderable=self.renderable, console=self.console,
                                  refresh_per_second=self._refresh_per_second, transient=True,
                                  redirect_stdout=False)
                self._live.start()

    def stop(self) -> None:
        with self._lock:
            live, self._live = self._live, None
        if live is not None:
            live.stop()

    def refresh(self) -> None:
        """Redraw now (the refresh thread also does it ``refresh_per_second``)."""
        live = self._live
        if live is not None:
            live.refresh()

    def print_line(self, line: str) -> None:
        """A stage's output line, above the table; safe from any thread (the
        console and Live lock around their writes)."""
        self.console.print(line, markup=False, highlight=False, emoji=False, soft_wrap=True)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def status_line(i: int, s: dict[str, Any]) -> str:
    """One stage's figures as a plain line."""
    errors, restarts = int(s.get("errors") or 0), int(s.get("restarts") or 0)
    dropped = int(s.get("dropped") or 0)
    return (f"zpipe: status {s.get('name', '?')}: {s.get('up', 0)}/{s.get('replicas', 0)} up, "
            f"{int(s.get('received') or 0):,} in, {int(s.get('sent') or 0):,} out, "
            f"{human_rate(_rate(i, s))}, queue {int(s.get('queue') or 0):,}, "
            f"busy {float(s.get('busy_pct') or 0):.0f} % "
            f"blocked {float(s.get('blocked_pct') or 0):.0f} % "
            f"idle {float(s.get('idle_pct') or 0):.0f} %, "
            f"{errors:,} error{'' if errors == 1 else 's'}, "
            f"{restarts:,} restart{'' if restarts == 1 else 's'}"
            + (f", {dropped:,} dropped" if dropped else ""))


class StatusLines:
    """Status lines every ``interval`` s for a stderr that is not a terminal
    (a log file, CI): a redrawn table would be noise there."""

    def __init__(self, snapshot: Snapshot, write: Callable[[str], None],
                 interval: float = 10.0) -> None:
        self._snapshot = snapshot
        self._write = write
        self.interval = interval
        self._next: float | None = None  # set by the first due(): lines start one interval in

    def due(self, now: float) -> bool:
        if self._next is None:
            self._next = now + self.interval
        return now >= self._next

    def emit(self, now: float | None = None) -> None:
        """Write one line per stage; the next is due ``interval`` after ``now``
        (time.monotonic() when not given, the clock ``due`` should be fed)."""
        self._next = (time.monotonic() if now is None else now) + self.interval
        snap = self._snapshot()
        if snap is None:
            self._write("zpipe: status: starting…")
            return
        for i, stage in enumerate(snap.get("stages") or []):
            self._write(status_line(i, stage))

    def tick(self, now: float) -> None:
        """emit() when due."""
        if self.due(now):
            self.emit(now)
