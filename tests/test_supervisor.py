"""Supervision end to end: error relay, silent deaths, Ctrl-C, SIGTERM, the launcher killed."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
from conftest import processes_mentioning, wait_until
from test_launcher import finished_lines, toml

from zpipe.wire.codec import PROTOCOL_VERSION as VERSION

STAGES = """
import ctypes, json, os, signal, time
from typing import Iterable

import zpipe


def numbers(count, delay=0.0):
    for i in range(count):
        if delay:
            time.sleep(delay)
        yield i


def forever(delay):
    i = 0
    while True:
        time.sleep(delay)
        yield i
        i += 1


def fail_on(x, bad):
    if x == bad:
        raise ValueError(f"bad item {x}")
    return x


def sigkill_on(x, bad):
    if x == bad:
        os.kill(os.getpid(), signal.SIGKILL)
    return x


def segfault_on(x, bad):
    if x == bad:
        ctypes.string_at(0)
    return x


def stuck_on(x, bad):
    if x == bad:
        time.sleep(1000)
    return x


def record(items: Iterable, path):
    with open(path, "w") as out:
        for item in items:
            out.write(json.dumps(item) + "\\n")
            out.flush()


def to_set(x):
    return {"values": {x}}


class SlowSetup(zpipe.Stage):
    def setup(self):
        open("setting-up", "w").close()
        time.sleep(1000)

    def process(self, item):
        return item

    def teardown(self):
        open("teardown.log", "a").write("teardown\\n")


class Broken(zpipe.Stage):
    def __init__(self, log):
        self.log = log

    def setup(self):
        raise RuntimeError("model file missing")

    def process(self, item):
        return item

    def teardown(self):
        open(self.log, "a").write("teardown\\n")
