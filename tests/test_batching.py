"""batch = { max_items, max_wait_ms }: lists of waiting items, one output per item, errors per item."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any, Iterable, Iterator

import pytest
import zmq
from conftest import wait_until
from test_launcher import toml

import zpipe
from zpipe.api.pipeline import Task, spec_from_tasks
from zpipe.errors import ConfigError
from zpipe.replica import inbox as inbox_module
from zpipe.replica import shapes
from zpipe.replica.control import Control
from zpipe.replica.deadletters import read
from zpipe.replica.inbox import Inbox
from zpipe.replica.shapes import Body
from zpipe.wire import codec, protocol

# -- stages (module level, as users write them) ---------------------------------------


def numbers(count: int = 3) -> Iterator[int]:
    yield from range(count)


def doubled_but_sevens(items):
    return [None if x % 7 == 0 else 2 * x for x in items]


def fail_on_bad(items):
    if "bad" in items:
        raise ValueError("cannot take 'bad'")
    return [x * 10 for x in items]


class Scaler(zpipe.Stage):
    def __init__(self, factor=3):
        self.factor = factor

    def process(self, items):
        return [x * self.factor for x in items]


def short(items):
    return items[:-1]


def as_tuple(items):
    return tuple(items)


def stream(items: Iterable[int]) -> Iterator[int]:
    yield from items


def plain_generator(x):
    yield x


async def coroutine(items):
    return items


class Lists:
    """Stands in for the runtime's Inbox: lists of at most ``limit`` items."""

    def __init__(self, items: list[Any]):
        self.items = list(items)
        self.asked: list[tuple[int | None, float]] = []
        self.last_item: Any = None

    def __iter__(self) -> Iterator[Any]:
        return iter(self.items)

    def batches(self, limit: int | None = None, wait: float = 0.0) -> Iterator[list[Any]]:
        self.asked.append((limit, wait))
        while self.items:
            chunk, self.items = self.items[:limit], self.items[limit:]
            self.last_item = chunk
            yield chunk


def body_of(fn: Any, tmp_path: Path | None = None, **task: Any) -> Body:
    task.setdefault("batch", {"max_items": 3, "max_wait_ms": 7})
    spec = spec_from_tasks([Task(numbers), Task(fn, name="check", **task), Task(stream)],
                           dead_letters=tmp_path / "letters" if tmp_path else None)
    body = Body(shapes.resolve_stage(spec, 1), replica=0, replicas=1)
    body.setup()
    return body


def drive(body: Body, items: list[Any]) -> tuple[list[Any], list[tuple[str, dict]], Lists]:
    outputs: list[Any] = []
    sent: list[tuple[str, dict]] = []
    if body.errors is not None:
        body.errors.send = lambda kind, **fields: sent.append((kind, fields))
    inputs = Lists(items)
    body.run(inputs, outputs.append)
    return outputs, sent, inputs


# -- the body ------------------------------------------------------------------------------


def test_a_batched_call_gets_lists_bounded_by_max_items_and_sends_one_output_per_item():
    outputs, _, inputs = drive(body_of(doubled_but_sevens), list(range(1, 16)))
    assert inputs.asked == [(3, 0.007)]  # max_items, and max_wait_ms in seconds
    # None drops that one item (7 and 14), every other has its own output, in order.
    assert outputs == [2 * x for x in range(1, 16) if x % 7]


def test_a_stage_class_is_batched_too():
    outputs, _, _ = drive(body_of(Scaler, params={"factor": 5}), [1, 2, 3, 4])
    assert outputs == [5, 10, 15, 20]


@pytest.mark.parametrize("fn, pattern", [
    (short, r"stage 'check': a batched call on a list of 3 item\(s\) returned a list of 2 "),
    (as_tuple, r"stage 'check': a batched call on a list of 3 item\(s\) returned tuple, "
               r"not a list of 3"),
])
def test_a_wrong_length_or_a_non_list_fails_the_stage_saying_so(fn, pattern):
    error = ValueError if fn is short else TypeError
    with pytest.raises(error, match=pattern):
        drive(body_of(fn), [1, 2, 3])
    # ... whatever on_error says: it is the stage's bug, not an item's.
    with pytest.raises(error, match=pattern):
        drive(body_of(fn, on_error="skip"), [1, 2, 3])


