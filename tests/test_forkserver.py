"""Replicas forked by the launcher's fork server (forkserver.py) keep every guarantee of
a process started as `zpipe stage`: its command line, environment, parent death,
exit status, interpreter exit and error reports."""

from __future__ import annotations

import json
import os
import re
import signal
import sys
from pathlib import Path

from conftest import processes_mentioning, wait_until
from test_launcher import finished_lines, toml

STAGES = """
import json, os, sys, time
from typing import Iterable

import zpipe


def numbers(count):
    yield from range(count)


def forever():
    i = 0
    while True:
        time.sleep(0.01)
        yield i
        i += 1


def parent_of(pid):
    with open(f"/proc/{pid}/stat") as stat:
        return int(stat.read().rsplit(")", 1)[1].split()[1])


class Probe(zpipe.Stage):
    # What this replica's process is, written once, by the first item.
    def __init__(self, folder):
        self.folder = folder
        self.written = False

    def process(self, item):
        if not self.written:
            self.written = True
            with open("/proc/self/cmdline", "rb") as f:
                cmdline = [a.decode() for a in f.read().rstrip(b"\\0").split(b"\\0")]
            try:
                stdin = os.read(0, 10)
            except OSError as exc:
                stdin = str(exc)
            fields = {"argv": sys.argv, "cmdline": cmdline, "pid": os.getpid(),
                      "parent": os.getppid(), "grandparent": parent_of(os.getppid()),
                      "parent_env": os.environ.get("ZPIPE_PARENT_PID"),
                      "runtime_dir": os.environ.get("ZPIPE_RUNTIME_DIR"),
                      "gpu": os.environ.get("CUDA_VISIBLE_DEVICES"),
                      "stdin": repr(stdin)}
            with open(os.path.join(self.folder, f"{os.getpid()}.json"), "w") as f:
                json.dump(fields, f)
        return item


def relay(item):
    return item


def exit_on(item, bad):
    if item == bad:
        os._exit(7)
    return item


LEFT_OPEN = open("left-open.txt", "w") if os.environ.get("ZPIPE_RUNTIME_DIR") else None


def unclosed_sink(items: Iterable):
    # Written, never flushed nor closed: only the interpreter's exit saves it.
    import atexit
    atexit.register(lambda: open("atexit.txt", "w").write("ran"))
    for item in items:
        LEFT_OPEN.write(f"{item}\\n")


def record(items: Iterable, path):
    with open(path, "w") as out:
        for item in items:
            out.write(json.dumps(item) + "\\n")
            out.flush()
"""

# Raises only in a replica: the launcher's check imports it outside any (the
# runtime folder is given to replicas only).
FAILS_IN_A_REPLICA = """
import os
if os.environ.get("ZPIPE_RUNTIME_DIR"):
    raise RuntimeError("no model file in this replica")

def relay(item):
    return item
"""