"""


def three_stages(middle: str, count: int = 50, source_extra: str = "") -> str:
    return toml(f'name = "source"\nrun = "stages:numbers"\nparams = {{ count = {count} {source_extra} }}',
                middle,
                'name = "sink"\nrun = "stages:record"\nparams = { path = "out.jsonl" }')


def test_stage_error_is_relayed_with_traceback_and_everything_stops(project):
    project.pipeline(three_stages('name = "check"\nrun = "stages:fail_on"\nreplicas = 2\n'
                                  'params = { bad = 17 }'), STAGES)
    result = project.launch(timeout=60)
    assert result.returncode == 1
    err = result.stderr
    assert re.search(r"stage 'check' replica check-[01] failed while processing an item of "
                     r"type int: ValueError: bad item 17", err), err
    assert "Traceback (most recent call last)" in err
    assert re.search(r'File ".*stages.py", line \d+, in fail_on', err), err
    assert 'raise ValueError(f"bad item {x}")' in err
    assert "zpipe/" not in err.split("Traceback", 1)[1].split("ValueError: bad item 17")[0]


def test_error_in_setup_is_relayed_and_teardown_still_runs(project):
    project.pipeline(three_stages('name = "model"\nrun = "stages:Broken"\n'
                                  'params = { log = "teardown.log" }'), STAGES)
    result = project.launch(timeout=60)
    assert result.returncode == 1
    assert "stage 'model' replica model-0 failed in setup: RuntimeError: model file missing" \
        in result.stderr
    assert project.lines("teardown.log") == ["teardown"]
    assert not project.lines("out.jsonl")  # the source never started


def test_unsendable_item_names_the_stage_and_the_type(project):
    project.pipeline(three_stages('name = "sets"\nrun = "stages:to_set"'), STAGES)
    result = project.launch(timeout=60)
    assert result.returncode == 1
    # A map stage on plain links packs in runs (runs.py), where the output itself is
    # gone by the time msgpack refuses it: the stage and the type refused are named.
    assert re.search(r"stage 'sets' replica sets-0 failed .*EncodeError: cannot send an "
                     r"(item of type dict|output of stage 'sets'): it holds values of type set",
                     result.stderr), result.stderr


@pytest.mark.parametrize("stage, signal_name", [("sigkill_on", "SIGKILL"),
                                                ("segfault_on", "SIGSEGV")])
def test_replica_that_dies_without_a_word_is_detected(project, stage, signal_name):
    project.pipeline(three_stages(f'name = "fragile"\nrun = "stages:{stage}"\nreplicas = 2\n'
                                  f'params = {{ bad = 20 }}'), STAGES)
    started = time.monotonic()
    result = project.launch(timeout=60)
    assert result.returncode == 1
    assert re.search(rf"stage 'fragile' replica fragile-[01] \(pid \d+\) died without a word: "
                     rf"killed by signal \d+ \({signal_name}\)", result.stderr), result.stderr
    assert time.monotonic() - started < 20


def test_replica_killed_from_outside_is_detected(project):
    project.pipeline(toml('name = "source"\nrun = "stages:forever"\nparams = { delay = 0.01 }',
                          'name = "relay"\nrun = "stages:fail_on"\nparams = { bad = -1 }',
                          'name = "sink"\nrun = "stages:record"\nparams = { path = "out.jsonl" }'),
                     STAGES)
    launcher = project.start()
    try:
        wait_until(lambda: len(project.lines("out.jsonl")) > 5, what="items at the sink")
        relay = [p for p in project.processes()
                 if b" relay " in open(f"/proc/{p}/cmdline", "rb").read().replace(b"\0", b" ")]
        assert len(relay) == 1
        os.kill(relay[0], signal.SIGKILL)
    finally:
        code, err = launcher.finish(20)
    assert code == 1
    assert re.search(r"stage 'relay' replica relay-0 \(pid \d+\) died without a word: killed by "
                     r"signal 9 \(SIGKILL\)", err), err


def endless(project) -> None:
    project.pipeline(toml('name = "source"\nrun = "stages:forever"\nparams = { delay = 0.002 }',
                          'name = "relay"\nrun = "stages:fail_on"\nreplicas = 2\n'
                          'params = { bad = -1 }',
                          'name = "sink"\nrun = "stages:record"\nparams = { path = "out.jsonl" }'),
                     STAGES)


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupt_drains_what_is_in_flight(project, signum, code):
    endless(project)
    launcher = project.start()
    try:
        wait_until(lambda: len(project.lines("out.jsonl")) > 50, what="items at the sink")
        launcher.send_signal(signum)
    finally:
        status, err = launcher.finish(30)
    assert status == code, err
    done = dict((name, (received, sent)) for name, received, sent in finished_lines(err))
    sent = done["source"][1]
    assert done["sink"][0] == sent, err
    assert sorted(json.loads(x) for x in project.lines("out.jsonl")) == list(range(sent))


def test_ctrl_c_at_the_terminal_reaches_only_the_launcher(project):
    # A terminal sends SIGINT to the whole foreground process group; replicas
    # must leave it to the launcher so that the drain still happens.
    endless(project)
    launcher = project.start()
    try:
        wait_until(lambda: len(project.lines("out.jsonl")) > 50, what="items at the sink")
        os.killpg(launcher.pid, signal.SIGINT)
    finally:
        status, err = launcher.finish(30)
    assert status == 130, err
    done = dict((name, (received, sent)) for name, received, sent in finished_lines(err))
    assert done["sink"][0] == done["source"][1], err


def stuck(project, grace: float) -> None:
    project.pipeline(toml('name = "source"\nrun = "stages:forever"\nparams = { delay = 0.01 }',
                          'name = "stuck"\nrun = "stages:stuck_on"\nparams = { bad = 5 }',
                          'name = "sink"\nrun = "stages:record"\nparams = { path = "out.jsonl" }',
                          extra=f"grace = {grace}"), STAGES)


def test_grace_period_bounds_the_drain(project):
    stuck(project, grace=1)
    launcher = project.start()
    try:
        wait_until(lambda: len(project.lines("out.jsonl")) >= 5, what="items before the stuck one")
        started = time.monotonic()
        launcher.send_signal(signal.SIGINT)
    finally:
        status, err = launcher.finish(30)
    assert status == 130
    assert "grace period of 1 s over" in err
    assert time.monotonic() - started < 10


def test_second_ctrl_c_kills_at_once(project):
    stuck(project, grace=60)
    launcher = project.start()
    try:
        wait_until(lambda: len(project.lines("out.jsonl")) >= 5, what="items before the stuck one")
        launcher.send_signal(signal.SIGINT)
        launcher.wait_for_stderr("draining for up to 60 s")
        started = time.monotonic()
        launcher.send_signal(signal.SIGINT)
    finally:
        status, err = launcher.finish(10)
    assert status == 130
    assert "killing every stage now" in err
    assert time.monotonic() - started < 5


def test_launcher_killed_takes_its_stages_with_it(project):
    endless(project)
    launcher = project.start()
    try:
        wait_until(lambda: len(project.lines("out.jsonl")) > 10, what="items at the sink")
        assert len(project.processes()) == 5  # the launcher and its four replicas
        launcher.kill()
        wait_until(lambda: not project.processes(), timeout=15, what="stages to exit")
    finally:
        launcher.kill()


def test_stage_without_a_supervisor_gives_up(project, tmp_path):
    endless(project)
    # Before its first contact a replica waits startup_timeout for the supervisor.
    project.write("pipeline.toml", project.read("pipeline.toml").replace(
        'name = "t"', 'name = "t"\nstartup_timeout = 1'))
    env = {**os.environ, "ZPIPE_RUNTIME_DIR": str(tmp_path), "ZPIPE_SUPERVISOR_TIMEOUT": "1"}
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "zpipe", "stage", str(project.toml), "relay",
                             "--replica", "1"], env=env, capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 143
    assert "no word from the supervisor" in result.stderr
    assert time.monotonic() - started < 15
    assert not processes_mentioning(str(project.toml))


def test_inactivity_timeout_from_the_file_stops_a_stall(project):
    project.pipeline(toml('name = "source"\nrun = "stages:numbers"\nparams = { count = 50 }',
                          'name = "stuck"\nrun = "stages:stuck_on"\nparams = { bad = 5 }',
                          'name = "sink"\nrun = "stages:record"\nparams = { path = "out.jsonl" }',
                          extra="inactivity_timeout = 2"), STAGES)
    result = project.launch(timeout=60)
    assert result.returncode == 1
    assert "no item moved for 2 s (inactivity_timeout); stages not finished: stuck, sink" \
        in result.stderr


def test_ctrl_c_during_set_up_stops_at_once(project):
    project.pipeline(toml('name = "source"\nrun = "stages:numbers"\nparams = { count = 5 }',
                          'name = "model"\nrun = "stages:SlowSetup"',
                          'name = "sink"\nrun = "stages:record"\nparams = { path = "out.jsonl" }'),
                     STAGES)
    launcher = project.start()
    try:
        wait_until(lambda: (project.root / "setting-up").exists(), what="set-up to begin")
        started = time.monotonic()
        launcher.send_signal(signal.SIGINT)
    finally:
        status, err = launcher.finish(30)
    assert status == 130, err
    assert time.monotonic() - started < 15
    assert project.lines("teardown.log") == ["teardown"]


def test_startup_timeout_names_the_replicas_not_ready(project):
    project.pipeline(toml('name = "source"\nrun = "stages:numbers"\nparams = { count = 5 }',
                          'name = "model"\nrun = "stages:SlowSetup"',
                          'name = "sink"\nrun = "stages:record"\nparams = { path = "out.jsonl" }',
                          extra="startup_timeout = 1"), STAGES)
    result = project.launch(timeout=60)
    assert result.returncode == 1
    assert "replicas not ready after 1 s: model-0 (in set-up or connecting)" in result.stderr


def test_strangers_on_the_control_socket_never_stop_a_pipeline(project):
    """Without keys anyone may connect to a tcp control address; what they send is
    counted and logged, whatever protocol version or fields it claims."""
    import msgpack
    import zmq
    from test_launcher import free_ports, toml

    control = free_ports(1)[0]
    project.pipeline(toml(
        'name = "source"\nrun = "stages:gated"\nparams = { count = 300 }',
        'name = "relay"\nrun = "stages:fail_on"\nparams = { bad = -1 }',
        'name = "sink"\nrun = "stages:record"\nparams = { path = "out.jsonl" }',
        extra=f'control = "tcp://127.0.0.1:{control}"'), STAGES + GATED)
    launched = project.start()
    launched.wait_for_stderr("replicas ready")
    ctx = zmq.Context()
    messages = [msgpack.packb([1, "hello", {"version": 1}]),            # another version
                msgpack.packb([99, "error", {"message": "forged"}]),
                msgpack.packb([VERSION, "error", {"message": "forged"}]),  # right version
                msgpack.packb([VERSION, "exit", {}]), b"\xc1", b""]
    try:
        for number, identity in enumerate([b"stranger", b"relay-7", b"stranger/hb", None]):
            sock = ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 2000)
            if identity is not None:
                sock.setsockopt(zmq.IDENTITY, identity)
            sock.connect(f"tcp://127.0.0.1:{control}")
            for message in messages:
                sock.send(message)
            sock.close()
        launched.wait_for_stderr("which is not one of this pipeline's replicas")
        wait_until(lambda: launched.stderr.count("is not one of this pipeline's replicas") >= 5,
                   what="the strangers' messages to be reported")
    finally:
        ctx.term()
        (project.root / "go").touch()
    code, err = launched.finish(60)
    assert code == 0, err
    assert len(project.lines("out.jsonl")) == 300
    assert "ignored 24 control message(s) from peers that are not replicas" in err
    assert "VersionMismatch" not in err and "forged" not in err


GATED = """

