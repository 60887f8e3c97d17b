"""Stuck calls: a stage's call on one item that runs past its ``item_timeout``.

The body (itempolicy.py) marks each call's start and end in a CallWatch: two
attribute stores on the way in, one on the way out, and nothing at all for a
stage without ``item_timeout``. The replica's heartbeat thread, which wakes
once a second anyway and has its own socket to the supervisor, looks at the
watch before every heartbeat (``check``); a call past its time is reported
to the supervisor as STUCK with the Python stack of the stuck call (the
user's frames, as failures.format_user_traceback shows them for errors).
What then happens depends on the stage's ``on_error``:

- ``fail``: nothing more here; the supervisor fails the run with the report.
- ``skip`` / ``dead-letter``: the call is interrupted: StuckCall is raised in
  the body's thread (PyThreadState_SetAsyncExc), where it lands at the next
  Python instruction; the body then skips or dead-letters the item like any
  other failed item. A call inside C code does not come back to Python; if it
  has not within INTERRUPT_GRACE, its item is dead-lettered from here (for
  ``dead-letter``), the supervisor is told, and the process ends (exit status
  1): the supervisor's restart policy takes it from there. A replica that is a
  thread (``mode="thread"``) cannot be ended: that is only reported.

A call that holds the GIL stops the heartbeat thread too, so nothing here
can watch it; every heartbeat therefore carries ``call_started_ago`` (see
``ago``), and the supervisor knows from the silence that follows.
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import zmq

from ..wire import protocol
from .failures import safe_text

INTERRUPT_GRACE = 3.0  # seconds an interrupted call has to come back before the process ends
PING_WAIT_MS = 2000    # before ending the process: the supervisor has the report
EXIT_STUCK = 1

_OWN_FILES = str(Path(__file__).resolve().parent)
_monotonic = time.monotonic


class StuckCall(BaseException):
    """Raised inside a stuck call to interrupt it (private to zpipe).

    A BaseException, like KeyboardInterrupt: the user's ``except Exception``
    must not swallow it and carry on with the stuck item.
    """


def _set_async_exc(thread: int, exc: type[BaseException] | None) -> int:
    """Raise ``exc`` in ``thread`` at its next Python instruction; None clears a pending one."""
    return ctypes.pythonapi.PyThreadState_SetAsyncExc(
        ctypes.c_ulong(thread), ctypes.py_object(exc) if exc is not None else None)


def user_stack(thread: int) -> str:
    """The stack of ``thread`` from where zpipe called the user's code: the user's frames."""
    frame = sys._current_frames().get(thread)
    if frame is None:
        return "(the thread has no Python frame)\n"
    try:
        frames = []
        while frame is not None:
            frames.append(frame)
            frame = frame.f_back
        frames.reverse()
        own = [i for i, f in enumerate(frames) if _own_file(f.f_code.co_filename)]
        if own and own[-1] + 1 < len(frames):
            frames = frames[own[-1] + 1:]
        summary = traceback.StackSummary.extract((f, f.f_lineno) for f in frames)
        return safe_text("Stack of the stuck call (most recent call last):\n"
                         + "".join(summary.format()))
    except Exception:  # noqa: BLE001 - the report still goes, without its stack
        return "(the stack could not be formatted)\n"
    finally:
        del frame, frames


@functools.lru_cache(maxsize=1024)
def _own_file(filename: str) -> bool:
    # Cached: the stack is taken while the call may still end, and is best taken fast.
    return str(Path(filename).resolve()).startswith(_OWN_FILES)


class CallWatch:
    """The start of the call in progress, for the heartbeat thread to watch.

    ``begin`` and ``end`` run in the body's thread around every call; ``check``
    and ``ago`` in the heartbeat thread. ``started`` and ``item`` are read
    there without a lock: a reference read is atomic, and an interrupt is
    only ever raised under ``lock`` once ``interrupting`` is set (see end).
    """

    def __init__(self, stage: str, replica: str, limit: float, interrupt: bool,
                 abandon: Callable[[Any, dict[str, Any]], None] | None = None):
        self.stage = stage
        self.replica = replica
        self.limit = limit
        self.interrupt = interrupt   # skip / dead-letter: interrupt a stuck call
        self.abandon = abandon       # called with the item of a call that could not be
        self.started: float | None = None
        self.item: Any = None
        self.thread = threading.get_ident()
        self.lock = threading.Lock()
        self.interrupting = False
        self.reported: float | None = None  # the start of the call last reported stuck
        self.interrupted_at: float | None = None
        self.report: dict[str, Any] = {}    # what was said about the last stuck call

    # -- the body's thread ----------------------------------------------------------

    def begin(self, item: Any) -> None:
        self.item = item
        self.started = _monotonic()

    def end(self) -> None:
        """The call is over: from here on no interrupt may land.

        The watcher sets ``interrupting`` before it looks at ``started``
        (both under the GIL): so either it sees this call ended and raises
        nothing, or we see ``interrupting`` and settle under its lock,
        clearing an interrupt that has not landed yet.
        """
        self.started = None
        if self.interrupting:
            self._settle()

    def _settle(self) -> None:
        while True:
            try:
                with self.lock:
                    _set_async_exc(self.thread, None)
                    self.interrupting = False
                return
            except StuckCall:
                continue  # it landed just now, as the call ended: nothing to interrupt

    # -- the heartbeat thread ------------------------------------------------------

    def ago(self) -> float | None:
        """Seconds since the call in progress began (None between calls)."""
        started = self.started
        return None if started is None else _monotonic() - started

    def check(self, sock: zmq.Socket) -> None:
        """Report a call past its time, interrupt it, end the process if it will not stop."""
        started = self.started
        if started is None:
            return
        now = _monotonic()
        seconds = now - started
        if seconds <= self.limit:
            return
        if self.reported != started:
            self.reported, self.interrupted_at = started, None
            stack = user_stack(self.thread)
            item_type = type(self.item).__name__
            self.report = {"item_type": item_type, "seconds": seconds, "stack": stack}
            action = "interrupting" if self.interrupt else "failing"
            sock.send(protocol.pack(protocol.STUCK, **self.report, action=action,
                                    limit=self.limit))
            if self.interrupt and self._interrupt(started):
                self.interrupted_at = now
        elif self.interrupted_at is not None and now - self.interrupted_at > INTERRUPT_GRACE:
            self.interrupted_at = None
            self._give_up(sock, seconds)

    def _interrupt(self, started: float) -> bool:
        self.interrupting = True
        with self.lock:
            if self.started != started:
                self.interrupting = False
                return False
            _set_async_exc(self.thread, StuckCall)
            return True

    def _give_up(self, sock: zmq.Socket, seconds: float) -> None:
        """The call did not come back from C code: its item is abandoned, the process ends."""
        in_process = self.thread == threading.main_thread().ident
        report = {**self.report, "seconds": seconds, "stack": user_stack(self.thread)}
        if self.abandon is not None:
            try:
                self.abandon(self.item, {"exc_type": "zpipe.StuckCall",
                                         "message": stuck_message(report, self.limit),
                                         "traceback": report["stack"]})
            except Exception as exc:  # noqa: BLE001 - the report must still go
                print(f"zpipe: replica {self.replica}: the stuck item could not be "
                      f"dead-lettered: {safe_text(exc, 300)}", file=sys.stderr, flush=True)
        while sock.poll(0):
            sock.recv()  # pings answering earlier heartbeats
        sock.send(protocol.pack(protocol.STUCK, **report, limit=self.limit,
                                action="ending the process" if in_process else
                                "left running (a thread cannot be ended)"))
        if not in_process:
            return
        # The supervisor answers with a ping once it has the report: only then go,
        # so that the news of this exit cannot overtake it.
        sock.poll(PING_WAIT_MS)
        print(f"zpipe: replica {self.replica}: a call stuck for {seconds:.1f} s did not come "
              f"back when interrupted (inside C code?); ending the process",
              file=sys.stderr, flush=True)
        os._exit(EXIT_STUCK)


def stuck_message(fields: dict[str, Any], limit: float) -> str:
    """One line about a stuck call, from the STUCK report's fields."""
    return (f"a call on an item of type {fields.get('item_type')} ran for "
            f"{fields.get('seconds', 0):.1f} s, past item_timeout = {limit:g} s")
