"""Runs of a map stage (replica/runs.py): what the per-item loop guaranteed, still so."""

from __future__ import annotations

import json
import time

import pytest
import zmq
from test_launcher import toml

from zpipe.replica.control import Control
from zpipe.replica.inbox import Inbox
from zpipe.replica.outbox import Outbox
from zpipe.replica.runs import Runs
from zpipe.wire import codec

STAGES = """
import json, os, time
from typing import Iterable

import numpy as np


def numbers(count):
    yield from range(count)


def two_bursts(count, first, flag):
    # first items, then (once the sink has them, and the relay's Flusher has
    # fallen idle: it looks every 5 ms) the rest in a burst.
    yield from range(first)
    deadline = time.monotonic() + 30
    while not os.path.exists(flag):
        if time.monotonic() > deadline:
            raise TimeoutError("the first burst never reached the sink")
        time.sleep(0.01)
    time.sleep(0.1)
    yield from range(first, count)


def mixed(count, odd_at):
    # ints, and at odd_at a str: a failure there must name str, not int
    for i in range(count):
        yield str(i) if i == odd_at else i


def fail_on_str(x):
    if isinstance(x, str):
        raise ValueError(f"bad item {x}")
    return x


BUFFER = np.zeros(32768, dtype=np.int64)  # 256 kB: a frame of its own


def reuse_buffer(x):
    # One array filled anew for each item: each output must still arrive as it
    # was when returned (the next call must not come before it has left).
    BUFFER[:] = x
    return BUFFER


def camera(count):
    # One buffer, filled anew for each frame (as a camera's driver would): the
    # source must not be resumed before the frame it yielded has left.
    for i in range(count):
        BUFFER[:] = i
        yield BUFFER


def small_then_big(count, first):
    # Small items at first (the runs grow), then bytes too large for one: the
    # source goes on item by item, and resumes where it was.
    for i in range(count):
        yield i if i < first else i.to_bytes(8, "little") * 200


def small_then_arrays(x, first):
    # Small outputs at first (the runs grow), then arrays that make frames: a frame
    # cuts a run in the middle of a message, and the stage goes on item by item.
    return x if x < first else np.full(32768, x, dtype=np.int64)


def stop_at(x, at):
    if x == at:
        raise StopIteration  # not an end of input: the run must not swallow it
    return x


def wait_for_sink(x, at, flag):
    # A long call in the middle of a run, ending only once the sink has what came
    # before it: outputs held until the run's end would never get there.
    deadline = time.monotonic() + 30
    while x == at and not os.path.exists(flag):
        if time.monotonic() > deadline:
            raise TimeoutError(f"the outputs before {at} never left during the call")
        time.sleep(0.01)
    return x


def keep_odd(x):
    return x if x % 2 else None


def keep_below(x, limit):
    return x if x < limit else None


def arrays_sink(items: Iterable, path):
    with open(path, "w") as out:
        for item in items:
            out.write(json.dumps([int(item.min()), int(item.max()), len(item)]) + "\\n")


def sizes_sink(items: Iterable, path):
    with open(path, "w") as out:
        json.dump([["bytes", len(x)] if type(x) is bytes else ["int", x] for x in items], out)


def mixed_sink(items: Iterable, path):
    with open(path, "w") as out:
        json.dump([int(item.max()) if hasattr(item, "max") else item for item in items], out)


def ints_sink(items: Iterable, path, flags=()):
    seen, flags = [], dict(flags)
    for item in items:
        seen.append(item)
        if len(seen) in flags:
            open(flags[len(seen)], "w").close()
    with open(path, "w") as out:
        json.dump(seen, out)
"""


def launch(project, source: str, relay: str, sink: str, hwm: int = 1000):
    """``zpipe launch`` of source -> relay -> sink (each a [[stages]] body), STAGES."""
    project.pipeline(toml(source, relay, sink, extra=f"hwm = {hwm}"), STAGES)
    return project.launch(timeout=60)


def test_every_item_arrives_in_order_and_none_is_no_output(project):
    result = launch(project, 'name = "source"\nrun = "stages:numbers"\nparams = { count = 20000 }',
                    'name = "odd"\nrun = "stages:keep_odd"',
                    'name = "sink"\nrun = "stages:ints_sink"\nparams = { path = "out" }')
    assert result.returncode == 0, result.stderr
    assert json.loads(project.read("out")) == list(range(1, 20000, 2))


