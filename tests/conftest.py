"""Helpers for black-box tests: write a pipeline, run `zpipe` as a user would, find its processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Callable

import pytest

ZPIPE = [sys.executable, "-m", "zpipe"]


def wait_until(condition: Callable[[], object], timeout: float = 20.0, interval: float = 0.05,
               what: str = "condition") -> object:
    """Poll ``condition`` until it is truthy; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def processes_mentioning(marker: str) -> list[int]:
    """PIDs of live processes whose command line contains ``marker`` (zombies excluded)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if marker in cmdline and state != "Z":
            pids.append(int(entry.name))
    return pids


class Launched:
    """A running `zpipe launch` whose output is collected as it comes."""

    def __init__(self, proc: subprocess.Popen[str]):
        self.proc = proc
        self.pid = proc.pid
        self.out: list[str] = []
        self.errors: list[str] = []
        self.readers = [threading.Thread(target=self._read, args=(stream, into), daemon=True)
                        for stream, into in ((proc.stdout, self.out), (proc.stderr, self.errors))]
        for reader in self.readers:
            reader.start()

    @staticmethod
    def _read(stream, into: list[str]) -> None:
        for line in stream:
            into.append(line)

    @property
    def stderr(self) -> str:
        return "".join(self.errors)

    def wait_for_stderr(self, text: str, timeout: float = 20.0) -> None:
        wait_until(lambda: text in self.stderr, timeout, what=f"{text!r} on stderr")

    def send_signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def finish(self, timeout: float = 30.0) -> tuple[int, str]:
        """Wait for the exit (killing it if it overstays); (exit status, stderr)."""
        try:
            self.proc.wait(timeout)
        finally:
            self.kill()
        for reader in self.readers:
            reader.join(5)
        return self.proc.returncode, self.stderr

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class Project:
    """A folder holding a pipeline.toml and the stage modules it names."""

    def __init__(self, root: Path):
        self.root = root

    def write(self, name: str, text: str) -> Path:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text).lstrip())
        return path

    def pipeline(self, toml: str, stages: str | None = None) -> Path:
        if stages is not None:
            self.write("stages.py", stages)
        return self.write("pipeline.toml", toml)

    @property
    def toml(self) -> Path:
        return self.root / "pipeline.toml"

    def run(self, *args: str, timeout: float = 120, cwd: Path | None = None
            ) -> subprocess.CompletedProcess[str]:
        """`zpipe ARGS` to completion, output captured."""
        return subprocess.run([*ZPIPE, *args], cwd=cwd or self.root, capture_output=True,
                              text=True, timeout=timeout)

    def launch(self, *extra: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return self.run("launch", str(self.toml), *extra, timeout=timeout)

    def start(self, *extra: str) -> "Launched":
        """`zpipe launch` in the background, in a session of its own as a terminal would give it."""
        return Launched(subprocess.Popen([*ZPIPE, "launch", str(self.toml), *extra],
                                         cwd=self.root, stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE, text=True,
                                         start_new_session=True))

    def processes(self) -> list[int]:
        return processes_mentioning(str(self.toml))

    def read(self, name: str) -> str:
        return (self.root / name).read_text()

    def lines(self, name: str) -> list[str]:
        path = self.root / name
        return path.read_text().splitlines() if path.exists() else []


@pytest.fixture
def project(tmp_path: Path):
    proj = Project(tmp_path)
    yield proj
    # No test may leave anything running, whatever happened in it.
    leftovers = proj.processes()
    for pid in leftovers:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert not leftovers, f"processes left running: {leftovers}"


# A pipeline with GPUs, resources, volumes and a stage that restarts: what the
# exporters (test_compose.py, test_kubernetes.py) turn into each engine's terms.
GPU_PIPELINE = """
[pipeline]
name = "gpu-pipe"
[[stages]]
name = "frames"
run = "m:f"
[[stages]]
name = "infer"
run = "m:g"
replicas = 3
restart = "on-failure"
max_restarts = 4
resources = { cpu = "2", memory = "4Gi", gpu = 1 }
volumes = ["out/masks", "logs"]
[[stages]]
name = "sink"
run = "m:h"
resources = { cpu = "500m", memory = "512M" }
"""