def gated(count):
    while not os.path.exists("go"):
        time.sleep(0.01)
    yield from range(count)
"""


def test_a_replica_message_with_wrong_fields_is_ignored_not_acted_on(tmp_path):
    """Kinds only the supervisor sends, unknown kinds and fields of the wrong type
    are dropped with a line each; none reaches a handler."""
    import msgpack
    import zmq

    from zpipe.config import PipelineSpec, StageSpec
    from zpipe.supervision.processes import Remote
    from zpipe.supervision.supervisor import Supervisor

    spec = PipelineSpec(name="p", stages=(StageSpec(name="src", run="m:f"),
                                          StageSpec(name="sink", run="m:g")), grace=1)
    address = f"ipc://{tmp_path}/control"
    reports: list[str] = []
    ctx = zmq.Context()
    supervisor = Supervisor(spec, address, Remote(), reports.append, ctx=ctx)
    peer = ctx.socket(zmq.DEALER)
    peer.setsockopt(zmq.IDENTITY, b"sink-0")
    peer.setsockopt(zmq.LINGER, 0)
    peer.connect(address)
    bad = [("exit", {}), ("signal", {}), ("message", {"data": 1}), ("run", {}),
           ("hello", {"pid": "x"}), ("received", {"received": -5}), ("done", {"sent": "many"}),
           ("error", {"message": 3}), ("ready", []), ("heartbeat", {"received": [1]})]
    for kind, fields in bad:
        peer.send(msgpack.packb([VERSION, kind, fields]))
    deadline = time.monotonic() + 10
    while len(reports) < len(bad) and time.monotonic() < deadline:
        supervisor._tick()
    peer.close()
    supervisor.close()
    ctx.term()
    assert len(reports) == len(bad), reports
    assert all(r.startswith("ignored") for r in reports), reports
    assert not supervisor.failures
    sink = supervisor.replicas["sink-0"]
    assert not (sink.exited or sink.done or sink.hello)


LOSSY = """
import time

