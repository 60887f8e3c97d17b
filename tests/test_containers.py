"""docker-compose.yml run as containers would run: every service its own host (network namespace)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import netns
import pytest
import yaml
from conftest import wait_until

ROOT = Path(__file__).resolve().parent.parent
ZPIPE = [sys.executable, "-m", "zpipe"]

pytestmark = pytest.mark.skipif(not netns.available(),
                                reason="needs root and iproute2 for network namespaces")


def start_services(compose_file: Path, cwd: Path, logs: Path) -> tuple[netns.Hosts, dict]:
    services = yaml.safe_load(compose_file.read_text())["services"]
    hosts = netns.Hosts(list(services))
    hosts.__enter__()
    procs = {}
    try:
        for name, service in services.items():
            command = service["command"]
            assert command[0] == "zpipe"
            env = {**os.environ, **service["environment"]}
            out = open(logs / f"{name}.log", "w")
            procs[name] = hosts.start(name, [*ZPIPE, *command[1:]], env, cwd,
                                      stdout=out, stderr=subprocess.STDOUT)
    except BaseException:
        hosts.__exit__(None, None, None)
        raise
    return hosts, procs


def test_example_runs_with_every_service_on_its_own_host(tmp_path):
    out = ROOT / "services" / "out" / "detections.jsonl"
    out.unlink(missing_ok=True)
    hosts, procs = start_services(ROOT / "docker-compose.yml", ROOT, tmp_path)
    try:
        status = procs["supervisor"].wait(120)
        others = {name: p.wait(30) for name, p in procs.items()}
    finally:
        hosts.__exit__(None, None, None)
    log = (tmp_path / "supervisor.log").read_text()
    assert status == 0, log
    assert set(others.values()) == {0}, others
    # Every replica really came from its own address on the bridge.
    assert "replica detector-1 joined from" in log
    frames = [json.loads(line)["frame"] for line in out.read_text().splitlines()]
    assert frames == list(range(300))
    assert "stage 'store' finished: 300 in, 0 out" in log


TICKS = """
import itertools, json, time
from typing import Iterable

def ticks(count=None):
    for i in itertools.count() if count is None else range(count):
        time.sleep(0.005)
        yield i

def relay(x):
    return x

def record(items: Iterable, path):
    with open(path, "w") as f:
        for x in items:
            f.write(json.dumps(x) + "\\n")
            f.flush()
"""


def start_ticks(tmp_path: Path, name: str, ticks: str) -> tuple[netns.Hosts, dict, Path]:
    """ticks -> relay (2 replicas) -> sink, exported for compose and started a host per
    service, once 20 items have reached the sink; the hosts, processes, and logs."""
    (tmp_path / "stages.py").write_text(TICKS)
    (tmp_path / "pipeline.toml").write_text(
        f'[pipeline]\nname = "{name}"\ngrace = 2\n'
        f'[[stages]]\nname = "ticks"\nrun = "stages:ticks"\n{ticks}'
        '[[stages]]\nname = "relay"\nrun = "stages:relay"\nreplicas = 2\n'
        f'[[stages]]\nname = "sink"\nrun = "stages:record"\nparams = {{ path = "{tmp_path}/out" }}\n')
    compose = subprocess.run([*ZPIPE, "export", "compose", "pipeline.toml"], cwd=tmp_path,
                             capture_output=True, text=True, timeout=60)
    assert compose.returncode == 0, compose.stderr
    (tmp_path / "docker-compose.yml").write_text(compose.stdout)
    logs = tmp_path / "logs"
    logs.mkdir()
    hosts, procs = start_services(tmp_path / "docker-compose.yml", tmp_path, logs)
    try:
        output = tmp_path / "out"
        wait_until(lambda: output.exists() and len(output.read_text().splitlines()) > 20,
                   timeout=60, what="items at the sink")
    except BaseException:
        hosts.__exit__(None, None, None)
        raise
    return hosts, procs, logs


def test_losing_a_host_is_reported_and_stops_the_rest(tmp_path):
    hosts, procs, logs = start_ticks(tmp_path, "lossy", "")
    try:
        # The sink has one replica and restart = "no": losing its host fails the run
        # (losing one of relay's two would not: the other takes over).
        hosts.kill_host("sink-0")
        status = procs["supervisor"].wait(30)
        others = {name: p.wait(30) for name, p in procs.items() if name != "sink-0"}
    finally:
        hosts.__exit__(None, None, None)
    log = (logs / "supervisor.log").read_text()
    assert status == 1, log
    assert "stage 'sink' replica sink-0" in log and "lost its connection" in log, log
    assert all(code is not None for code in others.values())


def test_a_replica_whose_name_stops_resolving_holds_up_nothing_else(tmp_path):
    """libzmq looks a peer's name up in its I/O thread before each reconnect; where the
    name of a container that is gone takes the resolver its whole timeout, that thread
    is stuck meanwhile. The sender's commands, heartbeats and other links must not be."""
    count = 1000
    hosts, procs, logs = start_ticks(tmp_path, "resolving", f"params = {{ count = {count} }}\n")
    try:
        # Gone, and its name with it: every reconnect of ticks-0 to it now waits on
        # the resolver (30 s here), in an I/O thread of ticks-0.
        hosts.forget("relay-1")
        hosts.kill_host("relay-1")
        status = procs["supervisor"].wait(60)
        # ... which ticks-0 does not wait for to exit either.
        others = {name: p.wait(10) for name, p in procs.items() if name != "relay-1"}
    finally:
        hosts.__exit__(None, None, None)
    log = (logs / "supervisor.log").read_text()
    assert status == 0, log
    assert "replica relay-1" in log and "goes on with 1 replica" in log, log
    assert set(others.values()) == {0}, others
    ids = {json.loads(line) for line in (tmp_path / "out").read_text().splitlines()}
    assert ids == set(range(count))
