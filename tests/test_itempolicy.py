"""Per-item policies: on_error (skip, dead-letter), max_errors and item_timeout, per shape and end to end."""

from __future__ import annotations

import json
import random
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

import pytest
import zmq
from conftest import wait_until

import zpipe
from zpipe.api.pipeline import Task, spec_from_tasks
from zpipe.errors import ConfigError, EncodeError
from zpipe.replica import shapes
from zpipe.replica.deadletters import read
from zpipe.replica.itempolicy import Tally
from zpipe.replica.runtime import Heartbeat
from zpipe.replica.shapes import Body
from zpipe.replica.stuck import CallWatch
from zpipe.wire import protocol

# -- stages (module level, as users write them) ---------------------------------------

def numbers(count: int = 3) -> Iterator[int]:
    yield from range(count)


def fail_on_two(x):
    if x == 2:
        raise ValueError(f"bad item {x}")
    return x * 10


def explode(x):
    yield x
    if x == 2:
        raise KeyError("half way")
    yield x + 100


def spin_on_one(x):
    if x == 1:
        while True:
            pass
    return x


def stream(items: Iterable[int]) -> Iterator[int]:
    yield from items


class Checker(zpipe.Stage):
    def process(self, item):
        if item == 2 or (isinstance(item, list) and 2 in item):
            raise RuntimeError(f"cannot take {item}")
        return item


class Inputs:
    """Stands in for the runtime's Inbox: the items, and set_get_all's batches."""

    def __init__(self, items: list[Any], batch: int = 2):
        self.items, self.batch = items, batch

    def __iter__(self) -> Iterator[Any]:
        return iter(self.items)

    def batches(self) -> Iterator[list[Any]]:
        for i in range(0, len(self.items), self.batch):
            yield self.items[i:i + self.batch]


def body_of(fn: Any, tmp_path: Path | None = None, **task: Any) -> Body:
    spec = spec_from_tasks([Task(numbers), Task(fn, name="check", **task), Task(stream)],
                           dead_letters=tmp_path / "letters" if tmp_path else None)
    body = Body(shapes.resolve_stage(spec, 1), replica=1, replicas=2)
    body.setup()
    return body


def drive(body: Body, items: list[Any], batch: int = 2) -> tuple[list[Any], list[tuple[str, dict]], int]:
    """Run a body over ``items``: (outputs, control messages sent, end_input calls)."""
    outputs: list[Any] = []
    sent: list[tuple[str, dict]] = []
    ended = []
    if body.errors is not None:
        body.errors.send = lambda kind, **fields: sent.append((kind, fields))
    body.run(Inputs(items, batch), outputs.append, lambda: ended.append(1))
    return outputs, sent, len(ended)


# -- the body, per shape ----------------------------------------------------------------

def test_a_stage_without_on_error_or_item_timeout_keeps_the_bare_loop() -> None:
    body = body_of(fail_on_two)
    assert body.errors is None
    with pytest.raises(ValueError, match="bad item 2"):
        drive(body, [1, 2, 3])


def test_skip_reports_the_item_and_goes_on_with_the_next() -> None:
    outputs, sent, ended = drive(body_of(fail_on_two, on_error="skip"), [1, 2, 3, 2])
    assert outputs == [10, 30]
    assert ended == 4  # a skipped item still closes its number (ordered stages)
    assert [kind for kind, _ in sent] == [protocol.ITEM_ERROR] * 2
    fields = sent[0][1]
    assert (fields["exc_type"], fields["message"], fields["item_type"], fields["action"],
            fields["count"]) == ("ValueError", "bad item 2", "int", "skipped", 1)
    assert "in fail_on_two" in fields["traceback"] and "shapes.py" not in fields["traceback"]
    assert sent[1][1]["count"] == 2
    for kind, fields in sent:  # what the supervisor accepts
        assert protocol.unpack(protocol.pack(kind, **fields)) == (kind, fields)


