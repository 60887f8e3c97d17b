"""concurrency = N: up to N calls at once in one replica, on threads or an asyncio loop;
outputs in completion order, or input order with ordered = true; errors per item."""

from __future__ import annotations

import json

import pytest
from test_launcher import toml

from zpipe.api.pipeline import Task, spec_from_tasks
from zpipe.errors import ConfigError
from zpipe.replica import shapes

# Calls that can only return once N of them run at once (a Barrier, an asyncio
# event set by the N-th), and calls that complete in a known order: item i of each
# group of N waits until item i + 1 of its group has completed, so each group
# completes backwards. No timing: a wrong order or too little overlap fails.
STAGES = """
import asyncio, json, threading, time

def numbers(count):
    for i in range(count):
        yield {"i": i, "text": "bad" if i == 5 else "ok"}

BARRIER = None
RUNNING = [0, 0]  # now, most at once
LOCK = threading.Lock()

def together(item, n, path):
    global BARRIER
    with LOCK:
        if BARRIER is None:
            BARRIER = threading.Barrier(n)
        RUNNING[0] += 1
        RUNNING[1] = max(RUNNING)
    try:
        BARRIER.wait(timeout=30)  # broken (an error) unless n calls run at once
    finally:
        with LOCK:
            RUNNING[0] -= 1
    with open(path, "w") as out:
        out.write(json.dumps({"most": RUNNING[1], "thread": threading.current_thread().name}))
    return item["i"]

def _sunk(path):
    try:
        with open(path) as f:
            lines = f.read().split("\\n")
    except OSError:
        return set()
    return {json.loads(line) for line in lines[:-1]}  # whole lines only

def _waits_for(i, n):
    # The item i waits for: the next of its group of n (None for the group's last).
    return None if (i + 1) % n == 0 else i + 1

def backwards(item, n, sink):
    # Returns once the next item of its group is at the sink: each group of n
    # reaches the sink backwards, unless outputs wait for input order.
    after = _waits_for(item["i"], n)
    deadline = time.monotonic() + 30
    while after is not None and after not in _sunk(sink):
        if time.monotonic() > deadline:
            raise TimeoutError(f"item {after} never reached the sink")
        time.sleep(0.005)
    return item["i"]

async def abackwards(item, n, sink):
    after = _waits_for(item["i"], n)
    deadline = time.monotonic() + 30
    while after is not None and after not in _sunk(sink):
        if time.monotonic() > deadline:
            raise TimeoutError(f"item {after} never reached the sink")
        await asyncio.sleep(0.005)
    return item["i"]

DONE = {}

def held(item, n, log):
    # Finishes once the next item of its group has (an event), and says when: each
    # group finishes backwards, whatever the order its outputs then leave in.
    i = item["i"]
    after = _waits_for(i, n)
    with LOCK:
        event = DONE.setdefault(after, threading.Event())
    if after is not None and not event.wait(30):
        raise TimeoutError(f"item {after} never finished")
    with LOCK:
        with open(log, "a") as out:
            out.write(json.dumps(i) + "\\n")
        DONE.setdefault(i, threading.Event()).set()
    return i

EVENTS = {}

async def aheld(item, n, log):
    i = item["i"]
    after = _waits_for(i, n)
    if after is not None:
        await asyncio.wait_for(EVENTS.setdefault(after, asyncio.Event()).wait(), 30)
    with open(log, "a") as out:
        out.write(json.dumps(i) + "\\n")
    EVENTS.setdefault(i, asyncio.Event()).set()
    return i

ARRIVED = [0]
ALL_IN = []

async def atogether(item, n):
    # Returns only once n calls are waiting here at once, on one event loop.
    if not ALL_IN:
        ALL_IN.append(asyncio.Event())
    ARRIVED[0] += 1
    if ARRIVED[0] % n == 0:
        ALL_IN[0].set()
    await asyncio.wait_for(ALL_IN[0].wait(), 30)
    return item["i"]

async def alone(item):
    await asyncio.sleep(0)
    return item["i"] * 10

def picky(item):
    if item["text"] == "bad":
        raise ValueError("not this one")
    time.sleep(0.001)
    return item["i"]

def record(x, path):
    with open(path, "a") as out:
        out.write(json.dumps(x) + "\\n")
"""


def _pipeline(project, middle: str, count: int = 12, more: str = "") -> None:
    project.pipeline(toml(
        f'name = "source"\nrun = "stages:numbers"\nparams = {{ count = {count} }}',
        f'name = "work"\n{middle}\n{more}',
        'name = "sink"\nrun = "stages:record"\nparams = { path = "out.jsonl" }'), STAGES)


