"""Nothing outlives the launcher: a watcher process that cleans up after one that was killed.

Replicas get SIGTERM when their parent dies (PR_SET_PDEATHSIG), but a signal
is handled in Python, which cannot run while a C call holds the GIL, and a
killed launcher cannot remove its runtime folder. So `zpipe launch` and
`zpipe.run` (process mode) start this watcher first, in a session of its own,
with a pipe from them. They write each replica's pid into the pipe. The
watcher waits for the pipe to close: after a clean end it has been told so and
leaves; otherwise (the launcher was killed, however) it sends SIGTERM to
every replica still there, SIGKILL after KILL_AFTER seconds, and removes the
runtime folder and the run's shared-memory folder (shm.py: the segments the
replicas held or had in flight). It is a bare ``python -I -S`` with no imports of ours, so it
starts in a few milliseconds.
"""

from __future__ import annotations

import os
import subprocess
import sys

KILL_AFTER = 2.0  # seconds between the watcher's SIGTERM and its SIGKILL

_WATCHER = r"""
import os, shutil, signal, sys, time
signal.signal(signal.SIGINT, signal.SIG_IGN)
signal.signal(signal.SIGTERM, signal.SIG_IGN)  # it ends when its pipe does
kill_after, folders = float(sys.argv[1]), sys.argv[2:]
watched, ended = [], False
for line in sys.stdin.buffer:
    words = line.split()
    if words == [b"end"]:
        ended = True
    elif len(words) == 2:
        watched.append((int(words[0]), words[1]))

def alive(pid, started):
    # The same process (not a reused pid), and not a zombie.
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except OSError:
        return False
    return fields[0] != b"Z" and fields[19] == started

if not ended:
    for signum, wait in ((signal.SIGTERM, kill_after), (signal.SIGKILL, 1.0)):
        left = [(p, s) for p, s in watched if alive(p, s)]
        for pid, _ in left:
            try:
                os.kill(pid, signum)
            except OSError:
                pass
        deadline = time.monotonic() + wait
        while left and time.monotonic() < deadline:
            time.sleep(0.02)
            left = [(p, s) for p, s in left if alive(p, s)]
for folder in folders:
    shutil.rmtree(folder, ignore_errors=True)
"""


def start_time(pid: int) -> bytes | None:
    """The process's start time in clock ticks (/proc/PID/stat field 22): with the pid,
    it names one process, even after the pid is reused."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return stat.read().rsplit(b")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


class Janitor:
    """The launcher's end of the watcher: ``watch(pid)`` each replica, ``close()`` at a clean end.
    ``folders``: what it removes once the launcher is gone (the runtime folder and the
    shared-memory one)."""

    def __init__(self, folders: list[str]):
        read_end, self.pipe = os.pipe()
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", _WATCHER, str(KILL_AFTER), *folders],
                stdin=read_end, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                start_new_session=True)  # terminal signals to our group do not reach it
        finally:
            os.close(read_end)

    @property
    def fd(self) -> int:
        """The pipe's write end: a forked replica must close it, or the watcher would
        wait for that replica too."""
        return self.pipe

    def watch(self, pid: int | None) -> None:
        started = start_time(pid) if pid else None
        if started is not None and self.pipe >= 0:
            try:
                os.write(self.pipe, b"%d %s\n" % (pid, started))
            except OSError:
                pass  # the watcher is gone (killed by hand): nothing more it can do

    def close(self) -> None:
        """A clean end: every replica has been reaped and the folder removed already."""
        if self.pipe < 0:
            return
        try:
            os.write(self.pipe, b"end\n")
        except OSError:
            pass
        finally:
            os.close(self.pipe)
            self.pipe = -1
        try:
            self.process.wait(5)
        except subprocess.TimeoutExpired:
            self.process.kill()
