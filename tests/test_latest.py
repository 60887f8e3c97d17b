"""input = "latest": each call gets the newest item, older ones are dropped and counted,
upstream never waits on a long call, and the drain still ends cleanly."""

from __future__ import annotations

import json

import pytest
from test_launcher import toml

from zpipe.api.pipeline import Task, spec_from_tasks
from zpipe.errors import ConfigError
from zpipe.replica import shapes
from zpipe.watch import liveview, summary

# The source says, after each item it has handed on, the newest one's number (a
# file replaced whole, so a reader never sees half of it). The stage reads it when
# it gets an item: how far behind the newest that item is.
STAGES = """
import json, os, time

def _say(path, value):
    with open(path + ".tmp", "w") as out:
        out.write(json.dumps(value))
    os.replace(path + ".tmp", path)

def _newest(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return -1

def frames(count, path, period=0.0, size=0):
    payload = b"x" * size
    for i in range(count):
        yield [i, payload] if size else i
        _say(path, i)
        if period:
            time.sleep(period)

CALLS = []

def look(x, path, log, ahead, deadline, count, long_calls=None):
    # The newest the source has handed on as this call gets its item; then a long
    # call (the first `long_calls`, or all): until the source is `ahead` items
    # further (or done), within `deadline` s.
    x = x[0] if isinstance(x, list) else x
    newest = _newest(path)
    with open(log, "a") as out:
        out.write(json.dumps([x, newest]) + "\\n")
    CALLS.append(x)
    if long_calls is not None and len(CALLS) > long_calls:
        return x
    until = time.monotonic() + deadline
    while _newest(path) < min(newest + ahead, count - 1):
        if time.monotonic() > until:
            with open(log + ".blocked", "a") as out:
                out.write(json.dumps([x, newest, _newest(path)]) + "\\n")
            break
        time.sleep(0.005)
    return x

def nap(x, seconds):
    time.sleep(seconds)
    return x

def record(x, path):
    with open(path, "a") as out:
        out.write(json.dumps(x) + "\\n")
"""


def _figures(project) -> dict:
    return {s["name"]: s for s in json.loads(project.read("summary.json"))["stages"]}


def test_a_latest_stage_gets_the_newest_item_and_counts_what_it_dropped(project):
    # The source is ten times faster than the stage: each call lasts until the
    # source has handed on ten more items (whatever the host's speed).
    count = 150
    project.pipeline(toml(
        f'name = "source"\nrun = "stages:frames"\n'
        f'params = {{ count = {count}, path = "newest.json", period = 0.03 }}',
        f'name = "look"\nrun = "stages:look"\ninput = "latest"\n'
        f'params = {{ path = "newest.json", log = "got.jsonl", ahead = 10, deadline = 30, '
        f'count = {count} }}',
        'name = "sink"\nrun = "stages:record"\nparams = { path = "out.jsonl" }'), STAGES)
    result = project.launch("--summary-json", "summary.json", timeout=180)
    assert result.returncode == 0, result.stderr
    got = [json.loads(line) for line in project.lines("got.jsonl")]
    # Never more than 2 behind the newest handed on: what was queued behind it
    # while the call ran was dropped, not kept for later.
    assert all(newest - x <= 2 for x, newest in got), got
    taken = [x for x, _ in got]
    assert taken == sorted(taken) and len(set(taken)) == len(taken)
    figures = _figures(project)
    look = figures["look"]
    assert figures["source"]["sent"] == look["received"] == count
    # Each item is either dropped or processed: nothing lost, nothing twice.
    assert look["dropped"] + look["sent"] == count
    assert look["sent"] == len(got) == figures["sink"]["received"]
    assert look["dropped"] >= count // 2, look  # about nine in ten
    assert [json.loads(line) for line in project.lines("out.jsonl")] == taken
    assert sum(r["dropped"] for r in look["replica_figures"]) == look["dropped"]
    assert " dropped" in result.stderr  # the summary's column


@pytest.mark.parametrize("policy, more", [
    ("latest", "hwm = 2"),
    ("latest", 'hwm = 3\nrestart = "on-failure"'),  # leased: each message kept until finished
    ("all", "hwm = 2"),
])
def test_upstream_never_waits_on_a_latest_stage_in_a_long_call(project, policy, more):
    # 100 kB items and hwm = 2: a lossless link holds about a dozen (both queues,
    # the OS's buffers). The stage's first call lasts until the source has handed
    # on 60 more items: only a stage that keeps taking its input in lets it.
    # ("all", the default, is the control: there the source is held up.)
    count, ahead = 120, 60
    project.pipeline(toml(
        f'name = "source"\nrun = "stages:frames"\n'
        f'params = {{ count = {count}, path = "newest.json", period = 0.002, size = 100000 }}',
        f'name = "look"\nrun = "stages:look"\ninput = "{policy}"\n{more}\n'
        f'params = {{ path = "newest.json", log = "got.jsonl", ahead = {ahead}, '
        f'deadline = {30 if policy == "latest" else 3}, count = {count}, long_calls = 1 }}',
        'name = "sink"\nrun = "stages:record"\nparams = { path = "out.jsonl" }',
        extra="hwm = 2"), STAGES)
    result = project.launch("--summary-json", "summary.json", timeout=180)
    assert result.returncode == 0, result.stderr
    first = [json.loads(line) for line in project.lines("got.jsonl")][0]
    blocked = project.lines("got.jsonl.blocked")
    if policy == "latest":
        assert not blocked, f"the source was held up during a long call: {blocked}"
        assert _figures(project)["look"]["dropped"] >= ahead - 12
    else:
        [line] = [json.loads(b) for b in blocked if json.loads(b)[0] == first[0]]
        assert line[2] - line[1] < ahead  # held up well before 60 more