def test_a_plain_generator_keeps_what_it_yielded_before_it_raised(tmp_path: Path) -> None:
    body = body_of(explode, tmp_path, on_error="dead-letter", stream=False)
    outputs, sent, ended = drive(body, [1, 2, 3])
    assert outputs == [1, 101, 2, 3, 103] and ended == 3
    [record] = read(tmp_path / "letters" / "check.msgpack").records
    assert (record["item"], record["stage"], record["replica"], record["exc_type"]) == \
        (2, "check", 1, "KeyError")
    assert "half way" in record["message"] and "in explode" in record["traceback"]
    assert sent[0][1]["action"] == "dead-lettered"


def test_a_stage_class_item_and_a_set_get_all_batch_are_dead_lettered(tmp_path: Path) -> None:
    outputs, _, _ = drive(body_of(Checker, tmp_path, on_error="dead-letter"), [1, 2, 3])
    assert outputs == [1, 3]
    outputs, sent, ended = drive(body_of(Checker().set_get_all(), tmp_path,
                                         on_error="dead-letter"), [0, 1, 2, 3, 4], batch=2)
    assert outputs == [[0, 1], [4]] and ended == 3
    assert sent[0][1]["item_type"] == "list"
    records = read(tmp_path / "letters" / "check.msgpack").records
    assert [r["item"] for r in records] == [2, [2, 3]]  # the batch is the item


def test_fail_and_interrupts_are_never_taken_for_a_bad_item() -> None:
    with pytest.raises(ValueError):
        drive(body_of(fail_on_two, on_error="fail"), [2])

    def interrupted(x):
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        drive(body_of(interrupted, on_error="skip"), [1])


def test_an_output_that_cannot_be_sent_is_still_the_stage_s_failure() -> None:
    body = body_of(fail_on_two, on_error="skip")

    def refuse(item):
        raise EncodeError("cannot send a set")
    with pytest.raises(EncodeError):
        body.run(Inputs([1]), refuse)


@pytest.mark.parametrize("field, value", [("on_error", "skip"), ("item_timeout", 5.0)])
def test_per_item_fields_are_refused_where_items_cannot_be_told_apart(field: str, value: Any
                                                                      ) -> None:
    with pytest.raises(ConfigError, match=f"stage 'check': field '{field}': a stream function "
                                          f"gets all its items in one call"):
        body_of(stream, **{field: value})
    spec = spec_from_tasks([Task(numbers, **{field: value}), Task(stream)])
    with pytest.raises(ConfigError, match=f"field '{field}': the first stage has no input"):
        shapes.resolve_spec(spec)


# -- stuck calls ----------------------------------------------------------------------------

