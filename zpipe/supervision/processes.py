"""Where replicas run: OS processes (started or forked) and threads.

Each class implements supervisor.Workers: report exits, terminate, kill, and
finally make sure nothing is left.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import threading
from typing import Any, Callable

REAP_TIMEOUT = 5.0


class ForkedHandle:
    """A multiprocessing.Process seen through Popen's poll()."""

    def __init__(self, process: Any):
        self.process = process
        self.pid = process.pid

    def poll(self) -> int | None:
        return self.process.exitcode

    def wait(self, timeout: float) -> None:
        self.process.join(timeout)

    def send_signal(self, signum: int) -> None:
        if self.poll() is None:
            try:
                os.kill(self.pid, signum)
            except ProcessLookupError:
                pass


class Processes:
    """Replica processes on this host: subprocess.Popen objects, or what behaves as one
    (forkserver.ForkedReplica, ForkedHandle of multiprocessing).

    ``on_start(name, handle)`` runs for every process started, restarts
    included (the launcher relays its output, the janitor watches it).
    """

    def __init__(self, on_start: Callable[[str, Any], None] | None = None) -> None:
        self.handles: dict[str, Any] = {}
        self.starters: dict[str, Callable[[], Any]] = {}
        self.reported: set[str] = set()
        self.on_start = on_start

    def add(self, name: str, handle: Any, start: Callable[[], Any] | None = None) -> None:
        """A process already started; ``start`` starts it again (restart)."""
        self.handles[name] = handle
        if start is not None:
            self.starters[name] = start
        if self.on_start is not None:
            self.on_start(name, handle)

    def start(self, name: str, start: Callable[[], Any]) -> Any:
        """Start a process with ``start`` (which returns its handle), now and on restart."""
        handle = start()
        self.add(name, handle, start)
        return handle

    def alive(self, name: str) -> bool:
        handle = self.handles.get(name)
        return handle is not None and handle.poll() is None

    def pid(self, name: str) -> int | None:
        handle = self.handles.get(name)
        return handle.pid if handle is not None else None

    def restart(self, name: str) -> None:
        start = self.starters.get(name)
        if start is None:
            return
        old = self.handles.get(name)
        if old is not None:
            try:
                old.wait(REAP_TIMEOUT)  # it has exited: reap it
            except subprocess.TimeoutExpired:
                pass
        self.reported.discard(name)
        self.add(name, start())

    def exited(self) -> dict[str, int]:
        ended = {}
        for name, handle in self.handles.items():
            if name not in self.reported and handle.poll() is not None:
                self.reported.add(name)
                ended[name] = handle.poll()
        return ended

    def _signal(self, names: list[str], signum: int) -> None:
        for name in names:
            handle = self.handles.get(name)
            if handle is not None and handle.pid:
                handle.send_signal(signum)  # none to a process already reaped

    def terminate(self, names: list[str]) -> None:
        self._signal(names, signal.SIGTERM)

    def kill(self, names: list[str]) -> None:
        self._signal(names, signal.SIGKILL)

    def reap(self) -> None:
        """Make sure nothing is left: kill whatever still runs and wait for it."""
        self.kill(list(self.handles))
        for handle in self.handles.values():
            try:
                handle.wait(REAP_TIMEOUT)
            except subprocess.TimeoutExpired:
                pass


class Threads:
    """Replicas as threads of this process (mode="thread")."""

    def __init__(self) -> None:
        self.threads: dict[str, threading.Thread] = {}
        self.runs: dict[str, Callable[[], int]] = {}
        self.status: dict[str, int] = {}
        self.reported: set[str] = set()
        self.terminated: set[str] = set()

    def start(self, name: str, run: Callable[[], int]) -> None:
        def target() -> None:
            status = 1
            try:
                status = run()
            except SystemExit as exc:  # a terminate() while the replica ran
                status = exc.code if isinstance(exc.code, int) else 1
            finally:
                self.status[name] = status
        thread = threading.Thread(target=target, name=f"zpipe-{name}", daemon=True)
        self.threads[name] = thread
        self.runs[name] = run
        thread.start()

    def alive(self, name: str) -> bool:
        thread = self.threads.get(name)
        return thread is not None and thread.is_alive()

    def pid(self, name: str) -> int | None:
        return os.getpid() if name in self.threads else None  # this process's thread

    def restart(self, name: str) -> None:
        thread = self.threads.get(name)
        if name in self.runs and (thread is None or not thread.is_alive()):
            self.reported.discard(name)
            self.terminated.discard(name)
            self.status.pop(name, None)
            self.start(name, self.runs[name])

    def exited(self) -> dict[str, int]:
        ended = {}
        for name, thread in self.threads.items():
            if name not in self.reported and not thread.is_alive():
                self.reported.add(name)
                ended[name] = self.status.get(name, 1)
        return ended

    def terminate(self, names: list[str]) -> None:
        # A thread cannot be killed; the closest is an exception raised in it
        # at its next Python instruction (not inside a blocking C call). Once
        # per thread, as a process takes SIGTERM once: another would cut its
        # teardown short.
        for name in names:
            thread = self.threads.get(name)
            if thread is not None and thread.is_alive() and thread.ident is not None and \
                    name not in self.terminated:
                self.terminated.add(name)
                ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread.ident),
                                                           ctypes.py_object(SystemExit))

    kill = terminate

    def reap(self) -> None:
        for thread in self.threads.values():
            thread.join(REAP_TIMEOUT)


class Remote:
    """Replicas this process did not start (containers, other hosts).

    The supervisor sees them only through their heartbeats: it cannot signal
    them, and it learns of a death when the heartbeats stop.
    """

    remote = True

    def exited(self) -> dict[str, int]:
        return {}

    def terminate(self, names: list[str]) -> None:
        pass

    def kill(self, names: list[str]) -> None:
        pass

    def restart(self, name: str) -> None:
        pass  # its host starts it again; it says hello (recovery.py waits for it)

    def alive(self, name: str) -> bool:
        return True  # not known here: its connection says (liveness.py)

    def pid(self, name: str) -> None:
        return None  # its hello says it