@pytest.mark.parametrize("restart", [False, True])
def test_a_run_that_ends_in_none_outputs_lets_the_pipeline_end(project, restart):
    # The last 5,000 calls return None: on a leased link (restart on) every input
    # is still acknowledged, though no output follows them, and the run ends.
    lease = '\nrestart = "on-failure"' if restart else ""
    result = launch(project, 'name = "source"\nrun = "stages:numbers"\nparams = { count = 20000 }',
                    f'name = "cut"\nrun = "stages:keep_below"\nparams = {{ limit = 15000 }}{lease}',
                    'name = "sink"\nrun = "stages:ints_sink"\nparams = { path = "out" }',
                    hwm=2)  # a sender waits on acknowledgements after two messages
    assert result.returncode == 0, result.stderr
    assert json.loads(project.read("out")) == list(range(15000))
    assert "stage 'cut' finished: 20000 in, 15000 out" in result.stderr, result.stderr


@pytest.mark.parametrize("source, relay", [
    ("numbers", "reuse_buffer"),  # a map stage returns the same array, refilled
    ("camera", "fail_on_str"),    # a source yields the same array, refilled
])
def test_an_array_reused_by_its_stage_arrives_as_it_was_given(project, source, relay):
    result = launch(project,
                    f'name = "source"\nrun = "stages:{source}"\nparams = {{ count = 300 }}',
                    f'name = "relay"\nrun = "stages:{relay}"',
                    'name = "sink"\nrun = "stages:arrays_sink"\nparams = { path = "out" }',
                    hwm=4)
    assert result.returncode == 0, result.stderr
    got = [json.loads(line) for line in project.lines("out")]
    assert got == [[i, i, 32768] for i in range(300)]


def test_a_source_whose_items_grow_goes_on_item_by_item(project):
    result = launch(project, 'name = "source"\nrun = "stages:small_then_big"\n'
                    'params = { count = 3000, first = 2000 }',
                    'name = "relay"\nrun = "stages:fail_on_str"',
                    'name = "sink"\nrun = "stages:sizes_sink"\nparams = { path = "out" }')
    assert result.returncode == 0, result.stderr
    assert json.loads(project.read("out")) == [["int", i] for i in range(2000)] + \
        [["bytes", 1600]] * 1000


@pytest.mark.parametrize("restart", [False, True])
def test_a_frame_cuts_a_run_and_the_rest_goes_item_by_item(project, restart):
    # With restart on, the input is leased: the cut message's items must each be
    # finished once, or the source waits forever for its acknowledgement.
    lease = '\nrestart = "on-failure"' if restart else ""
    result = launch(project, 'name = "source"\nrun = "stages:numbers"\nparams = { count = 2000 }',
                    'name = "grow"\nrun = "stages:small_then_arrays"\n'
                    f'params = {{ first = 1500 }}{lease}',
                    'name = "sink"\nrun = "stages:mixed_sink"\nparams = { path = "out" }')
    assert result.returncode == 0, result.stderr
    assert json.loads(project.read("out")) == list(range(2000))


def test_a_failure_names_the_item_it_came_from(project):
    result = launch(project, 'name = "source"\nrun = "stages:mixed"\n'
                    'params = { count = 5000, odd_at = 3000 }',
                    'name = "check"\nrun = "stages:fail_on_str"',
                    'name = "sink"\nrun = "stages:ints_sink"\nparams = { path = "out" }')
    assert result.returncode == 1
    assert "stage 'check' replica check-0 failed while processing an item of type str: " \
           "ValueError: bad item 3000" in result.stderr, result.stderr


def test_stop_iteration_from_the_call_fails_the_run_instead_of_ending_it(project):
    result = launch(project, 'name = "source"\nrun = "stages:numbers"\nparams = { count = 5000 }',
                    'name = "stop"\nrun = "stages:stop_at"\nparams = { at = 2500 }',
                    'name = "sink"\nrun = "stages:ints_sink"\nparams = { path = "out" }')
    assert result.returncode == 1, result.stderr
    assert "stage 'stop' replica stop-0 failed while processing an item of type int" \
        in result.stderr, result.stderr
    assert "StopIteration" in result.stderr