class FakeSocket:
    """The heartbeat socket, as CallWatch.check uses it."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, dict]] = []

    def send(self, data: bytes) -> None:
        self.sent.append(protocol.unpack(data))

    def poll(self, timeout: int = 0) -> int:
        return 0


def watching(watch: CallWatch, sock: FakeSocket, stop: threading.Event) -> threading.Thread:
    """What the heartbeat thread does, only far more often."""
    def loop() -> None:
        while not stop.is_set():
            watch.check(sock)
            time.sleep(0.001)
    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    return thread


def test_a_stuck_python_call_is_reported_with_its_stack_interrupted_and_skipped() -> None:
    body = body_of(spin_on_one, on_error="skip", item_timeout=0.3)
    assert body.errors is not None and body.errors.watch is not None
    sock, stop = FakeSocket(), threading.Event()
    watcher = watching(body.errors.watch, sock, stop)
    try:
        started = time.monotonic()
        outputs, sent, ended = drive(body, [0, 1, 2])
        assert time.monotonic() - started < 5
    finally:
        stop.set()
        watcher.join(5)
    assert outputs == [0, 2] and ended == 3
    [(kind, stuck)] = sock.sent
    assert kind == protocol.STUCK and stuck["action"] == "interrupting"
    assert stuck["item_type"] == "int" and stuck["seconds"] > 0.3 and stuck["limit"] == 0.3
    assert "in spin_on_one" in stuck["stack"] and "while True" in stuck["stack"]
    assert "/zpipe/" not in stuck["stack"]  # only the user's frames
    [(_, error)] = sent
    assert error["exc_type"] == "zpipe.StuckCall" and "past item_timeout = 0.3 s" in error["message"]


def test_an_interrupt_never_lands_outside_the_user_s_call() -> None:
    # Calls just around the limit, and a watcher looking all the time: whatever
    # the timing, an interrupt is either taken inside the call or never raised.
    def busy(x):
        until = time.monotonic() + x
        while time.monotonic() < until:
            pass
        return x
    body = body_of(busy, on_error="skip", item_timeout=0.003)
    sock, stop = FakeSocket(), threading.Event()
    rng = random.Random(7)
    items = [rng.uniform(0.0, 0.006) for _ in range(300)]
    switching = sys.getswitchinterval()
    sys.setswitchinterval(0.0002)  # the watcher gets the GIL often, at any instruction
    watcher = watching(body.errors.watch, sock, stop)
    try:
        outputs, sent, ended = drive(body, items)
    finally:
        stop.set()
        watcher.join(5)
        sys.setswitchinterval(switching)
    assert ended == len(items) and len(outputs) + len(sent) == len(items)
    assert sent, "some calls overran, and were interrupted"
    assert body.errors.watch.started is None and not body.errors.watch.interrupting


def test_the_heartbeat_says_how_long_the_call_in_progress_has_run() -> None:
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.bind("inproc://beats")
    watch = CallWatch("check", "check-0", limit=60.0, interrupt=True)
    beat = Heartbeat(ctx, "inproc://beats", "check-0", lambda: {"received": 1}, 60.0,
                     on_lost=lambda: None, watch=watch)
    beat.start()
    try:
        def beat_fields() -> dict:
            assert router.poll(5000)
            identity, data = router.recv_multipart()
            router.send_multipart([identity, protocol.pack(protocol.PING)])
            kind, fields = protocol.unpack(data)
            assert identity == b"check-0/hb" and kind == protocol.HEARTBEAT
            return fields
        assert beat_fields()["call_started_ago"] is None
        watch.begin("item")
        watch.started -= 2.5
        ago = beat_fields()["call_started_ago"]
        assert isinstance(ago, float) and 2.5 <= ago < 10
    finally:
        beat.stop()
        beat.join(5)
        beat.close()
        router.close(0)
        ctx.term()


def test_the_new_control_messages_are_checked_like_the_others() -> None:
    good = {protocol.ITEM_ERROR: {"exc_type": "ValueError", "message": "m", "traceback": None,
                                  "item_type": "int", "action": "skipped", "count": 3},
            protocol.STUCK: {"item_type": "int", "seconds": 2.5, "stack": "s",
                             "action": "failing", "limit": 2.0},
            protocol.HEARTBEAT: {"received": 1, "sent": 1, "call_started_ago": None}}
    for kind, fields in good.items():
        assert protocol.unpack(protocol.pack(kind, **fields)) == (kind, fields)
    for kind, field, value in ((protocol.ITEM_ERROR, "count", "3"),
                               (protocol.ITEM_ERROR, "count", -1),
                               (protocol.STUCK, "seconds", "long"),
                               (protocol.HEARTBEAT, "call_started_ago", "now")):
        with pytest.raises(ValueError, match=f"field '{field}'"):
            protocol.unpack(protocol.pack(kind, **{**good[kind], field: value}))


def test_the_supervisor_tally_says_a_few_in_full_then_a_line_a_second_and_fails_past_the_limit(
        ) -> None:
    tally = Tally({"check": 5}, {"check": None})
    fields = {"exc_type": "ValueError", "message": "bad", "traceback": "Traceback: here\n",
              "item_type": "int", "action": "skipped", "count": 1}
    said = [tally.item_error("check", "check-0", fields) for _ in range(6)]
    lines = [line for line, _ in said]
    assert all("Traceback: here" in line for line in lines[:3])
    assert lines[3] is None and lines[4] is None  # within the second
    assert [f is None for _, f in said] == [True] * 5 + [False]
    failure = said[5][1]
    assert failure.stage == "check" and "more than max_errors = 5" in failure.describe()
    assert tally.summary() == ["stage 'check': 6 item(s) skipped"]


# -- the Python API (threads: each replica's watch is its own thread's) -------------------

def record_to(items: Iterable, path: str) -> None:
    with open(path, "w") as out:
        for item in items:
            out.write(json.dumps(item) + "\n")


def test_zpipe_run_counts_skipped_items_on_the_outcome_and_interrupts_a_thread(tmp_path: Path
                                                                               ) -> None:
    out = tmp_path / "out.txt"
    outcome = zpipe.run([Task(numbers, params={"count": 6}),
                         Task(spin_on_one, name="spin", on_error="skip", item_timeout=1.0),
                         Task(fail_on_two, name="check", on_error="skip"),
                         Task(record_to, params={"path": str(out)})], mode="thread")
    assert outcome.item_errors == {"check": 1, "spin": 1}
    assert [json.loads(x) for x in out.read_text().split()] == [0, 30, 40, 50]


# -- end to end: `zpipe launch` ------------------------------------------------------------

STAGES = """
import json, os, random, time
from typing import Iterable

