"""Unit tests of zpipe.watch.liveview: the live table on a terminal, status lines elsewhere."""

from __future__ import annotations

import io
import re
import threading
from typing import Any

from rich.console import Console

from zpipe.watch.liveview import LiveView, StatusLines

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def stage(name: str, replicas: int, received: int, sent: int, busy_pct: float,
          blocked_pct: float, **extra: Any) -> dict[str, Any]:
    s = {"name": name, "replicas": replicas, "up": replicas, "state": "running",
         "received": received, "sent": sent, "rate_in": 350.0, "rate_out": 350.0, "queue": 0,
         "busy": 1.0, "blocked": 0.0, "idle": 0.0, "busy_pct": busy_pct,
         "blocked_pct": blocked_pct, "idle_pct": 100.0 - busy_pct - blocked_pct,
         "errors": 0, "errors_by_type": {}, "restarts": 0, "redelivered": 0, "dropped": 0,
         "rss": 0, "cpu": 0.0, "item_seconds": None, "p50": None, "p99": None,
         "end_to_end": None, "replica_figures": []}
    s.update(extra)
    return s


class GrowingRun:
    """A snapshot callable whose counts grow by ``step`` on every call, like a real run."""

    def __init__(self, step: int = 1000, total: int | None = None) -> None:
        self.n, self.step, self.total = 0, step, total

    def __call__(self) -> dict[str, Any]:
        self.n += self.step
        n = self.n
        return {"pipeline": "cameras", "state": "running", "elapsed": n / 350.0,
                "time": 1.7e9, "total": self.total, "bottleneck": None, "stages": [
                    stage("camera", 1, 0, n, 10.0, 71.0, rate_out=500.0),
                    stage("detector", 2, n - 8, n - 12, 96.0, 0.0, queue=8, errors=1),
                    stage("writer", 1, n - 12, 0, 5.0, 0.0, restarts=2)]}


def terminal() -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, force_terminal=True, width=120), out


def frame_text(view: LiveView, console: Console, out: io.StringIO) -> str:
    out.seek(0)
    out.truncate()
    console.print(view.renderable())
    return ANSI.sub("", out.getvalue())


def test_frames_follow_the_growing_counts() -> None:
    console, out = terminal()
    view = LiveView(GrowingRun(), console=console)
    first = frame_text(view, console, out)
    second = frame_text(view, console, out)
    assert "pipeline cameras — running" in first
    for name in ("camera", "detector", "writer"):
        assert name in first
    assert re.search(r"camera\s+1/1\s+0\s+1,000\s+500/s", first)  # a source: its rate_out
    assert re.search(r"detector\s+2/2\s+992\s+988\s+350/s\s+8\s+96 %\s+0 %\s+4 %\s+1\s+0", first)
    assert re.search(r"detector\s+2/2\s+1,992\s+1,988\s", second)
    assert re.search(r"writer\s+1/1\s+1,988\s+0\s.*\s2\s*$", second, re.MULTILINE)
    assert "ETA" not in first  # no total, no progress bar


def test_starting_before_the_first_snapshot() -> None:
    console, out = terminal()
    assert "starting…" in frame_text(LiveView(lambda: None, console=console), console, out)


def test_a_failing_snapshot_is_shown_not_raised() -> None:
    def broken() -> dict[str, Any]:
        raise KeyError("stages")
    console, out = terminal()
    assert "KeyError" in frame_text(LiveView(broken, console=console), console, out)


def test_progress_bar_and_eta_with_a_total() -> None:
    console, out = terminal()
    text = frame_text(LiveView(GrowingRun(step=2500, total=10_000), console=console), console, out)
    # 7,500 left at the source's 500/s: 15 s.
    assert "2,500/10,000" in text and "25 %" in text and "ETA 0:00:15" in text
    assert "━" in text

    def stalled() -> dict[str, Any]:
        snap = GrowingRun(total=10_000)()
        snap["stages"][0]["rate_out"] = 0.0
        return snap
    assert "ETA —" in frame_text(LiveView(stalled, console=console), console, out)


def test_live_refresh_print_line_and_stop() -> None:
    console, out = terminal()
    run = GrowingRun()
    with LiveView(run, console=console, refresh_per_second=1) as view:
        view.refresh()
        view.print_line("detector[0]: loaded model [v2]")  # brackets are not markup
        other = threading.Thread(target=view.print_line, args=("writer[0]: from a thread",))
        other.start()
        other.join()
        view.refresh()
        calls = run.n
    view.stop()  # again: idempotent
    text = ANSI.sub("", out.getvalue())
    assert "detector[0]: loaded model [v2]" in text
    assert "writer[0]: from a thread" in text
    assert "detector" in text and f"{calls - 8:,}" in text
    # The stage line went above the table: the table was redrawn after it.
    assert text.rindex("loaded model") < text.rindex("restarts")


def test_status_lines_only_when_due() -> None:
    lines: list[str] = []
    status = StatusLines(GrowingRun(step=1234 + 8 + 4), lines.append, interval=10.0)
    status.tick(100.0)   # the first call starts the clock: nothing yet
    status.tick(105.0)
    assert lines == []
    status.tick(110.0)
    assert len(lines) == 3
    assert lines[1] == ("zpipe: status detector: 2/2 up, 1,238 in, 1,234 out, 350/s, queue 8, "
                        "busy 96 % blocked 0 % idle 4 %, 1 error, 0 restarts")
    assert lines[0].startswith("zpipe: status camera: 1/1 up, 0 in, 1,246 out, 500/s,")
    assert lines[2].endswith(", 0 errors, 2 restarts")
    status.tick(119.0)
    assert len(lines) == 3
    assert status.due(120.0)
    status.emit(120.0)
    assert len(lines) == 6
    assert not status.due(125.0)


def test_status_line_before_the_first_snapshot() -> None:
    lines: list[str] = []
    StatusLines(lambda: None, lines.append).emit()
    assert lines == ["zpipe: status: starting…"]


def test_a_narrow_terminal_loses_columns_not_stage_names() -> None:
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=72)
    console.print(LiveView(GrowingRun(), console=console).renderable())
    text = ANSI.sub("", out.getvalue())
    assert all(len(line) <= 72 for line in text.splitlines())
    assert " detector " in text and "…" not in text and "idle" not in text
