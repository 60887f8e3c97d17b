"""`zpipe launch` end to end: items, replicas, order, drain, shapes, addresses, output, memory."""

from __future__ import annotations

import collections
import json
import re
import socket

STAGES = """
import json, os, time
from typing import Iterable

import numpy as np
import zpipe


def numbers(count, delay=0.0):
    for i in range(count):
        if delay:
            time.sleep(delay)
        yield i


def square(x):
    return {"value": x * x, "square_pid": os.getpid()}


def relay(item):
    return item


def record(items: Iterable, path):
    with open(path, "w") as out:
        for item in items:
            out.write(json.dumps(item) + "\\n")


def odd_only(x):
    return x if x % 2 else None


def explode(x):
    for k in range(3):
        yield [x, k]


def batches(items, size):
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


class Scale(zpipe.Stage):
    def __init__(self, factor, log):
        self.factor = factor
        self.log = log

    def setup(self):
        with open(self.log, "a") as f:
            f.write(f"setup {os.getpid()}\\n")

    def process(self, item):
        return item * self.factor

    def teardown(self):
        with open(self.log, "a") as f:
            f.write(f"teardown {os.getpid()}\\n")


def frames(count):
    for i in range(count):
        yield {"i": i, "image": np.full((48, 64, 3), i % 256, dtype=np.uint8),
               "meta": (i, "x"), "weights": np.arange(i % 5, dtype=np.float32)}


def brighten(frame):
    frame["image"] += 1  # received arrays are writable
    frame["mean"] = float(frame["image"].mean())
    return frame


def check_frames(items: Iterable, path):
    with open(path, "w") as out:
        for f in items:
            ok = (f["image"].shape == (48, 64, 3) and f["image"].dtype == np.uint8
                  and f["mean"] == (f["i"] + 1) % 256 and f["meta"] == [f["i"], "x"]
                  and f["weights"].dtype == np.float32 and len(f["weights"]) == f["i"] % 5)
            out.write(json.dumps([f["i"], ok]) + "\\n")


def chatty(x):
    print(f"hello from {x}")
    import logging
    logging.getLogger("team").info("logged %s", x)
    return x


def uneven(x):
    time.sleep((x * 7919 % 13) / 2000)  # replicas overtake each other
    return None if x % 4 == 0 else x


def head(items, n):
    for i, item in enumerate(items):
        if i == n:
            return
        yield item
"""


def toml(*stages: str, name: str = "t", extra: str = "") -> str:
    head = f'[pipeline]\nname = "{name}"\n{extra}\n'
    return head + "\n".join(f"[[stages]]\n{s.strip()}\n" for s in stages)


def finished_lines(stderr: str) -> list[tuple[str, int, int]]:
    return [(m[1], int(m[2]), int(m[3]))
            for m in re.finditer(r"stage '([\w-]+)' finished: (\d+) in, (\d+) out", stderr)]


def test_every_item_arrives_once_through_replicas(project):
    project.pipeline(toml(
        'name = "source"\nrun = "stages:numbers"\nparams = { count = 3000 }',
        'name = "square"\nrun = "stages:square"\nreplicas = 3',
        'name = "relay"\nrun = "stages:relay"\nreplicas = 2\nhwm = 20',
        'name = "sink"\nrun = "stages:record"\nparams = { path = "out.jsonl" }'), STAGES)
    result = project.launch()
    assert result.returncode == 0, result.stderr
    items = [json.loads(line) for line in project.lines("out.jsonl")]
    assert sorted(i["value"] for i in items) == [x * x for x in range(3000)]
    # Spread fairly: each of the three replicas did a real share.
    shares = collections.Counter(i["square_pid"] for i in items)
    assert len(shares) == 3 and min(shares.values()) > 3000 / 6, shares
    # Stages finish in flow order, each having received what the previous sent.
    done = finished_lines(result.stderr)
    assert [d[0] for d in done] == ["source", "square", "relay", "sink"]
    assert [d[1] for d in done[1:]] == [d[2] for d in done[:-1]] == [3000, 3000, 3000]