def test_a_failing_batch_is_tried_item_by_item_and_only_the_poison_is_skipped():
    outputs, sent, _ = drive(body_of(fail_on_bad, on_error="skip"), [1, "bad", 2, 3, 4, 5])
    assert outputs == [10, 20, 30, 40, 50]
    assert [kind for kind, _ in sent] == [protocol.ITEM_ERROR]
    fields = sent[0][1]
    assert (fields["item_type"], fields["exc_type"], fields["count"]) == ("str", "ValueError", 1)


def test_the_poison_of_a_failing_batch_is_dead_lettered_alone(tmp_path: Path):
    outputs, _, _ = drive(body_of(fail_on_bad, tmp_path, on_error="dead-letter"),
                          [1, 2, "bad", 3])
    assert outputs == [10, 20, 30]
    [record] = read(tmp_path / "letters" / "check.msgpack").records
    assert (record["item"], record["exc_type"]) == ("bad", "ValueError")


def test_with_on_error_fail_the_poison_fails_the_stage_named_by_its_type():
    outputs: list[Any] = []
    inputs = Lists([1, "bad", 2])
    with pytest.raises(ValueError, match="cannot take 'bad'"):
        body_of(fail_on_bad).run(inputs, outputs.append)
    assert inputs.last_item == "bad"  # the replica's report names a str, not a list
    assert outputs == [10]  # the item before it, tried alone, went on


def test_an_ordered_stage_closes_each_item_of_a_batch():
    ended: list[int] = []
    inputs = Lists([7, 1, 2])
    inputs.batch_seqs = [10, 11, 12]
    outputs: list[Any] = []
    body = body_of(doubled_but_sevens)
    body.run(inputs, lambda out: outputs.append((inputs.seq, out)),
             lambda: ended.append(inputs.seq))
    assert ended == [10, 11, 12]  # one end per item, the filtered one included
    assert outputs == [(11, 2), (12, 4)]


@pytest.mark.parametrize("fn, task, pattern", [
    (stream, {}, r"stage 'check': field 'batch': a stream function takes its items itself"),
    (plain_generator, {"stream": False}, r"field 'batch': a plain generator yields any number"),
    (coroutine, {}, r"field 'batch': the callable is an async def"),
    (doubled_but_sevens, {"input": "latest"}, r"fields 'batch' and 'input = \"latest\"'"),
])
def test_batch_is_refused_where_it_cannot_work(fn, task, pattern):
    spec = spec_from_tasks([Task(numbers), Task(fn, name="check", batch={"max_items": 4},
                                                **task), Task(stream)])
    with pytest.raises(ConfigError, match=pattern):
        shapes.resolve_stage(spec, 1)


def test_validate_refuses_batch_on_a_stream_function_before_anything_starts(project):
    project.pipeline(toml('name = "source"\nrun = "stages:numbers"',
                          'name = "sum"\nrun = "stages:stream"\nbatch = { max_items = 4 }'),
                     "from typing import Iterable\n\n"
                     "def numbers():\n    yield from range(3)\n\n"
                     "def stream(items: Iterable[int]):\n    yield sum(items)\n")
    for command in ("validate", "launch"):
        result = project.run(command, str(project.toml))
        assert result.returncode == 2, result.stderr
        assert "stage 'sum': field 'batch': a stream function" in result.stderr


# -- the inbox: a real deadline on the socket ---------------------------------------------


@pytest.fixture
def wired():
    """An Inbox on a PULL socket fed over inproc, its control a DEALER to a ROUTER."""
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.bind("inproc://supervisor")
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.IDENTITY, b"batcher-0")
    dealer.connect("inproc://supervisor")
    pull, push = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
    pull.bind("inproc://input")
    push.connect("inproc://input")
    inbox = Inbox(pull, Control(dealer), "batcher", 100)
    yield inbox, push, router
    ctx.destroy(linger=0)


def test_a_batch_takes_what_waits_at_once_and_more_until_its_deadline(wired, monkeypatch):
    # A wait woken only by its timeout would be found out: make that a minute.
    monkeypatch.setattr(inbox_module, "IDLE_POLL_MS", 60_000)
    inbox, push, router = wired
    for i in range(5):
        push.send_multipart(codec.encode([i]))
    lists = inbox.batches(limit=3, wait=60.0)
    # Three wait: a full list at once, without waiting for the deadline.
    assert next(lists) == [0, 1, 2]
    # Two wait: the list is not full, so it waits (a minute at most) for more;
    # the item sent meanwhile joins it and fills it.
    got: list = []
    taker = threading.Thread(target=lambda: got.append(next(lists)), daemon=True)
    taker.start()
    # Once it has taken in 3 and 4 it waits on the socket, with two items of three.
    wait_until(lambda: inbox.received == 5, 10, what="items 3 and 4 to be taken in")
    push.send_multipart(codec.encode([5]))
    taker.join(10)
    assert got == [[3, 4, 5]]
    assert (inbox.batches_taken, inbox.batched) == (2, 6)