def numbers(count):
    yield from range(count)

def slow(x):
    time.sleep(0.1)
    return x

def append(x, path):
    with open(path, "a") as out:
        out.write(f"{x}\\n")
"""


@pytest.mark.parametrize("replicas", [1, 2])
def test_an_interrupt_past_the_grace_period_says_what_was_lost(project, replicas):
    """Ctrl-C with a slow stage and many items queued: the grace period runs out,
    and the summary accounts for every item the source sent."""
    project.pipeline(toml(
        'name = "source"\nrun = "stages:numbers"\nparams = { count = 1000 }',
        f'name = "slow"\nrun = "stages:slow"\nreplicas = {replicas}',
        'name = "sink"\nrun = "stages:append"\nparams = { path = "out.txt" }',
        extra="grace = 0.3"), LOSSY)
    launcher = project.start()
    try:
        wait_until(lambda: len(project.lines("out.txt")) >= 2, what="the first items")
        launcher.send_signal(signal.SIGINT)
    finally:
        status, err = launcher.finish(30)
    assert status == 130, err
    sent = re.search(r"stage 'source' (?:finished|stopped): 0 in, (\d+) out", err)
    assert sent, err
    lost = {m[1]: (int(m[2]), int(m[3]), int(m[4])) for m in re.finditer(
        r"stage '(\w+)': (\d+) items lost in flight \((\d+) sent to it and never received, "
        r"(\d+) received and never finished\)", err)}
    unsent = {m[1]: int(m[2]) for m in re.finditer(r"stage '(\w+)': .*?(\d+) of its outputs "
                                                    r"never sent", err)}
    assert "slow" in lost, err
    produced = int(sent[1]) + unsent.get("source", 0)
    written = len(project.lines("out.txt"))
    # Every item the source produced was written, or is in one of the figures.
    accounted = written + sum(n for n, _, _ in lost.values()) + sum(unsent.values())
    assert accounted == produced, err
    total = re.search(r"lost in flight in all: (\d+) entries", err)
    assert total and int(total[1]) == produced - written, err


GIL_HOLDER = """

def numbers(count):
    yield from range(count)

def hold(x):
    if x == 3:
        open("holding", "w").close()
        # One C call that keeps the GIL for minutes: no signal handler or
        # thread of this process runs until it returns.
        sum(range(10**10))
    return x

def sink(x):
    pass
"""


def test_launcher_killed_while_a_replica_holds_the_gil_leaves_nothing(project):
    import tempfile
    import uuid
    from pathlib import Path

    name = f"gil{uuid.uuid4().hex[:8]}"
    project.pipeline(toml('name = "source"\nrun = "stages:numbers"\nparams = { count = 10 }',
                          'name = "hold"\nrun = "stages:hold"',
                          'name = "sink"\nrun = "stages:sink"', name=name), GIL_HOLDER)
    folders = lambda: list(Path(tempfile.gettempdir()).glob(f"zpipe-{name}-*"))  # noqa: E731
    launcher = project.start()
    try:
        wait_until(lambda: (project.root / "holding").exists(), what="the GIL-holding call")
        assert folders()
        launcher.kill()
        killed = time.monotonic()
        wait_until(lambda: not project.processes(), timeout=10, what="every replica to go")
        assert time.monotonic() - killed < 6  # not the minutes of the call
        wait_until(lambda: not folders(), timeout=5, what="the runtime folder to go")
    finally:
        launcher.kill()