def test_order_is_kept_with_single_replicas(project):
    project.pipeline(toml(
        'name = "source"\nrun = "stages:numbers"\nparams = { count = 2000 }',
        'name = "a"\nrun = "stages:relay"\nhwm = 5',
        'name = "b"\nrun = "stages:relay"',
        'name = "sink"\nrun = "stages:record"\nparams = { path = "out.jsonl" }'), STAGES)
    result = project.launch()
    assert result.returncode == 0, result.stderr
    assert [json.loads(line) for line in project.lines("out.jsonl")] == list(range(2000))


def test_filters_one_to_many_and_batching_stream_functions(project):
    project.pipeline(toml(
        'name = "source"\nrun = "stages:numbers"\nparams = { count = 1000 }',
        'name = "odd"\nrun = "stages:odd_only"\nreplicas = 2',
        'name = "explode"\nrun = "stages:explode"\nstream = false',
        'name = "batch"\nrun = "stages:batches"\nparams = { size = 7 }\nreplicas = 2',
        'name = "sink"\nrun = "stages:record"\nparams = { path = "out.jsonl" }'), STAGES)
    result = project.launch()
    assert result.returncode == 0, result.stderr
    batches = [json.loads(line) for line in project.lines("out.jsonl")]
    flat = sorted(tuple(pair) for batch in batches for pair in batch)
    assert flat == sorted((x, k) for x in range(1, 1000, 2) for k in range(3))
    assert all(len(b) <= 7 for b in batches)
    # Each batching replica flushes its partial batch at the end: at most two short ones.
    assert sum(len(b) < 7 for b in batches) <= 2


def test_class_stage_sets_up_and_tears_down_once_per_replica(project):
    project.pipeline(toml(
        'name = "source"\nrun = "stages:numbers"\nparams = { count = 500 }',
        'name = "scale"\nrun = "stages:Scale"\nreplicas = 2\nparams = { factor = 3, log = "life.log" }',
        'name = "sink"\nrun = "stages:record"\nparams = { path = "out.jsonl" }'), STAGES)
    result = project.launch()
    assert result.returncode == 0, result.stderr
    assert sorted(json.loads(x) for x in project.lines("out.jsonl")) == [3 * x for x in range(500)]
    events = [line.split() for line in project.lines("life.log")]
    pids = {pid for _, pid in events}
    assert len(pids) == 2
    for pid in pids:
        assert [e for e, p in events if p == pid] == ["setup", "teardown"]


def test_numpy_arrays_anywhere_in_items(project):
    project.pipeline(toml(
        'name = "source"\nrun = "stages:frames"\nparams = { count = 300 }',
        'name = "brighten"\nrun = "stages:brighten"\nreplicas = 2',
        'name = "sink"\nrun = "stages:check_frames"\nparams = { path = "out.jsonl" }'), STAGES)
    result = project.launch()
    assert result.returncode == 0, result.stderr
    checks = sorted(json.loads(line) for line in project.lines("out.jsonl"))
    assert checks == [[i, True] for i in range(300)]


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_tcp_addresses_from_the_file(project):
    control, sink = free_ports(2)
    relay = next(p for p in free_ports(20) if p + 1 not in (control, sink) and port_is_free(p + 1))
    project.pipeline(toml(
        'name = "source"\nrun = "stages:numbers"\nparams = { count = 500 }',
        f'name = "relay"\nrun = "stages:relay"\nreplicas = 2\naddress = "tcp://127.0.0.1:{relay}"',
        f'name = "sink"\nrun = "stages:record"\nparams = {{ path = "out.jsonl" }}\n'
        f'address = "tcp://127.0.0.1:{sink}"',
        extra=f'control = "tcp://127.0.0.1:{control}"'), STAGES)
    plan = project.run("validate", str(project.toml))
    assert plan.returncode == 0, plan.stderr
    assert f"tcp://127.0.0.1:{relay}, tcp://127.0.0.1:{relay + 1}" in plan.stdout
    result = project.launch()
    assert result.returncode == 0, result.stderr
    assert sorted(json.loads(x) for x in project.lines("out.jsonl")) == list(range(500))