@pytest.mark.parametrize("fields", ['replicas = 2', 'restart = "on-failure"'])
def test_a_dropped_item_on_a_leased_link_is_finished_and_never_sent_again(project, fields):
    # On a leased link the source keeps each message until it is acknowledged,
    # and reports done only once all are: a dropped item must be acknowledged.
    count = 400
    project.pipeline(toml(
        f'name = "source"\nrun = "stages:frames"\n'
        f'params = {{ count = {count}, path = "newest.json", period = 0.001 }}',
        f'name = "nap"\nrun = "stages:nap"\ninput = "latest"\nparams = {{ seconds = 0.02 }}\n'
        f'{fields}',
        'name = "sink"\nrun = "stages:record"\nparams = { path = "out.jsonl" }'), STAGES)
    result = project.launch("--summary-json", "summary.json", timeout=180)
    assert result.returncode == 0, result.stderr
    nap = _figures(project)["nap"]
    assert nap["received"] == count and nap["redelivered"] == 0
    assert nap["dropped"] > 0 and nap["dropped"] + nap["sent"] == count
    out = [json.loads(line) for line in project.lines("out.jsonl")]
    assert len(out) == len(set(out)) == nap["sent"]


def test_an_ordered_latest_stage_closes_the_numbers_it_dropped(project):
    # Two ordered replicas: the sink puts their outputs back in order, and an item
    # dropped must close its number, or everything after it would wait for ever.
    count = 300
    project.pipeline(toml(
        f'name = "source"\nrun = "stages:frames"\n'
        f'params = {{ count = {count}, path = "newest.json", period = 0.001 }}',
        'name = "nap"\nrun = "stages:nap"\ninput = "latest"\nparams = { seconds = 0.01 }\n'
        'replicas = 2\nordered = true',
        'name = "sink"\nrun = "stages:record"\nparams = { path = "out.jsonl" }'), STAGES)
    result = project.launch("--summary-json", "summary.json", timeout=180)
    assert result.returncode == 0, result.stderr
    out = [json.loads(line) for line in project.lines("out.jsonl")]
    assert out == sorted(out) and len(set(out)) == len(out)
    nap = _figures(project)["nap"]
    assert nap["dropped"] > 0 and nap["dropped"] + len(out) == count


def test_latest_on_a_leased_link_needs_room_for_what_it_holds():
    def numbers():
        yield from range(3)

    spec = spec_from_tasks([Task(numbers), Task(lambda x: x, name="check", input="latest",
                                                restart="on-failure", hwm=2, concurrency=2),
                            Task(lambda x: x)])
    with pytest.raises(ConfigError, match=r"stage 'check': field 'hwm': .* needs hwm >= 4"):
        shapes.resolve_stage(spec, 1)


def test_latest_is_refused_where_items_are_not_taken_one_by_one():
    def numbers():
        yield from range(3)

    def stream(items):
        yield from items

    spec = spec_from_tasks([Task(numbers), Task(stream, name="check", input="latest"),
                            Task(lambda x: x)])
    with pytest.raises(ConfigError, match=r"stage 'check': field 'input': a stream function "
                                          r"takes its items itself"):
        shapes.resolve_stage(spec, 1)


def test_drops_are_shown_in_the_summary_and_the_status_lines():
    stage = {"name": "look", "replicas": 1, "up": 1, "received": 100, "sent": 10,
             "dropped": 90, "busy": 1.0, "blocked": 0.0, "idle": 0.0, "busy_pct": 100.0,
             "blocked_pct": 0.0, "idle_pct": 0.0, "rate_in": 1.0, "rate_out": 1.0}
    snapshot = {"pipeline": "p", "state": "ok", "elapsed": 1.0, "stages": [stage]}
    assert "dropped" in summary.render(snapshot) and " 90" in summary.render(snapshot)
    assert liveview.status_line(1, stage).endswith(", 90 dropped")
    # A pipeline that drops nothing keeps its columns as they were.
    stage["dropped"] = 0
    assert "dropped" not in summary.render(snapshot)
    assert "dropped" not in liveview.status_line(1, stage)
