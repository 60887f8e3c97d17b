"""The replica runtime: batching never holds an item back, reordering, flushing at the end."""

from __future__ import annotations

import json

from zpipe import codec
from zpipe.inbox import Reorder

from test_launcher import toml

HANDSHAKE_STAGES = """
import os, time
from typing import Iterable


def burst_then_wait(flag, size):
    # A burst fast enough to be batched, then the source blocks until the
    # sink has seen all of it: an item held back for company would deadlock.
    for i in range(size):
        yield i
    deadline = time.monotonic() + 30
    while not os.path.exists(flag):
        if time.monotonic() > deadline:
            raise TimeoutError("the burst's last items never reached the sink")
        time.sleep(0.01)
    yield size


def relay(x):
    return x


def numbers(count):
    yield from range(count)


def wait_on_two(x, flag):
    # A long user call right after a burst, ending only once the sink has the
    # burst: outputs held back until this call returns would deadlock.
    deadline = time.monotonic() + 30
    while x == 2 and not os.path.exists(flag):
        if time.monotonic() > deadline:
            raise TimeoutError("outputs 0 and 1 never left while the stage was busy")
        time.sleep(0.01)
    return x


def mark(items: Iterable, flag, size, path):
    seen = []
    for item in items:
        seen.append(item)
        if len(seen) == size:
            open(flag, "w").close()
    with open(path, "w") as out:
        out.write(str(seen))
"""


def test_a_burst_is_never_held_back_waiting_for_more(project):
    project.pipeline(toml(
        'name = "source"\nrun = "stages:burst_then_wait"\nparams = { flag = "seen", size = 50 }',
        'name = "relay"\nrun = "stages:relay"',
        'name = "sink"\nrun = "stages:mark"\n'
        'params = { flag = "seen", size = 50, path = "out.txt" }'), HANDSHAKE_STAGES)
    result = project.launch(timeout=60)
    assert result.returncode == 0, result.stderr
    assert project.read("out.txt") == str(list(range(51)))


def test_outputs_leave_while_the_stage_is_busy_in_user_code(project):
    # The relay gets 0, 1, 2 in a burst and spends long on 2: its flusher
    # must send 0 and 1 meanwhile.
    project.pipeline(toml(
        'name = "source"\nrun = "stages:numbers"\nparams = { count = 4 }',
        'name = "relay"\nrun = "stages:wait_on_two"\nparams = { flag = "seen" }',
        'name = "sink"\nrun = "stages:mark"\n'
        'params = { flag = "seen", size = 2, path = "out.txt" }'), HANDSHAKE_STAGES)
    result = project.launch(timeout=60)
    assert result.returncode == 0, result.stderr
    assert project.read("out.txt") == str([0, 1, 2, 3])


def test_reorder_releases_in_input_order_and_drops_markers():
    reorder = Reorder()
    last, marker = codec.TAG_LAST, codec.TAG_LAST | codec.TAG_MARKER
    assert reorder.add(["c"], [[2, last]]) == []
    assert reorder.add(["a0", None], [[0, 0], [1, marker]]) == []
    assert reorder.add(["a1"], [[0, last]]) == ["a0", "a1", "c"]
    assert reorder.markers == 1 and not reorder.waiting


def test_batch_packs_items_with_their_arrays_and_tags():
    import numpy as np
    batch = codec.Batch()
    batch.add({"a": np.arange(3)}, [0, codec.TAG_LAST])
    batch.add("plain", [1, codec.TAG_LAST])
    batch.add([np.ones((2, 2)), np.zeros(0)], [2, codec.TAG_LAST])
    frames = batch.frames()
    assert len(frames) == 4 and not batch.encoded
    items, tags = codec.decode_tagged([bytes(f) for f in frames])
    assert items[0]["a"].tolist() == [0, 1, 2] and items[1] == "plain"
    assert items[2][0].tolist() == [[1, 1], [1, 1]] and items[2][1].size == 0
    assert tags == [[0, 1], [1, 1], [2, 1]]


def test_batch_rejects_a_bad_item_and_keeps_the_rest():
    import numpy as np
    batch = codec.Batch()
    batch.add(np.arange(2))
    try:
        batch.add({"x": np.arange(4), "bad": {1, 2}})
    except codec.EncodeError as exc:
        assert "type dict" in str(exc) and "set" in str(exc)
    else:
        raise AssertionError("a set was accepted")
    batch.add(7)
    items = codec.decode([bytes(f) for f in batch.frames()])
    assert items[0].tolist() == [0, 1] and items[1] == 7 and len(items) == 2
    assert json.dumps(items[1]) == "7"
