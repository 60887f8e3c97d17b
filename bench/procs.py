"""Child processes for the bench: output captured line by line, every wait bounded,
the whole process group cleaned up, and /proc helpers (RSS, descendants)."""

from __future__ import annotations

import json
import os
import queue
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

MARKER = "BENCH "


class Child:
    """A process in its own session; its output (stdout and stderr merged) is kept."""

    def __init__(self, argv: list[str], cwd: str | None = None, stdin_pipe: bool = False):
        self.argv = argv
        self.started = time.time()
        self.popen = subprocess.Popen(
            argv, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            stdin=subprocess.PIPE if stdin_pipe else subprocess.DEVNULL,
            start_new_session=True)
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.ended: float | None = None
        self.leftovers: list[int] = []

    @property
    def pid(self) -> int:
        return self.popen.pid

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for raw in self.popen.stdout:
            line = raw.decode(errors="replace").rstrip("\n")
            self.lines.append(line)
            self._queue.put(line)
        self._queue.put(None)

    def wait_line(self, contains: str, timeout: float) -> str:
        """The next output line containing ``contains``; TimeoutError after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no {contains!r} from {self.argv[:4]} in {timeout} s")
            try:
                line = self._queue.get(timeout=left)
            except queue.Empty:
                continue
            if line is None:
                raise RuntimeError(f"{self.argv[:4]} ended before printing {contains!r}:\n"
                                   + self.tail())
            if contains in line:
                return line

    def wait(self, timeout: float) -> int:
        """Exit status (``ended`` is when it exited, to the millisecond); on
        timeout the group is killed and TimeoutError raised."""
        if self.popen.poll() is None and not _exited_within(self.pid, timeout):
            self.kill()
            raise TimeoutError(f"{self.argv[:4]} still running after {timeout} s:\n"
                               + self.tail())
        self.ended = self.ended or time.time()
        status = self.popen.wait(5.0)
        self._reader.join(2.0)
        return status

    def kill(self) -> None:
        """Stop the whole group: SIGTERM, then SIGKILL what is left."""
        for signum in (signal.SIGTERM, signal.SIGKILL):
            if not group_members(self.pid):
                break
            try:
                os.killpg(self.pid, signum)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + 2.0
            while group_members(self.pid) and time.monotonic() < deadline:
                time.sleep(0.05)
        try:
            self.popen.wait(2.0)
        except subprocess.TimeoutExpired:
            pass

    def results(self) -> list[dict]:
        return [json.loads(line.split(MARKER, 1)[1]) for line in self.lines if MARKER in line]

    def result(self) -> dict:
        found = [r for r in self.results() if "event" not in r]
        if not found:
            raise RuntimeError(f"no result from {' '.join(self.argv[:5])}:\n" + self.tail())
        return found[-1]

    def tail(self, n: int = 15) -> str:
        return "\n".join(self.lines[-n:])

    def __enter__(self) -> "Child":
        return self

    def __exit__(self, *exc: object) -> None:
        if self.popen.poll() is None:
            self.kill()
        else:
            # Whatever is still in the group outlived its parent: note it, then end it.
            self.leftovers = group_members(self.pid)
            if self.leftovers:
                print(f"bench: warning: {len(self.leftovers)} process(es) left running by "
                      f"{' '.join(self.argv[:3])}: {self.leftovers}", file=sys.stderr)
                self.kill()


def _exited_within(pid: int, timeout: float) -> bool:
    """Waits on a pidfd: Popen.wait(timeout) polls with sleeps of up to 50 ms."""
    try:
        fd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if _stat(pid) is None or _stat(pid)[0] == "Z":
                return True
            time.sleep(0.005)
        return False
    try:
        return bool(select.select([fd], [], [], timeout)[0])
    finally:
        os.close(fd)


def peer_result(argv: list[str], what: str, count: int, timeout: float) -> dict:
    """Run a peer's chain (``argv``) to its end; its sink's figures, checked: exit 0 and
    ``count`` items (a result saying ``missing`` is returned as it is)."""
    with Child(argv) as child:
        status = child.wait(timeout)
        if status != 0:
            raise RuntimeError(f"{what} exited {status}:\n{child.tail()}")
        result = child.result()
    if not result.get("missing") and result["count"] != count:
        raise RuntimeError(f"{what}: {result['count']} items of {count}")
    return result


def python_module(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


def _stat(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2:].split()  # fields from the state on


def group_members(pgid: int) -> list[int]:
    """Live processes in process group ``pgid`` (zombies excluded)."""
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat(int(entry))
            if fields and fields[0] != "Z" and int(fields[2]) == pgid:
                members.append(int(entry))
    return members


def descendants(pid: int) -> list[int]:
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat(int(entry))
            if fields:
                parents[int(entry)] = int(fields[1])
    found, frontier = [], [pid]
    while frontier:
        parent = frontier.pop()
        children = [p for p, pp in parents.items() if pp == parent]
        found += children
        frontier += children
    return found


def cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def rss_mb(pid: int) -> float | None:
    """VmRSS of ``pid`` in MB (None once it has gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpu_seconds(pid: int) -> float | None:
    """CPU time of process ``pid`` so far (user + system, all its threads), in
    seconds; None once it has gone. Read from the process's CPU-time clock
    (what clock_getcpuclockid(pid) gives: nanoseconds, as CLOCK_PROCESS_CPUTIME_ID
    in the process itself), else from /proc/PID/stat (clock ticks, 10 ms)."""
    try:
        return time.clock_gettime(((~pid) << 3) | 2)  # MAKE_PROCESS_CPUCLOCK(pid, SCHED)
    except (OSError, OverflowError, AttributeError):
        pass
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK  # utime, stime


def cpu_of(pids: dict[str, int]) -> dict[str, float | None]:
    """cpu_seconds of each named process."""
    return {name: cpu_seconds(pid) for name, pid in pids.items()}


def cpu_used(before: dict[str, float | None], after: dict[str, float | None]) -> float:
    """CPU seconds the named processes used between two cpu_of() readings; every
    one must have been readable both times (a process gone is an error, not 0)."""
    missing = [name for name in before if before[name] is None or after.get(name) is None]
    if missing or set(before) != set(after):
        raise RuntimeError(f"CPU time not readable for {', '.join(missing) or 'some process'}")
    return sum(after[name] - before[name] for name in before)


def free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports on 127.0.0.1 that were free a moment ago."""
    import socket

    probes = []
    try:
        for _ in range(count):
            probe = socket.socket()
            probe.bind(("127.0.0.1", 0))
            probes.append(probe)
        return [probe.getsockname()[1] for probe in probes]
    finally:
        for probe in probes:
            probe.close()