def test_the_wait_for_more_ends_at_its_deadline_and_serves_stop(wired):
    inbox, push, router = wired
    push.send_multipart(codec.encode(["a"]))
    lists = inbox.batches(limit=10, wait=0.05)
    assert next(lists) == ["a"]  # alone, once the 50 ms were over
    # A STOP while it waits for more ends the wait, and the input after it.
    push.send_multipart(codec.encode(["b"]))
    router.send_multipart([b"batcher-0", protocol.pack(protocol.STOP)])
    got = list(inbox.batches(limit=10, wait=600.0))
    assert got == [["b"]]
    assert inbox.control.stopped


def test_set_get_all_still_takes_everything_waiting_without_waiting(wired):
    inbox, push, router = wired
    push.send_multipart(codec.encode([1, 2]))
    push.send_multipart(codec.encode([3]))
    inbox.control.stopped = True  # ends once empty; no wait ever
    # both messages are taken in (below batch_limit), and the list holds all
    assert list(inbox.batches()) == [[1, 2, 3]]


# -- end to end ------------------------------------------------------------------------


STAGES = """
import json, os

def numbers(count):
    for i in range(count):
        yield i if i != 13 else "bad"

def batched(items, path):
    with open(path, "a") as out:
        out.write(json.dumps([len(items), "bad" in items]) + "\\n")
    if "bad" in items:
        raise ValueError("cannot take 'bad'")
    return [None if x % 10 == 9 else x * 2 for x in items]

def record(x, path):
    with open(path, "a") as out:
        out.write(json.dumps(x) + "\\n")
"""


def _batched_pipeline(project, on_error: str, count: int = 200, replicas: int = 1) -> None:
    project.pipeline(toml(
        f'name = "source"\nrun = "stages:numbers"\nparams = {{ count = {count} }}',
        f'name = "batched"\nrun = "stages:batched"\nparams = {{ path = "sizes.jsonl" }}\n'
        f'batch = {{ max_items = 8, max_wait_ms = 20 }}\non_error = "{on_error}"\n'
        f'replicas = {replicas}',
        'name = "sink"\nrun = "stages:record"\nparams = { path = "out.jsonl" }'), STAGES)


@pytest.mark.parametrize("replicas", [1, 2])  # 2: a leased link, finished batch by batch
def test_a_batched_stage_end_to_end_with_a_poison_item_dead_lettered(project, replicas):
    _batched_pipeline(project, "dead-letter", replicas=replicas)
    result = project.launch("--summary-json", "summary.json")
    assert result.returncode == 0, result.stderr
    calls = [json.loads(line) for line in project.lines("sizes.jsonl")]
    assert all(1 <= n <= 8 for n, _ in calls), calls
    assert any(n > 1 for n, _ in calls), calls  # items gathered while calls ran
    expected = [x * 2 for x in range(200) if x != 13 and x % 10 != 9]
    assert sorted(json.loads(line) for line in project.lines("out.jsonl")) == expected
    [record] = read(project.root / "dead-letters" / "batched.msgpack").records
    assert (record["item"], record["exc_type"]) == ("bad", "ValueError")
    stage = json.loads(project.read("summary.json"))["stages"][1]
    # Every list the stage was given is counted; the calls that found the poison
    # (one per item of the failing list, when it held more than one) are not lists given.
    failing = next(n for n, bad in calls if bad)
    assert stage["batch_items"] == 200
    assert stage["batches"] == len(calls) - (failing if failing > 1 else 0)
    assert stage["batch_size_mean"] == pytest.approx(200 / stage["batches"])
    assert " batch" in result.stderr  # the summary's column


def test_a_poison_item_with_on_error_fail_fails_the_run_naming_its_type(project):
    _batched_pipeline(project, "fail")
    result = project.launch()
    assert result.returncode == 1, result.stderr
    assert "ValueError" in result.stderr and "cannot take 'bad'" in result.stderr
    assert "while processing an item of type str" in result.stderr, result.stderr