def test_stage_output_reaches_the_terminal_prefixed(project):
    project.pipeline(toml(
        'name = "source"\nrun = "stages:numbers"\nparams = { count = 3 }',
        'name = "talk"\nrun = "stages:chatty"',
        'name = "sink"\nrun = "stages:relay"'), STAGES)
    result = project.launch()
    assert result.returncode == 0, result.stderr
    for i in range(3):
        assert re.search(rf"^talk-0 +\| hello from {i}$", result.stdout, re.M), result.stdout
        assert re.search(rf"^talk-0 +\| INFO team: logged {i}$", result.stderr, re.M), result.stderr


def test_empty_source_and_single_stage_pipelines(project):
    project.pipeline(toml(
        'name = "source"\nrun = "stages:numbers"\nparams = { count = 0 }',
        'name = "relay"\nrun = "stages:relay"\nreplicas = 2',
        'name = "sink"\nrun = "stages:record"\nparams = { path = "out.jsonl" }'), STAGES)
    result = project.launch()
    assert result.returncode == 0, result.stderr
    assert project.lines("out.jsonl") == []
    project.pipeline(toml('name = "only"\nrun = "stages:numbers"\nparams = { count = 10 }'))
    result = project.launch()
    assert result.returncode == 0, result.stderr
    assert finished_lines(result.stderr) == [("only", 0, 10)]


def test_stream_function_that_stops_early_is_reported_not_hung(project):
    project.pipeline(toml(
        'name = "source"\nrun = "stages:numbers"\nparams = { count = 100 }',
        'name = "head"\nrun = "stages:head"\nparams = { n = 10 }',
        'name = "sink"\nrun = "stages:record"\nparams = { path = "out.jsonl" }'), STAGES)
    result = project.launch()
    assert result.returncode == 0, result.stderr
    assert [json.loads(x) for x in project.lines("out.jsonl")] == list(range(10))
    assert "89 later items were discarded" in result.stderr


PROGRESS_STAGES = """
import os, time
from typing import Iterable

def produce(count, progress, gap_file, size):
    widest = 0
    for i in range(count):
        try:
            done = int(open(progress).read() or 0)
        except (FileNotFoundError, ValueError):
            done = 0
        widest = max(widest, i - done)
        yield b"x" * size
    with open(gap_file, "w") as f:
        f.write(str(widest))

def relay(item):
    return item

def slow_sink(items: Iterable, progress, delay):
    for n, item in enumerate(items, 1):
        time.sleep(delay)
        tmp = progress + ".tmp"
        with open(tmp, "w") as f:
            f.write(str(n))
        os.replace(tmp, progress)
"""


def test_slow_sink_bounds_what_is_in_flight(project):
    # A fast source and a slow sink: with HWM 5 per link, the source can only
    # ever be a few dozen items ahead; without backpressure it would be ~400.
    project.pipeline(toml(
        'name = "source"\nrun = "stages:produce"\n'
        'params = { count = 400, progress = "progress", gap_file = "gap", size = 100000 }',
        'name = "relay"\nrun = "stages:relay"\nhwm = 5',
        'name = "sink"\nrun = "stages:slow_sink"\nhwm = 5\n'
        'params = { progress = "progress", delay = 0.005 }'), PROGRESS_STAGES)
    result = project.launch()
    assert result.returncode == 0, result.stderr
    assert int(project.read("progress")) == 400
    gap = int(project.read("gap"))
    assert gap < 60, f"source ran {gap} items ahead of the sink"


def test_ordered_stage_keeps_input_order_across_replicas(project):
    project.pipeline(toml(
        'name = "source"\nrun = "stages:numbers"\nparams = { count = 500 }',
        'name = "uneven"\nrun = "stages:uneven"\nreplicas = 3\nordered = true',
        'name = "sink"\nrun = "stages:record"\nparams = { path = "out.jsonl" }'), STAGES)
    result = project.launch()
    assert result.returncode == 0, result.stderr
    assert [json.loads(x) for x in project.lines("out.jsonl")] == \
        [x for x in range(500) if x % 4]
    # Order markers for filtered items are accounted for, not shown as items.
    assert ("uneven", 500, 375) in finished_lines(result.stderr)