def parent_of(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as stat:
        return int(stat.read().rsplit(")", 1)[1].split()[1])


def test_a_forked_replica_is_what_zpipe_stage_would_be(project):
    (project.root / "seen").mkdir()
    project.pipeline(toml(
        'name = "source"\nrun = "stages:numbers"\nparams = { count = 200 }',
        'name = "probe"\nrun = "stages:Probe"\nreplicas = 2\ngpus = [3, "GPU-5"]\n'
        'params = { folder = "seen" }',
        'name = "sink"\nrun = "stages:record"\nparams = { path = "out.jsonl" }'), STAGES)
    launcher = project.start()
    status, err = launcher.finish(60)
    assert status == 0, err
    seen = sorted((json.loads(p.read_text()) for p in (project.root / "seen").iterdir()),
                  key=lambda s: s["argv"][3])
    assert len(seen) == 2, seen
    for replica, (fields, gpu) in enumerate(zip(seen, ["3", "GPU-5"])):
        args = ["stage", "--replica", str(replica), "--", str(project.toml), "probe"]
        # What `python -m zpipe stage ...` shows: in ps, and to the stage's own code.
        assert fields["cmdline"] == [sys.executable, "-m", "zpipe", *args], fields
        assert fields["argv"][1:] == args and fields["argv"][0].endswith("__main__.py")
        # Forked by the fork server, itself the launcher's child; told so.
        assert fields["grandparent"] == launcher.pid and fields["parent"] != launcher.pid
        assert fields["parent_env"] == str(fields["parent"])
        assert fields["runtime_dir"] and fields["gpu"] == gpu
        assert fields["stdin"] == "b''"
    assert seen[0]["parent"] == seen[1]["parent"]
    assert sorted(json.loads(x) for x in project.lines("out.jsonl")) == list(range(200))


def test_launcher_killed_takes_the_fork_server_and_its_replicas_with_it(project):
    project.pipeline(toml(
        'name = "source"\nrun = "stages:forever"',
        'name = "relay"\nrun = "stages:relay"\nreplicas = 2',
        'name = "sink"\nrun = "stages:record"\nparams = { path = "out.jsonl" }'), STAGES)
    launcher = project.start()
    try:
        wait_until(lambda: len(project.lines("out.jsonl")) > 10, what="items at the sink")
        replicas = [p for p in project.processes() if p != launcher.pid]
        assert len(replicas) == 4
        servers = {parent_of(p) for p in replicas}
        assert len(servers) == 1 and launcher.pid not in servers
        server = servers.pop()
        assert parent_of(server) == launcher.pid
        launcher.kill()
        wait_until(lambda: not project.processes() and not Path(f"/proc/{server}").exists(),
                   timeout=15, what="the fork server and every replica to exit")
    finally:
        launcher.kill()


def test_fork_server_killed_ends_the_run_and_leaves_nothing(project):
    project.pipeline(toml(
        'name = "source"\nrun = "stages:forever"\nrestart = "on-failure"',
        'name = "relay"\nrun = "stages:relay"\nrestart = "on-failure"',
        'name = "sink"\nrun = "stages:record"\nparams = { path = "out.jsonl" }\n'
        'restart = "on-failure"'), STAGES)
    launcher = project.start()
    try:
        wait_until(lambda: len(project.lines("out.jsonl")) > 10, what="items at the sink")
        replica = next(p for p in project.processes() if p != launcher.pid)
        os.kill(parent_of(replica), signal.SIGKILL)
        status, err = launcher.finish(30)
    finally:
        launcher.kill()
    # Its replicas died with it, and none can be started again: a failure, said so.
    assert status == 1, err
    assert re.search(r"stage '\w+' replica \w+-0 \(pid \d+\) could not be started again: "
                     r"zpipe fork server \(pid \d+\)", err), err
    wait_until(lambda: not project.processes(), timeout=10, what="every replica to exit")


def test_a_replica_that_fails_at_import_is_reported_with_its_stage(project):
    project.write("bad.py", FAILS_IN_A_REPLICA)
    project.pipeline(toml(
        'name = "source"\nrun = "stages:numbers"\nparams = { count = 10 }',
        'name = "loader"\nrun = "bad:relay"',
        'name = "sink"\nrun = "stages:record"\nparams = { path = "out.jsonl" }'), STAGES)
    result = project.launch(timeout=60)
    assert result.returncode == 1
    assert re.search(r"^loader-0 +\| zpipe: error: .*stage 'loader'.*RuntimeError: no model "
                     r"file in this replica", result.stderr, re.M), result.stderr
    assert re.search(r"stage 'loader' replica loader-0 \(pid \d+\) died without a word: "
                     r"exited with status 2", result.stderr), result.stderr


def test_a_forked_replica_exit_status_is_reported(project):
    project.pipeline(toml(
        'name = "source"\nrun = "stages:numbers"\nparams = { count = 100 }',
        'name = "dies"\nrun = "stages:exit_on"\nparams = { bad = 50 }',
        'name = "sink"\nrun = "stages:record"\nparams = { path = "out.jsonl" }'), STAGES)
    result = project.launch(timeout=60)
    assert result.returncode == 1
    assert re.search(r"stage 'dies' replica dies-0 \(pid \d+\) died without a word: exited "
                     r"with status 7", result.stderr), result.stderr


def test_a_forked_replica_still_ends_as_an_interpreter_does(project):
    # Files left open are flushed and atexit handlers run: a fork server must not
    # cut a replica's exit short.
    project.pipeline(toml(
        'name = "source"\nrun = "stages:numbers"\nparams = { count = 300 }',
        'name = "sink"\nrun = "stages:unclosed_sink"'), STAGES)
    result = project.launch(timeout=60)
    assert result.returncode == 0, result.stderr
    assert ("sink", 300, 0) in finished_lines(result.stderr)
    assert project.lines("left-open.txt") == [str(i) for i in range(300)]
    assert project.read("atexit.txt") == "ran"


def test_nothing_is_left_after_a_clean_run(project):
    project.pipeline(toml(
        'name = "source"\nrun = "stages:numbers"\nparams = { count = 50 }',
        'name = "sink"\nrun = "stages:record"\nparams = { path = "out.jsonl" }'), STAGES)
    launcher = project.start()
    status, err = launcher.finish(60)
    assert status == 0, err
    assert not processes_mentioning(f"zpipe.supervision.forkserver {launcher.pid} ")
