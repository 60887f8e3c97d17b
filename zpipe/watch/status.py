"""`zpipe status` and `zpipe top`: ask a running pipeline's supervisor what it is doing.

A pipeline launched on this host is found by name in its runtime folder
(``$TMPDIR/zpipe-NAME-XXXXXXXX``, where the launcher writes its control
address); any other by its control address. The question is a STATUS
message on the control socket, the answer its latest snapshot (observe.py),
shown as the live view's table (liveview.py).
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import zmq

from ..wire import protocol
from ..wire.security import Curve

ADDRESS_FILE = "address"  # in the runtime folder: the control address (launcher.py)
ANSWER_TIMEOUT = 3.0
TOP_EVERY = 0.5


class StatusError(Exception):
    """No pipeline by that name, or no answer from it: the message says which."""


def find(name: str, folder: str | None = None) -> list[str]:
    """The control addresses of the pipelines named ``name`` running on this host."""
    base = Path(folder or tempfile.gettempdir())
    # mkdtemp's suffix is 8 characters: "zpipe-a-b-..." is not pipeline "a"'s.
    pattern = re.compile(re.escape(f"zpipe-{name}-") + r"[a-z0-9_]{8}")
    found = []
    try:
        entries = sorted(base.iterdir())
    except OSError:
        return []
    for entry in entries:
        if pattern.fullmatch(entry.name):
            try:
                found.append((entry / ADDRESS_FILE).read_text().strip())
            except OSError:
                continue  # starting or ending: no address (yet, or any more)
    return found


def query(address: str, keys: str | None = None, timeout: float = ANSWER_TIMEOUT,
          ctx: zmq.Context | None = None) -> dict[str, Any] | None:
    """The snapshot of the supervisor at ``address`` (None before its first one);
    StatusError when it does not answer within ``timeout``."""
    ctx = ctx or zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        if keys:
            Curve(keys).client(sock)
        sock.setsockopt(zmq.IDENTITY, f"zpipe-status-{os.getpid()}-{time.monotonic_ns()}"
                        .encode())
        sock.connect(address)
        deadline = time.monotonic() + timeout
        while True:
            # A DEALER blocks a send until a connection is up, which one the
            # supervisor refuses (keys) never is: never wait on it.
            with contextlib.suppress(zmq.Again):
                sock.send(protocol.pack(protocol.STATUS), zmq.NOBLOCK)
            # Asked again now and then: answers are rate-limited, and the first
            # question may go before the connection is up.
            wait = min(0.5, deadline - time.monotonic())
            if wait <= 0:
                raise StatusError(f"no answer from the supervisor at {address} within "
                                  f"{timeout:g} s (is the pipeline running? one with keys "
                                  f"answers only with --keys)")
            if sock.poll(int(wait * 1000) + 1):
                try:
                    kind, fields = protocol.unpack(sock.recv())
                except ValueError as exc:
                    raise StatusError(f"{address}: {exc}") from None
                if kind == protocol.SNAPSHOT:
                    return fields.get("snapshot")
    finally:
        sock.close(0)


def show(snapshot: dict[str, Any] | None, width: int = 100) -> str:
    """The live view's table for ``snapshot``, as plain text."""
    from rich.console import Console

    from .liveview import frame
    out = io.StringIO()
    Console(file=out, width=width, force_terminal=False, color_system=None).print(
        frame(snapshot, width))
    return out.getvalue()


def addresses(name: str | None, control: str | None) -> list[str]:
    """Where to ask: ``control``, or the pipelines called ``name`` on this host."""
    if control:
        return [control]
    if not name:
        raise StatusError("say which pipeline: NAME (launched on this host) or "
                          "--control tcp://HOST:PORT")
    found = find(name)
    if not found:
        raise StatusError(f"no pipeline named {name!r} is running on this host (looked in "
                          f"{tempfile.gettempdir()} for zpipe-{name}-*)")
    return found


def top(address: str, keys: str | None, console: Any,
        stop: Callable[[], bool] = lambda: False,
        say: Callable[[str], None] = lambda line: None) -> None:
    """Show ``address``'s snapshot live until it ends, stops answering, or ``stop()``;
    ``say`` hears once that the supervisor has answered."""
    from rich.live import Live

    from .liveview import frame
    snapshot = query(address, keys)
    say(f"following the supervisor at {address} (Ctrl-C to leave)")
    with Live(frame(snapshot, console.width), console=console, transient=False,
              auto_refresh=False) as live:
        while not stop():
            time.sleep(TOP_EVERY)  # the pace of the view, not a wait for an outcome
            try:
                snapshot = query(address, keys)
            except StatusError:
                break  # the pipeline has ended (the last frame stays)
            live.update(frame(snapshot, console.width), refresh=True)
            if snapshot and snapshot.get("state") in ("ok", "failed", "interrupted"):
                break