def start_replicas(project, env) -> list:
    """Every replica as its own `zpipe stage` process, as containers would run them."""
    import subprocess
    import sys
    procs = []
    for stage, replicas in (("source", 1), ("relay", 2), ("sink", 1)):
        for i in range(replicas):
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "zpipe", "stage", str(project.toml), stage,
                 "--replica", str(i)], cwd=project.root, env=env,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return procs


def separate_processes(project, count: int, source: str = "numbers") -> dict:
    import os
    control, sink = free_ports(2)
    relay = next(p for p in free_ports(20) if p + 1 not in (control, sink) and port_is_free(p + 1))
    project.pipeline(toml(
        f'name = "source"\nrun = "stages:{source}"\nparams = {{ count = {count} }}',
        'name = "relay"\nrun = "stages:relay"\nreplicas = 2\naddress = "tcp://127.0.0.1:1"',
        f'name = "sink"\nrun = "stages:record"\nparams = {{ path = "out.jsonl" }}\n'
        f'address = "tcp://127.0.0.1:{sink}"',
        extra=f'control = "tcp://127.0.0.1:{control}"'), STAGES + """
def endless(count):
    import itertools
    for i in itertools.count():
        time.sleep(0.002)
        yield i


def paced(count):
    for i in range(count):
        if i == count // 2:
            open("half", "w").close()
        time.sleep(0.002)
        yield i
""")
    # The file's relay address is a placeholder: the environment overrides it.
    return {**os.environ, "ZPIPE_ADDRESS_RELAY": f"tcp://127.0.0.1:{relay}"}


def test_supervise_alone_with_replicas_started_separately(project):
    import subprocess
    import sys
    env = separate_processes(project, 2000)
    supervisor = subprocess.Popen([sys.executable, "-m", "zpipe", "supervise", str(project.toml)],
                                  cwd=project.root, env=env, stderr=subprocess.PIPE, text=True)
    replicas = start_replicas(project, env)
    try:
        _, err = supervisor.communicate(timeout=60)
        codes = [p.wait(30) for p in replicas]
    finally:
        for p in [supervisor, *replicas]:
            p.kill()
    assert supervisor.returncode == 0, err
    assert codes == [0, 0, 0, 0], [p.stderr.read() for p in replicas]
    assert "replica relay-1 joined from" in err
    assert sorted(json.loads(x) for x in project.lines("out.jsonl")) == list(range(2000))


def test_supervise_reports_a_replica_that_vanishes_and_stops_the_rest(project):
    import os
    import signal
    import subprocess
    import sys

    from conftest import wait_until
    env = separate_processes(project, 0, source="endless")
    supervisor = subprocess.Popen([sys.executable, "-m", "zpipe", "supervise", str(project.toml)],
                                  cwd=project.root, env=env, stderr=subprocess.PIPE, text=True)
    replicas = start_replicas(project, env)
    try:
        wait_until(lambda: len(project.lines("out.jsonl")) > 20, what="items at the sink")
        os.kill(replicas[3].pid, signal.SIGKILL)  # sink-0's host goes away: one replica
        _, err = supervisor.communicate(timeout=30)
        codes = [p.wait(30) for p in replicas]
    finally:
        for p in [supervisor, *replicas]:
            p.kill()
    assert supervisor.returncode == 1
    # Its connection dropped (ZeroMQ's heartbeats, liveness.py): said at once.
    assert re.search(r"stage 'sink' replica sink-0 \(pid \d+\) lost its connection: its "
                     r"process ended, or did not answer ZeroMQ's heartbeats", err), err
    assert codes[3] == -signal.SIGKILL and all(c is not None for c in codes)