import zpipe


def numbers(count):
    yield from range(count)


def poison(x, bad=3):
    if x % bad == 0:
        raise ValueError(f"poison {x}")
    return x


def evens_fail(x):
    time.sleep(random.random() * 0.004)  # replicas finish in any order
    if x % 2 == 0:
        raise ValueError(f"even {x}")
    return x


class Checker(zpipe.Stage):
    def process(self, item):
        if item % 5 == 0:
            raise LookupError(f"not found: {item}")
        return item


def spin(x):
    if x == 2:
        while True:
            pass
    return x


def nap(x):
    if x == 2:
        time.sleep(1000)
    return x


def record(items: Iterable, path):
    with open(path, "w") as out:
        for item in items:
            out.write(json.dumps(item) + "\\n")
            out.flush()
"""


def pipeline(middle: str, count: int = 20) -> str:
    return f"""
        [pipeline]
        name = "policies"

        [[stages]]
        name = "source"
        run = "stages:numbers"
        params = {{ count = {count} }}

        [[stages]]
        name = "check"
        {middle}

        [[stages]]
        name = "sink"
        run = "stages:record"
        params = {{ path = "out.txt" }}
        """


def sink(project) -> list[int]:
    return [json.loads(line) for line in project.lines("out.txt")]


def test_launch_skips_a_poison_item_and_says_so(project) -> None:
    project.pipeline(pipeline('run = "stages:poison"\non_error = "skip"'), STAGES)
    result = project.launch()
    assert result.returncode == 0, result.stderr
    assert sink(project) == [x for x in range(20) if x % 3]
    err = result.stderr
    assert "stage 'check' replica check-0: an item of type int failed and was skipped " \
           "(ValueError: poison 0)" in err
    assert 'raise ValueError(f"poison {x}")' in err  # the first few with their traceback
    assert "stage 'check': 7 item(s) skipped" in err  # the count at the end
    assert not (project.root / "dead-letters").exists()


def test_launch_dead_letters_from_a_replicated_stage_class(project) -> None:
    project.pipeline(pipeline('run = "stages:Checker"\non_error = "dead-letter"\nreplicas = 2',
                              count=40), STAGES)
    result = project.launch()
    assert result.returncode == 0, result.stderr
    assert sorted(sink(project)) == [x for x in range(40) if x % 5]
    records = read(project.root / "dead-letters" / "check.msgpack").records
    assert sorted(r["item"] for r in records) == list(range(0, 40, 5))
    assert {r["exc_type"] for r in records} == {"LookupError"}
    assert {r["replica"] for r in records} <= {0, 1}
    assert "stage 'check': 8 item(s) dead-lettered (in " in result.stderr


def test_an_ordered_stage_never_stalls_on_a_skipped_item(project) -> None:
    project.pipeline(pipeline('run = "stages:evens_fail"\non_error = "skip"\nreplicas = 2\n'
                              'ordered = true', count=60), STAGES)
    result = project.launch("--grace", "1")
    assert result.returncode == 0, result.stderr
    assert sink(project) == list(range(1, 60, 2))  # every other item, in order


def test_more_failed_items_than_max_errors_fail_the_run(project) -> None:
    project.pipeline(pipeline('run = "stages:poison"\non_error = "dead-letter"\nmax_errors = 2'),
                     STAGES)
    result = project.launch()
    assert result.returncode == 1, result.stderr
    assert "stage 'check' replica check-0 failed" in result.stderr
    assert "3 items failed, more than max_errors = 2" in result.stderr


def test_a_stuck_python_loop_is_interrupted_and_skipped(project) -> None:
    project.pipeline(pipeline('run = "stages:spin"\non_error = "skip"\nitem_timeout = 1',
                              count=5), STAGES)
    result = project.launch()
    assert result.returncode == 0, result.stderr
    assert sink(project) == [0, 1, 3, 4]
    err = result.stderr
    assert "stage 'check' replica check-0: stuck: a call on an item of type int ran for" in err
    assert "past item_timeout = 1 s; interrupting" in err
    assert ", in spin\n    while True:" in err
    assert "failed and was skipped (zpipe.StuckCall" in err


def test_a_call_stuck_in_c_code_fails_the_run_in_time_naming_its_frame(project) -> None:
    project.pipeline(pipeline('run = "stages:nap"\nitem_timeout = 1', count=5), STAGES)
    started = time.monotonic()
    result = project.launch()
    took = time.monotonic() - started
    assert result.returncode == 1, result.stderr
    assert took < 1 + 8, took  # item_timeout, a heartbeat, the abort and its SIGTERM
    err = result.stderr
    assert "stage 'check' replica check-0 failed while processing an item of type int: " \
           "zpipe.StuckCall: a call on an item of type int ran for" in err
    assert "past item_timeout = 1 s" in err
    assert ", in nap\n    time.sleep(1000)" in err
    wait_until(lambda: not project.processes(), timeout=10, what="every replica to end")


def test_validate_refuses_on_error_on_a_stream_function_before_anything_runs(project) -> None:
    project.pipeline(pipeline('run = "stages:record"\nparams = { path = "x" }\n'
                              'on_error = "skip"'), STAGES)
    result = project.run("validate", str(project.toml))
    assert result.returncode == 2
    assert "stage 'check': field 'on_error': a stream function gets all its items in one " \
           "call, so an exception (or a stuck call) cannot be told to belong to one item" \
           in result.stderr


def test_a_call_that_will_not_come_back_from_c_code_is_dead_lettered_and_its_process_ended(
        project) -> None:
    project.pipeline(pipeline('run = "stages:nap"\non_error = "dead-letter"\nitem_timeout = 1',
                              count=5), STAGES)
    result = project.launch()
    assert result.returncode == 1, result.stderr
    err = result.stderr
    assert "stuck: a call on an item of type int ran for" in err and "; interrupting" in err
    assert "; ending the process" in err
    assert "stage 'check' replica check-0 was ended: a call on an item of type int ran for" in err
    assert "did not come back when interrupted (inside C code?)" in err
    [record] = read(project.root / "dead-letters" / "check.msgpack").records
    assert record["item"] == 2 and record["exc_type"] == "zpipe.StuckCall"
    assert "time.sleep(1000)" in record["traceback"]