def test_outputs_before_a_slow_call_leave_during_it(project):
    # 10..99 come in a burst to a relay whose Flusher is idle; the runs have grown
    # past one item by then (1, 2, 4, 8, then 16 and 32 items), so 40's long
    # call sits in the middle of a run, after 26..39.
    result = launch(project, 'name = "source"\nrun = "stages:two_bursts"\n'
                    'params = { count = 100, first = 10, flag = "first" }',
                    'name = "slow"\nrun = "stages:wait_for_sink"\n'
                    'params = { at = 40, flag = "seen" }',
                    'name = "sink"\nrun = "stages:ints_sink"\n'
                    'params = { path = "out", flags = [[10, "first"], [40, "seen"]] }')
    assert result.returncode == 0, result.stderr
    assert json.loads(project.read("out")) == list(range(100))


def spin(seconds: float) -> None:
    """Busy in 'user code', holding the GIL as a stage's Python would."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


@pytest.mark.parametrize("drop", [0, 3, 1], ids=["every-output", "none-for-a-third",
                                               "none-for-all"])
def test_runs_lose_and_repeat_nothing_while_the_flusher_takes_batches(drop):
    # Runs append without the lock while the Flusher sends a count of outputs and
    # drops those: pauses of every length around BATCH_WAIT, inside runs. A None
    # output (``drop``: for every drop-th item) is packed in the run and must be
    # left out of whatever message takes it, the Flusher's too, and not counted.
    ctx = zmq.Context()
    try:
        sockets = {}
        for name in ("in", "out"):
            pull, push = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
            pull.setsockopt(zmq.RCVHWM, 0)
            push.setsockopt(zmq.SNDHWM, 0)
            pull.bind(f"inproc://runs-{name}")
            push.connect(f"inproc://runs-{name}")
            sockets[name] = pull, push
        dealer = ctx.socket(zmq.DEALER)
        dealer.connect("inproc://nobody")
        control = Control(dealer)
        count = 40_000
        for start in range(0, count, 500):
            batch = codec.Batch()
            for i in range(start, start + 500):
                batch.add(i)
            sockets["in"][1].send_multipart(batch.frames())
        inbox = Inbox(sockets["in"][0], control, "relay", 1000)
        outbox = Outbox(sockets["out"][1], control, source=False)
        sizes = []

        def process(x: int) -> int:
            if x % 37 == 0:
                spin((x % 5) * 0.0004)
            if x == count - 1:
                control.stopped = True  # the input ends after this item
            return None if drop and x % drop == 0 else x

        runner = Runs(inbox, outbox, "relay")
        take = inbox.take_run
        inbox.take_run = lambda limit: sizes.append(limit) or take(limit)
        try:
            assert runner.map(process) is True
            outbox.flush()
        finally:
            outbox.close()
        expected = [x for x in range(count) if not drop or x % drop]
        items = []
        pull = sockets["out"][0]
        while len(items) < len(expected) and pull.poll(5000 if expected else 200):
            message = codec.decode(pull.recv_multipart())
            assert message, "an empty message was sent"
            items.extend(message)
        assert items == expected
        assert not pull.poll(0)  # and nothing more
        assert (outbox.sent, outbox.unsent()) == (len(expected), 0)
        assert max(sizes) > 16  # runs of many items were taken
    finally:
        ctx.destroy(linger=0)


def test_runs_of_a_few_items_out_of_a_long_message_come_in_order():
    # A slow stage takes runs of one out of a 1,000-item message: those are
    # taken from the front, one at a time, and the rest stays in order behind.
    ctx = zmq.Context()
    try:
        pull, push = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
        pull.bind("inproc://take-run")
        push.connect("inproc://take-run")
        dealer = ctx.socket(zmq.DEALER)
        dealer.connect("inproc://nobody")
        batch = codec.Batch()
        for i in range(1000):
            batch.add(i)
        push.send_multipart(batch.frames())
        inbox = Inbox(pull, Control(dealer), "slow", 10)
        taken = []
        for limit in (1, 1, 3, 100, 1, 250, 1000):
            run = inbox.take_run(limit)
            assert len(run) == min(limit, 1000 - len(taken))
            taken += run
        assert taken == list(range(1000))
        assert not inbox.buffer
    finally:
        ctx.destroy(linger=0)