def test_supervise_goes_on_when_one_of_several_replicas_vanishes(project):
    """relay has 2 replicas and restart = "no": relay-0's host going away costs
    nothing; what it held goes to relay-1 (at least once)."""
    import json
    import os
    import signal
    import subprocess
    import sys

    from conftest import wait_until
    env = separate_processes(project, 3000, source="paced")
    supervisor = subprocess.Popen([sys.executable, "-m", "zpipe", "supervise", str(project.toml)],
                                  cwd=project.root, env=env, stderr=subprocess.PIPE, text=True)
    replicas = start_replicas(project, env)
    try:
        wait_until(lambda: (project.root / "half").exists(), what="half the items sent")
        os.kill(replicas[1].pid, signal.SIGKILL)  # relay-0's host goes away
        _, err = supervisor.communicate(timeout=60)
        codes = [p.wait(30) for p in replicas]
    finally:
        for p in [supervisor, *replicas]:
            p.kill()
    assert supervisor.returncode == 0, err
    assert "replica relay-0 lost its connection: its process ended, or did not answer " \
           "ZeroMQ's heartbeats for 3 s (frozen, or its host is gone); stage 'relay' goes on " \
           "with 1 replica(s)" in err
    got = [json.loads(line) for line in project.lines("out.jsonl")]
    assert sorted(set(got)) == list(range(3000))  # every item, some perhaps twice
    redelivered = re.search(r"stage 'relay': 0 restart\(s\); (\d+) item\(s\) sent to it again", err)
    assert redelivered and len(got) - 3000 <= int(redelivered[1]), err
    assert codes[1] == -signal.SIGKILL and codes[0] == codes[2] == codes[3] == 0


SIZED = """
def sized(sizes, repeat=1):
    for _ in range(repeat):
        for n in sizes:
            yield "x" * n
"""


def test_max_message_size_refuses_an_oversized_item_by_name(project):
    project.pipeline(toml(
        'name = "source"\nrun = "stages:sized"\nparams = { sizes = [10, 100, 5000, 10] }',
        'name = "sink"\nrun = "stages:record"\nparams = { path = "out.jsonl" }\n'
        'max_message_size = 1000'), STAGES + SIZED)
    result = project.launch()
    assert result.returncode == 1
    assert re.search(r"stage 'source' replica source-0 failed while running: "
                     r"zpipe.errors.EncodeError: an item of 500\d bytes is larger than stage "
                     r"'sink' accepts \(max_message_size 1000\)", result.stderr), result.stderr


def test_batches_stay_under_the_next_stages_max_message_size(project):
    # 400 items of 300 bytes would share messages far above 1000 bytes, which
    # ZeroMQ would refuse (dropping the connection); they must be split instead.
    project.pipeline(toml(
        'name = "source"\nrun = "stages:sized"\nparams = { sizes = [300], repeat = 400 }',
        'name = "sink"\nrun = "stages:record"\nparams = { path = "out.jsonl" }\n'
        'max_message_size = 1000'), STAGES + SIZED)
    result = project.launch()
    assert result.returncode == 0, result.stderr
    assert len(project.lines("out.jsonl")) == 400


def test_the_output_pump_closes_while_it_is_ending_on_its_own():
    # close() sets `closing` and wakes the pump; the pump, seeing `closing` with no
    # stream left, ends and closes its wake pipe. Its select made to return at once
    # (as a timeout would), it ends in the window between the two: the wake must
    # not go to a closed pipe (EBADF), nor to whatever took its descriptor.
    import io
    import threading

    from zpipe.supervision.launcher import OutputPump

    for _ in range(50):
        pump = OutputPump(io.BytesIO(), io.BytesIO())
        pump.selector.select = lambda timeout=None: []
        pump.start()
        errors: list[BaseException] = []
        closer = threading.Thread(target=lambda: _close_catching(pump, errors))
        closer.start()
        closer.join(10)
        pump.join(10)
        assert not errors and not pump.is_alive()


def _close_catching(pump, errors: list[BaseException]) -> None:
    try:
        pump.close(5.0)
    except BaseException as exc:  # noqa: BLE001 - the test reports it
        errors.append(exc)