def _out(project) -> list:
    return [json.loads(line) for line in project.lines("out.jsonl")]


def test_n_threads_run_n_calls_at_once_and_never_more(project):
    _pipeline(project, 'run = "stages:together"\nconcurrency = 4\n'
                       'params = { n = 4, path = "calls.json" }', count=16)
    result = project.launch(timeout=120)
    assert result.returncode == 0, result.stderr
    assert sorted(_out(project)) == list(range(16))
    calls = json.loads(project.read("calls.json"))
    assert calls["most"] == 4  # the barrier needed 4; backpressure allows no 5th
    assert calls["thread"] != "MainThread"


def test_an_async_def_runs_n_calls_at_once_on_its_loop(project):
    _pipeline(project, 'run = "stages:atogether"\nconcurrency = 5\nparams = { n = 5 }',
              count=15)
    result = project.launch(timeout=120)
    assert result.returncode == 0, result.stderr
    assert sorted(_out(project)) == list(range(15))


@pytest.mark.parametrize("run", ["backwards", "abackwards"])
def test_outputs_leave_in_completion_order(project, run):
    _pipeline(project, f'run = "stages:{run}"\nconcurrency = 4\n'
                       f'params = {{ n = 4, sink = "out.jsonl" }}', count=12)
    result = project.launch(timeout=120)
    assert result.returncode == 0, result.stderr
    # each group of 4 completed backwards, each item once the one after it was out
    assert _out(project) == [3, 2, 1, 0, 7, 6, 5, 4, 11, 10, 9, 8]


@pytest.mark.parametrize("run", ["held", "aheld"])
def test_ordered_outputs_leave_in_input_order_whatever_order_calls_finish_in(project, run):
    _pipeline(project, f'run = "stages:{run}"\nconcurrency = 4\nordered = true\n'
                       f'params = {{ n = 4, log = "finished.jsonl" }}', count=12)
    result = project.launch(timeout=120)
    assert result.returncode == 0, result.stderr
    finished = [json.loads(line) for line in project.lines("finished.jsonl")]
    assert finished == [3, 2, 1, 0, 7, 6, 5, 4, 11, 10, 9, 8]
    assert _out(project) == list(range(12))


def test_an_async_def_without_concurrency_works(project):
    _pipeline(project, 'run = "stages:alone"', count=50)
    result = project.launch(timeout=120)
    assert result.returncode == 0, result.stderr
    assert _out(project) == [i * 10 for i in range(50)]  # one at a time: in order


@pytest.mark.parametrize("more", ["", "replicas = 2", 'restart = "on-failure"'])
def test_a_failing_item_is_skipped_per_item_and_the_rest_goes_on(project, more):
    _pipeline(project, 'run = "stages:picky"\nconcurrency = 3\non_error = "skip"', count=60,
              more=more)
    result = project.launch(timeout=120)
    assert result.returncode == 0, result.stderr
    assert sorted(_out(project)) == [i for i in range(60) if i != 5]
    assert "stage 'work': 1 item(s) skipped" in result.stderr


def test_a_failing_item_with_on_error_fail_fails_the_run_naming_its_type(project):
    _pipeline(project, 'run = "stages:picky"\nconcurrency = 3', count=60)
    result = project.launch(timeout=120)
    assert result.returncode == 1, result.stderr
    assert "not this one" in result.stderr
    assert "while processing an item of type dict" in result.stderr


def _stream(items):
    yield from items


async def _coroutine(x):
    return x


def _plain(x):
    return x


@pytest.mark.parametrize("fn, task, pattern", [
    (_stream, {"concurrency": 2}, r"stage 'check': field 'concurrency': a stream function"),
    (_plain, {"concurrency": 2, "item_timeout": 5},
     r"field 'item_timeout': it watches one call at a time, and concurrency = 2"),
    (_coroutine, {"item_timeout": 5}, r"field 'item_timeout': an async def's calls share"),
])
def test_concurrency_is_refused_where_it_cannot_work(fn, task, pattern):
    def numbers():
        yield from range(3)

    spec = spec_from_tasks([Task(numbers), Task(fn, name="check", **task), Task(_plain)])
    with pytest.raises(ConfigError, match=pattern):
        shapes.resolve_stage(spec, 1)


def test_an_async_source_or_async_generator_is_still_refused():
    async def agen(x):
        yield x

    with pytest.raises(ConfigError, match="async"):
        shapes.classify(agen, False, None, "stage 'st'", allow_async=True)
    with pytest.raises(ConfigError, match="async"):
        shapes.classify(_coroutine, True, None, "stage 'st'", allow_async=True)
    assert shapes.classify(_coroutine, False, None, "x", allow_async=True) is \
        shapes.Shape.PLAIN
