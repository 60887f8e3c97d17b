"""Liveness without the GIL: frozen replicas are found within seconds, busy ones are left alone."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from conftest import processes_mentioning, wait_until
from test_launcher import free_ports, toml

STAGES = """
import ctypes, os, time

def numbers(count):
    for i in range(count):
        if i == 100:
            open("flowing", "w").close()
        time.sleep(0.001)
        yield i

def relay(x):
    return x

def hold_gil(x, seconds):
    if x == 200 and not os.path.exists("held"):
        open("held", "w").close()
        # One C call that keeps the GIL (PyDLL does not release it): no thread
        # of this process runs meanwhile, its heartbeat thread included.
        ctypes.PyDLL(None).sleep(seconds)
    return x

def record(x, path):
    with open(path, "a") as f:
        f.write(f"{x}\\n")
"""


def _pid_of(project, stage: str) -> int:
    pids = wait_until(lambda: processes_mentioning(f"{project.toml} {stage}"), what=stage)
    return pids[0]


def test_a_frozen_replica_is_reported_by_name_within_seconds(project):
    project.pipeline(toml(
        'name = "source"\nrun = "stages:numbers"\nparams = { count = 3000 }',
        'name = "relay"\nrun = "stages:relay"\nrestart = "on-failure"',
        'name = "sink"\nrun = "stages:record"\nparams = { path = "out.txt" }'), STAGES)
    launched = project.start()
    wait_until(lambda: (project.root / "flowing").exists(), what="items flowing")
    pid = _pid_of(project, "relay")
    os.kill(pid, signal.SIGSTOP)
    stopped = time.monotonic()
    try:
        launched.wait_for_stderr("replica relay-0 was stopped (SIGSTOP) and did not answer "
                                 "ZeroMQ's heartbeats for 3 s; killing it", timeout=15)
        assert time.monotonic() - stopped < 5
    finally:
        code, err = launched.finish(60)
    assert code == 0, err  # restarted, and every item sent again
    assert "restarting replica relay-0" in err
    assert sorted({int(x) for x in project.lines("out.txt")}) == list(range(3000))


def test_a_frozen_replica_of_a_stage_without_restart_fails_the_run_naming_it(project):
    project.pipeline(toml(
        'name = "source"\nrun = "stages:numbers"\nparams = { count = 100000 }',
        'name = "relay"\nrun = "stages:relay"',
        'name = "sink"\nrun = "stages:record"\nparams = { path = "out.txt" }'), STAGES)
    launched = project.start()
    wait_until(lambda: (project.root / "flowing").exists(), what="items flowing")
    os.kill(_pid_of(project, "relay"), signal.SIGSTOP)
    code, err = launched.finish(60)
    assert code == 1
    assert "stage 'relay' replica relay-0 (pid" in err and "was stopped (SIGSTOP)" in err


def test_a_call_holding_the_gil_for_long_is_not_taken_for_death(project):
    """8 s without a Python heartbeat from one replica: its libzmq thread still
    answers, and its own heartbeat thread does not give up on the supervisor."""
    project.pipeline(toml(
        'name = "source"\nrun = "stages:numbers"\nparams = { count = 500 }',
        'name = "relay"\nrun = "stages:hold_gil"\nparams = { seconds = 8 }',
        'name = "sink"\nrun = "stages:record"\nparams = { path = "out.txt" }'), STAGES)
    result = project.launch(timeout=90)
    assert result.returncode == 0, result.stderr
    assert (project.root / "held").exists()
    assert len(project.lines("out.txt")) == 500


def test_replicas_started_elsewhere_holding_the_gil_are_not_taken_for_dead(project):
    control, relay, sink = free_ports(3)
    project.pipeline(toml(
        'name = "source"\nrun = "stages:numbers"\nparams = { count = 500 }',
        f'name = "relay"\nrun = "stages:hold_gil"\nparams = {{ seconds = 8 }}\n'
        f'address = "tcp://127.0.0.1:{relay}"',
        f'name = "sink"\nrun = "stages:record"\nparams = {{ path = "out.txt" }}\n'
        f'address = "tcp://127.0.0.1:{sink}"',
        extra=f'control = "tcp://127.0.0.1:{control}"'), STAGES)
    zpipe_cmd = [sys.executable, "-m", "zpipe"]
    supervisor = subprocess.Popen([*zpipe_cmd, "supervise", str(project.toml)],
                                  cwd=project.root, stderr=subprocess.PIPE, text=True)
    procs = [subprocess.Popen([*zpipe_cmd, "stage", str(project.toml), name], cwd=project.root)
             for name in ("source", "relay", "sink")]
    try:
        _, err = supervisor.communicate(timeout=90)
        codes = [p.wait(30) for p in procs]
    finally:
        for p in [supervisor, *procs]:
            p.kill()
    assert supervisor.returncode == 0, err
    assert codes == [0, 0, 0]
    assert "replica relay-0 has sent no heartbeat for 5 s, though ZeroMQ still hears it" in err
    assert len(project.lines("out.txt")) == 500


def test_a_stuck_call_holding_the_gil_is_ended_by_the_supervisor(project):
    project.pipeline(toml(
        'name = "source"\nrun = "stages:numbers"\nparams = { count = 500 }',
        'name = "relay"\nrun = "stages:hold_gil"\nparams = { seconds = 600 }\n'
        'item_timeout = 1\nrestart = "on-failure"',
        'name = "sink"\nrun = "stages:record"\nparams = { path = "out.txt" }'), STAGES)
    started = time.monotonic()
    result = project.launch(timeout=90)
    assert result.returncode == 0, result.stderr  # ended, restarted; the flag lets it pass
    assert time.monotonic() - started < 30
    assert "stage 'relay' replica relay-0 was stuck: a call on one item ran for" in \
        result.stderr and "holding the GIL" in result.stderr
    assert "restarting replica relay-0" in result.stderr
    assert sorted({int(x) for x in project.lines("out.txt")}) == list(range(500))
