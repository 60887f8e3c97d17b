"""Replicas that die: restarted, or replaced by their siblings, and nothing accepted is lost."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from typing import Callable, Iterable

import pytest
from conftest import processes_mentioning, wait_until
from test_launcher import toml

import zpipe

STAGES = """
import os, time

def numbers(count, pause=0.0005):
    for i in range(count):
        if i == count // 2:
            open("half", "w").close()
        time.sleep(pause)
        yield i

def relay(x):
    return x

def raise_once(x, at):
    if x == at and not os.path.exists("raised"):
        open("raised", "w").close()
        raise ValueError(f"cannot take {x} (this life only)")
    return x

def die_at_once(x):
    os._exit(3)

def die_on(x, bad):
    if x == bad:
        os._exit(9)  # a poison item: it ends whichever replica takes it
    return x

def record(x, path):
    with open(path, "a") as f:
        f.write(f"{x}\\n")
"""


def replica_pids(project, stage: str, replica: int = 0) -> list[int]:
    return [pid for pid in processes_mentioning(f"{project.toml} {stage}")
            if f"--replica {replica} " in _cmdline(pid)]


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def kill_at_half(project, stage: str, replica: int = 0) -> None:
    """SIGKILL that replica once the source has sent half its items."""
    wait_until(lambda: (project.root / "half").exists(), what="half the items sent")
    pids = wait_until(lambda: replica_pids(project, stage, replica), what=f"{stage}-{replica}")
    os.kill(pids[0], signal.SIGKILL)


def lines(project) -> list[int]:
    return [int(x) for x in project.lines("out.txt")]


def test_a_killed_replica_is_restarted_and_nothing_is_lost(project):
    project.pipeline(toml(
        'name = "source"\nrun = "stages:numbers"\nparams = { count = 4000 }',
        'name = "relay"\nrun = "stages:relay"\nrestart = "on-failure"',
        'name = "sink"\nrun = "stages:record"\nparams = { path = "out.txt" }'), STAGES)
    launched = project.start()
    kill_at_half(project, "relay")
    code, err = launched.finish(60)
    assert code == 0, err
    assert "restarting replica relay-0 in 0.1 s: it was killed by signal 9 (SIGKILL)" in err
    assert "replica relay-0 is back (life 2)" in err
    got = lines(project)
    assert sorted(set(got)) == list(range(4000))  # every item at least once
    again = re.search(r"stage 'relay': 1 restart\(s\); (\d+) item\(s\) sent to it again", err)
    assert again, err
    assert len(got) - 4000 <= int(again[1])  # duplicates only from what was sent again


def test_a_sender_restarted_after_its_receiver_was_sends_to_its_new_life(project):
    """relay2 dies and comes back (a later generation), then relay1, its sender, does:
    relay1's new life must learn relay2's generation (WELCOME), or everything it
    sends is dropped as meant for an earlier life."""
    project.pipeline(toml(
        'name = "source"\nrun = "stages:numbers"\nparams = { count = 6000, pause = 0.001 }',
        'name = "relay1"\nrun = "stages:relay"\nrestart = "on-failure"',
        'name = "relay2"\nrun = "stages:relay"\nrestart = "on-failure"',
        'name = "sink"\nrun = "stages:record"\nparams = { path = "out.txt" }'), STAGES)
    launched = project.start()
    wait_until(lambda: len(project.lines("out.txt")) > 500, what="items at the sink")
    os.kill(wait_until(lambda: replica_pids(project, "relay2"))[0], signal.SIGKILL)
    launched.wait_for_stderr("replica relay2-0 is back (life 2)")
    seen = len(project.lines("out.txt"))
    wait_until(lambda: len(project.lines("out.txt")) > seen + 200, what="items flowing again")
    os.kill(wait_until(lambda: replica_pids(project, "relay1"))[0], signal.SIGKILL)
    code, err = launched.finish(90)
    assert code == 0, err
    assert "replica relay1-0 is back (life 2)" in err
    assert sorted(set(lines(project))) == list(range(6000))


def test_a_replica_that_raises_is_restarted_and_its_item_sent_again(project):
    project.pipeline(toml(
        'name = "source"\nrun = "stages:numbers"\nparams = { count = 1000 }',
        'name = "relay"\nrun = "stages:raise_once"\nparams = { at = 300 }\n'
        'restart = "on-failure"',
        'name = "sink"\nrun = "stages:record"\nparams = { path = "out.txt" }'), STAGES)
    result = project.launch(timeout=60)
    assert result.returncode == 0, result.stderr
    # The exception is told in full, then the restart, with it as the cause.
    assert "stage 'relay' replica relay-0 failed while processing an item of type int: " \
           "ValueError: cannot take 300 (this life only)" in result.stderr
    assert "restarting replica relay-0 in 0.1 s: it raised ValueError: cannot take 300" \
           in result.stderr
    assert sorted(set(lines(project))) == list(range(1000))


def test_a_replica_that_dies_every_time_is_flapping(project):
    project.pipeline(toml(
        'name = "source"\nrun = "stages:numbers"\nparams = { count = 100 }',
        'name = "relay"\nrun = "stages:die_at_once"\nrestart = "on-failure"\nmax_restarts = 2',
        'name = "sink"\nrun = "stages:record"\nparams = { path = "out.txt" }'), STAGES)
    result = project.launch(timeout=60)
    assert result.returncode == 1
    assert "restarting replica relay-0 in 0.1 s" in result.stderr
    assert "restarting replica relay-0 in 0.2 s" in result.stderr  # the backoff doubles
    assert "stage 'relay' replica relay-0 is flapping: it died 3 times within 60 s " \
           "(max_restarts = 2); the last time it exited with status 3" in result.stderr


def test_an_item_that_kills_its_replica_goes_to_dead_letters_not_round_and_round(project):
    """With on_error = "dead-letter", an item that ends its replica each time (a
    crash, not an exception) is found by working through what was sent again
    item by item, and then dead-lettered: the run goes on."""
    import json
    project.pipeline(toml(
        'name = "source"\nrun = "stages:numbers"\nparams = { count = 1000 }',
        'name = "relay"\nrun = "stages:die_on"\nparams = { bad = 300 }\n'
        'restart = "on-failure"\non_error = "dead-letter"',
        'name = "sink"\nrun = "stages:record"\nparams = { path = "out.txt" }'), STAGES)
    result = project.launch(timeout=90)
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("restarting replica relay-0") == 2
    assert re.search(r"stage 'relay': item \d+ of message \d+ from source-0#0 it ended replica "
                     r"relay-0 twice \(the last time it exited with status 9\): it will be "
                     r"dead-lettered", result.stderr), result.stderr
    assert sorted(set(lines(project))) == [x for x in range(1000) if x != 300]
    listing = project.run("dead-letters", "dead-letters")
    assert listing.returncode == 0 and "zpipe.PoisonItem" in listing.stdout, listing.stdout
    shown = project.run("dead-letters", "dead-letters", "--show", "1")
    assert "300" in shown.stdout, shown.stdout
    assert json  # (the item is in the file, readable as the listing shows)


def test_siblings_take_over_a_lost_replica_s_work(project):
    project.pipeline(toml(
        'name = "source"\nrun = "stages:numbers"\nparams = { count = 4000 }',
        'name = "relay"\nrun = "stages:relay"\nreplicas = 3',
        'name = "sink"\nrun = "stages:record"\nparams = { path = "out.txt" }'), STAGES)
    launched = project.start()
    kill_at_half(project, "relay", 1)
    code, err = launched.finish(60)
    assert code == 0, err
    assert "replica relay-1 was killed by signal 9 (SIGKILL); stage 'relay' goes on with 2 " \
           "replica(s)" in err
    assert sorted(set(lines(project))) == list(range(4000))


def test_a_restarted_source_starts_over(project):
    project.pipeline(toml(
        'name = "source"\nrun = "stages:numbers"\nparams = { count = 2000 }\n'
        'restart = "on-failure"',
        'name = "sink"\nrun = "stages:record"\nparams = { path = "out.txt" }'), STAGES)
    launched = project.start()
    kill_at_half(project, "source")
    code, err = launched.finish(60)
    assert code == 0, err
    assert "restarting replica source-0" in err
    got = lines(project)
    assert sorted(set(got)) == list(range(2000))
    assert got.count(0) == 2  # it started over: the first items came again


def test_a_restarted_sink_gets_what_its_last_life_had_not_finished(project):
    project.pipeline(toml(
        'name = "source"\nrun = "stages:numbers"\nparams = { count = 4000 }',
        'name = "relay"\nrun = "stages:relay"',
        'name = "sink"\nrun = "stages:record"\nparams = { path = "out.txt" }\n'
        'restart = "on-failure"'), STAGES)
    launched = project.start()
    kill_at_half(project, "sink")
    code, err = launched.finish(60)
    assert code == 0, err
    assert sorted(set(lines(project))) == list(range(4000))


# -- from Python ----------------------------------------------------------------------------

def numbers(count):
    yield from range(count)


def exit_once(x, flag):
    if x == 50 and not os.path.exists(flag):
        open(flag, "w").close()
        os._exit(4)  # a process dies without a word
    return x


def raise_in_thread_once(x, flag):
    if x == 50 and not os.path.exists(flag):
        open(flag, "w").close()
        raise RuntimeError("once")
    return x


def collect(items: Iterable, path):
    with open(path, "w") as out:
        for item in items:
            out.write(f"{item}\n")


@pytest.mark.parametrize("mode, stage", [("process", exit_once), ("thread", raise_in_thread_once)])
def test_run_restarts_a_replica_in_either_mode(tmp_path, mode, stage):
    out = tmp_path / "out.txt"
    outcome = zpipe.run([zpipe.Task(numbers, params={"count": 500}),
                         zpipe.Task(stage, params={"flag": str(tmp_path / "flag")},
                                    name="flaky", restart="on-failure"),
                         zpipe.Task(collect, params={"path": str(out)})], mode=mode)
    assert outcome.status == "ok" and outcome.restarts == {"flaky": 1}
    assert sorted({int(x) for x in out.read_text().split()}) == list(range(500))


# -- replicas started elsewhere (containers) -------------------------------------------------

def supervised_relay(project, count: int, control: int | None = None
                     ) -> tuple[Callable[[str], subprocess.Popen], subprocess.Popen]:
    """source -> relay (restart on) -> sink on tcp, under `zpipe supervise`, each
    replica started as a container engine would: a way to start one, and the
    supervisor (started)."""
    from test_launcher import free_ports

    ports = free_ports(3 if control is None else 2)
    control = ports.pop() if control is None else control
    relay, sink = ports
    project.pipeline(toml(
        f'name = "source"\nrun = "stages:numbers"\nparams = {{ count = {count}, '
        f'pause = 0.001 }}',
        f'name = "relay"\nrun = "stages:relay"\nrestart = "on-failure"\n'
        f'address = "tcp://127.0.0.1:{relay}"',
        f'name = "sink"\nrun = "stages:record"\nparams = {{ path = "out.txt" }}\n'
        f'address = "tcp://127.0.0.1:{sink}"',
        extra=f'control = "tcp://127.0.0.1:{control}"'), STAGES)
    zpipe_cmd = [sys.executable, "-m", "zpipe"]

    def replica(stage: str) -> subprocess.Popen:
        return subprocess.Popen([*zpipe_cmd, "stage", str(project.toml), stage],
                                cwd=project.root)
    supervisor = subprocess.Popen([*zpipe_cmd, "supervise", str(project.toml)],
                                  cwd=project.root, stderr=subprocess.PIPE, text=True)
    return replica, supervisor


def test_a_new_life_whose_heartbeat_comes_before_its_hello_is_welcomed(project):
    """A replica started again by its host: its heartbeat thread may speak before its
    main thread says hello. That beat is not the dead life waking up (which is told
    ABORT): the hello that follows is answered with WELCOME, and the run goes on."""
    import msgpack
    import zmq
    from test_launcher import free_ports

    from zpipe.wire.codec import PROTOCOL_VERSION

    control = free_ports(1)[0]
    replica, supervisor = supervised_relay(project, 3000, control)
    said: list[str] = []
    reader = threading.Thread(target=lambda: said.extend(supervisor.stderr), daemon=True)
    reader.start()
    procs = {name: replica(name) for name in ("source", "relay", "sink")}
    ctx = zmq.Context()
    main = ctx.socket(zmq.DEALER)
    beat = ctx.socket(zmq.DEALER)
    try:
        wait_until(lambda: (project.root / "half").exists(), what="half the items sent")
        procs["relay"].kill()
        procs["relay"].wait(10)
        wait_until(lambda: any("waiting up to" in line for line in said),
                   what="the supervisor noticing the death")
        monitor = main.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED)
        for sock, identity in ((main, b"relay-0"), (beat, b"relay-0/hb")):
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.IDENTITY, identity)
            sock.connect(f"tcp://127.0.0.1:{control}")
        # The main connection is up before the beat: an answer to the beat could reach it.
        assert monitor.poll(20_000), "the main connection did not come up"
        main.disable_monitor()
        monitor.close(0)
        # The next life, as its threads would: a beat first, then the hello.
        beat.send(msgpack.packb([PROTOCOL_VERSION, "heartbeat", {"received": 0, "sent": 0}]))
        main.send(msgpack.packb([PROTOCOL_VERSION, "hello",
                                 {"pid": os.getpid(), "host": "test", "version":
                                  PROTOCOL_VERSION}]))
        assert main.poll(20_000), "no answer to the hello"
        _, kind, fields = msgpack.unpackb(main.recv())
        assert kind == "welcome", (kind, fields)
        main.close()
        beat.close()
        # That life ends at once (its connection drops); the real one comes back.
        procs["relay"] = replica("relay")
        supervisor.wait(60)
        reader.join(10)
        err = "".join(said)
        codes = [p.wait(30) for p in procs.values()]
    finally:
        main.close()
        beat.close()
        ctx.term()
        for p in [supervisor, *procs.values()]:
            p.kill()
    assert supervisor.returncode == 0, err
    assert codes == [0, 0, 0]
    assert sorted(set(lines(project))) == list(range(3000))


def test_a_replica_started_again_by_its_host_rejoins(project):
    """Under `zpipe supervise`, the container engine restarts what dies: the new
    replica says hello under the same name and takes its place."""
    replica, supervisor = supervised_relay(project, 4000)
    procs = {name: replica(name) for name in ("source", "relay", "sink")}
    try:
        wait_until(lambda: (project.root / "half").exists(), what="half the items sent")
        procs["relay"].kill()
        procs["relay"].wait(10)
        procs["relay"] = replica("relay")  # what `restart: on-failure` in compose does
        _, err = supervisor.communicate(timeout=60)
        codes = [p.wait(30) for p in procs.values()]
    finally:
        for p in [supervisor, *procs.values()]:
            p.kill()
    assert supervisor.returncode == 0, err
    assert codes == [0, 0, 0]
    assert "replica relay-0 is back (life 2)" in err
    assert sorted(set(lines(project))) == list(range(4000))
