"""What `zpipe launch` and `zpipe supervise` show of a run, and where they serve it.

One ``Views`` per run, between the supervisor and the user: it carries the
supervisor's reports and the stages' output lines to stderr/stdout (plain,
above a live view, or as JSON objects), shows the live view on a terminal
or status lines elsewhere (liveview.py), serves /metrics (metrics.py) and
/livez, /readyz (health.py), and at the end prints the summary (summary.py)
and writes it as JSON. The figures all come from the supervisor's Observer
(observe.py); nothing here measures anything.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

STATUS_TICK = 0.25  # seconds between looks at whether a status line is due


@dataclass
class ViewOptions:
    """The command line's choices (cli.py): see `zpipe launch --help`."""

    live: bool | None = None         # None: on a terminal
    quiet: bool = False              # errors and the summary only
    status_interval: float = 10.0    # a status line per stage this often, off a terminal
    summary_json: str | None = None  # also write the summary to this file
    metrics_port: int | None = None
    metrics_address: str = "127.0.0.1"
    health_port: int | None = None
    health_address: str = "0.0.0.0"
    log_format: str = "text"         # "text" or "json"


class Views:
    """The views of one run (see the module docstring); ``start`` once the
    supervisor exists, ``close`` with its outcome."""

    def __init__(self, options: ViewOptions, pipeline: str,
                 err: IO[str] | None = None, out: IO[str] | None = None):
        self.options = options
        self.pipeline = pipeline
        self.err = err or sys.stderr
        self.out = out or sys.stdout
        self.lock = threading.Lock()  # lines come from the pump's thread and the supervisor's
        self.snapshot: Callable[[], dict[str, Any] | None] = lambda: None
        self.live: Any = None
        self.status: Any = None
        self.exporter: Any = None
        self.health: Any = None
        self.stopping = threading.Event()
        self.ticker: threading.Thread | None = None
        self.json = options.log_format == "json"

    # -- lines -------------------------------------------------------------------

    def report(self, text: str) -> None:
        """A line of zpipe's own (the supervisor's report)."""
        self._line("warning", None, f"zpipe: {text}", text, self.err)

    def progress(self, text: str) -> None:
        """A line that only says how it goes: left out under --quiet."""
        if not self.options.quiet:
            self._line("info", None, f"zpipe: {text}", text, self.err)

    def stage_line(self, replica: str, stream: str, line: bytes, width: int) -> None:
        """A line a replica printed (OutputPump): prefixed with the replica's name."""
        text = line.decode("utf-8", "replace")
        target = self.err if stream == "stderr" else self.out
        self._line("warning" if stream == "stderr" else "info", replica,
                   f"{replica:<{width}} | {text}", text, target)

    def _line(self, level: str, replica: str | None, plain: str, message: str,
              target: IO[str], **extra: Any) -> None:
        if self.json:
            stage = replica.rsplit("-", 1)[0] if replica else None
            plain = json.dumps({"time": time.time(), "level": level, "pipeline": self.pipeline,
                                "stage": stage, "replica": replica, "message": message,
                                **extra})
        with self.lock:
            if self.live is not None:
                self.live.print_line(plain)
                return
            try:
                target.write(plain + "\n")
                target.flush()
            except (BrokenPipeError, ValueError):
                pass

    # -- while it runs -----------------------------------------------------------

    def start(self, snapshot: Callable[[], dict[str, Any] | None]) -> None:
        """Begin showing and serving ``snapshot()``; raises OSError for a port in use."""
        options = self.options
        self.snapshot = snapshot
        if options.metrics_port is not None:
            from .metrics import Exporter
            self.exporter = Exporter(snapshot, self.pipeline)
            port = self.exporter.start(options.metrics_port, options.metrics_address)
            self.progress(f"metrics at http://{options.metrics_address}:{port}/metrics")
        if options.health_port is not None:
            from .health import Health
            self.health = Health()
            self.health.ready(False, "starting")
            self.health.start(options.health_port, options.health_address)
        live = options.live if options.live is not None else _is_terminal(self.err)
        if options.quiet or self.json:
            live = False
        if live:
            from rich.console import Console

            from .liveview import LiveView
            self.live = LiveView(snapshot, Console(file=self.err))
            self.live.start()
        elif not options.quiet and not self.json and options.status_interval > 0:
            from .liveview import StatusLines
            self.status = StatusLines(snapshot, lambda line: self._line(
                "info", None, line, line, self.err), options.status_interval)
        if self.status is not None or self.health is not None:
            self.ticker = threading.Thread(target=self._tick, name="zpipe-views", daemon=True)
            self.ticker.start()

    def _tick(self) -> None:
        while not self.stopping.wait(STATUS_TICK):
            if self.status is not None:
                self.status.tick(time.monotonic())
            if self.health is not None:
                snap = self.snapshot()
                self.health.beat()
                state = snap["state"] if snap else "starting"
                self.health.ready(state == "running", state)

    # -- at the end --------------------------------------------------------------

    def close(self, summary: dict[str, Any] | None) -> None:
        """Stop the live view and the servers; print the summary, write its JSON.
        Once: a second call (on the way out of a failure) does nothing."""
        if self.stopping.is_set():
            return
        self.stopping.set()
        if self.ticker is not None:
            self.ticker.join(2.0)
        with self.lock:
            if self.live is not None:
                self.live.stop()
                self.live = None
        for server in (self.exporter, self.health):
            if server is not None:
                server.close()
        if summary is None:
            return
        from . import summary as summaries
        if self.json:
            # The summary's figures as an object of their own, beside the message.
            self._line("info", None, "", "summary", self.err,
                       summary=summaries.to_json(summary))
        else:
            with self.lock:
                self.err.write(summaries.render(summary, width=_width(self.err)))
                self.err.flush()
        if self.options.summary_json:
            Path(self.options.summary_json).write_text(
                json.dumps(summaries.to_json(summary), indent=2) + "\n")


def _is_terminal(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _width(stream: IO[str]) -> int:
    import shutil
    return max(80, min(160, shutil.get_terminal_size((100, 24)).columns)) \
        if _is_terminal(stream) else 100

