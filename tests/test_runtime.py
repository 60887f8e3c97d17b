"""The replica runtime: batching never holds an item back, reordering, flushing at the end."""

from __future__ import annotations

import json
import time

import pytest
import zmq
from test_launcher import toml

from zpipe.errors import EncodeError
from zpipe.replica import inbox as inbox_module
from zpipe.replica.control import Control
from zpipe.replica.inbox import Inbox, Reorder
from zpipe.replica.outbox import Outbox
from zpipe.wire import codec, protocol

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
    assert len(frames) == 1 and len(batch) == 3  # small arrays travel inline, in the header
    batch.clear()
    assert not batch.encoded and not batch.arrays and batch.header_bytes == 0
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


def test_an_item_carries_its_arrays_and_a_bad_one_leaves_the_batch_usable():
    import numpy as np
    batch = codec.Batch()
    batch.add({"a": np.arange(3), "b": [np.ones(2), "x"]})
    frames = batch.frames()
    assert len(frames) == 1 and not batch.arrays and not batch.fresh
    item = codec.decode([bytes(f) for f in frames])[0]
    assert item["a"].tolist() == [0, 1, 2] and item["b"][0].tolist() == [1, 1]
    batch.clear()
    with pytest.raises(EncodeError, match="type dict.*set"):
        batch.add({"ok": np.arange(2), "bad": {1}})
    assert not batch.fresh and not batch.arrays and not batch.encoded
    batch.add(5)
    assert codec.decode(batch.frames()) == [5]


@pytest.fixture
def link():
    """A PUSH -> PULL link over inproc with a high-water mark of one message
    each way, and a control DEALER with nobody behind it."""
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    pull.setsockopt(zmq.RCVHWM, 1)
    pull.bind("inproc://link")
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.SNDHWM, 1)
    push.connect("inproc://link")
    control = ctx.socket(zmq.DEALER)
    control.connect("inproc://nobody")
    yield push, pull, Control(control)
    ctx.destroy(linger=0)


def _receive_until(pull: zmq.Socket, count: int, timeout: float = 10.0) -> list:
    items, deadline = [], time.monotonic() + timeout
    while len(items) < count and time.monotonic() < deadline:
        if pull.poll(100):
            items += codec.decode(pull.recv_multipart())
    return items


def test_the_flusher_keeps_a_batch_while_downstream_is_full(link):
    push, pull, control = link
    outbox = Outbox(push, control, source=False)
    try:
        # Fill the link (the first item leaves alone), then leave a batch
        # for the flusher: its sends fail while the link is full.
        sent = 0
        while push.poll(0, zmq.POLLOUT):
            outbox.send(sent)
            sent += 1
            outbox.flush()
        outbox.send(sent)
        outbox.send(sent + 1)
        time.sleep(0.05)  # several flusher periods against a full link
        assert outbox.flusher is not None and outbox.flusher.is_alive()
        assert _receive_until(pull, sent + 2) == list(range(sent + 2))
    finally:
        outbox.close()


@pytest.fixture
def fed_inbox():
    """An Inbox over inproc, given its messages (lists of items) by the test before
    it takes any: its input ends once they are all taken."""
    ctx = zmq.Context()

    def fed(*messages: list) -> Inbox:
        pull, push = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
        pull.bind("inproc://fed")
        push.connect("inproc://fed")
        control = ctx.socket(zmq.DEALER)
        control.connect("inproc://nobody")
        for items in messages:
            push.send_multipart(codec.encode(items))
        inbox = Inbox(pull, Control(control), "fed", 10)
        inbox.control.stopped = True  # the input ends once it is empty
        return inbox

    yield fed
    ctx.destroy(linger=0)


def test_inbox_iteration_and_next_share_one_input(fed_inbox):
    # A stream function may take items both ways: `for a in items: b = next(items)`.
    inbox = fed_inbox(*([i, i + 1] for i in range(0, 6, 2)))
    assert [[a, next(inbox)] for a in inbox] == [[0, 1], [2, 3], [4, 5]]
    assert inbox.received == 6 and list(inbox) == []


def test_an_inbox_counts_and_names_what_its_stage_holds_in_a_message(fed_inbox):
    # Items are given a message's list at a time: those not given yet are still
    # buffered, the one in the stage's hands is unfinished, a failure names it,
    # and the rest come in order after a stage stopped midway.
    inbox = fed_inbox([0, 1, "two", 3.0, 4], [5, 6])
    assert (inbox.unfinished(), inbox.queued(), inbox.last_item) == (0, 0, None)
    taken = [next(inbox) for _ in range(3)]
    assert taken == [0, 1, "two"] and inbox.last_item == "two"
    assert (inbox.queued(), inbox.unfinished(), inbox.unfinished(True)) == (2, 3, 2)
    assert next(inbox) == 3.0 and type(inbox.last_item) is float
    assert list(inbox) == [4, 5, 6] and inbox.last_item == 6
    assert (inbox.queued(), inbox.unfinished(), inbox.received) == (0, 0, 7)
    inbox.last_item = "set"  # by another way of taking items (batching.py)
    assert inbox.last_item == "set"


def test_an_inbox_lets_go_of_a_message_once_its_items_are_taken(fed_inbox):
    # Its list of items goes as the stage asks for the next item past it, not
    # once a next message has come: an item the stage dropped is freed, but for
    # the last one given, which a failure names.
    import weakref

    import numpy as np
    inbox = fed_inbox([np.zeros(4), np.ones(4), np.full(4, 2.0)])
    taken = [next(inbox) for _ in range(3)]
    refs = [weakref.ref(item) for item in taken]
    del taken
    assert [ref() is None for ref in refs] == [False, False, False]  # the message's list
    assert list(inbox) == []  # asked past it: the input has ended
    assert [ref() is None for ref in refs] == [True, True, False]
    assert inbox.last_item is refs[2]()


def test_each_message_is_timed_with_the_waits_of_its_own_items(monkeypatch):
    # A message's timing point is marked only once its items are handed over
    # (Inbox._fill): a wait for room downstream after that belongs to its
    # items, not to the message before. The clock is the test's.
    clock = [10.0]
    monkeypatch.setattr(inbox_module, "_monotonic", lambda: clock[0])
    ctx = zmq.Context()
    try:
        pull, push = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
        pull.bind("inproc://timed")
        push.connect("inproc://timed")
        control = ctx.socket(zmq.DEALER)
        control.connect("inproc://nobody")
        push.send_multipart(codec.encode(["a"]))
        push.send_multipart(codec.encode(["b"]))
        inbox = Inbox(pull, Control(control), "timed", 10)
        items = iter(inbox)
        assert next(items) == "a"  # in at 10
        clock[0] = 20.0
        assert next(items) == "b"  # in at 20: "a" took 10 s
        inbox.times.blocked += 100.0  # "b"'s output waited 100 s for room
        clock[0] = 21.0
        inbox.control.stopped = True
        assert list(items) == []  # the end, at 21: "b" took 1 s, all of it blocked
        histogram = inbox.times.items
        assert histogram.count == 2 and histogram.sum == pytest.approx(10.0)
    finally:
        ctx.destroy(linger=0)


class _Spells:
    """An Inbox whose input wait after a message (the spell, Inbox._spell) is watched:
    ``entered`` is set as a spell begins (``spells`` counts them), ``slept`` as the
    usual wait on the descriptors begins; ``ends`` says how each spell ended (a
    frame, or None)."""

    def __init__(self, monkeypatch, spell_ms: int):
        import threading
        monkeypatch.setattr(inbox_module, "SPELL_MS", spell_ms)
        monkeypatch.setattr(inbox_module, "IDLE_POLL_MS", 60_000)  # a missed wake-up hangs
        self.entered, self.slept = threading.Event(), threading.Event()
        self.ends: list = []
        self.spells = 0
        receive = inbox_module.recv_frame

        def spell(sock, flags, copy):
            self.spells += 1
            self.entered.set()
            try:
                frame = receive(sock, flags, copy)
            except zmq.Again:
                self.ends.append(None)
                raise
            self.ends.append(frame)
            return frame

        monkeypatch.setattr(inbox_module, "recv_frame", spell)
        self.ctx = zmq.Context()
        self.router = self.ctx.socket(zmq.ROUTER)
        self.router.bind("inproc://supervisor")
        dealer = self.ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.IDENTITY, b"sink-0")
        dealer.connect("inproc://supervisor")
        pull, self.push = self.ctx.socket(zmq.PULL), self.ctx.socket(zmq.PUSH)
        pull.bind("inproc://input")
        self.push.connect("inproc://input")
        self.inbox = Inbox(pull, Control(dealer), "sink", 10)
        sleep, slept = self.inbox.sleep, self.slept

        class Watched:
            def poll(self, timeout):
                slept.set()
                return sleep.poll(timeout)

        self.inbox.sleep = Watched()
        self.got: list = []
        self.reader = threading.Thread(target=lambda: self.got.extend(self.inbox), daemon=True)

    def __enter__(self) -> _Spells:
        return self

    def __exit__(self, *exc: object) -> None:
        self.ctx.destroy(linger=0)

    def until(self, condition, what: str) -> None:
        deadline = time.monotonic() + 10
        while not condition():
            assert time.monotonic() < deadline, f"no {what} within 10 s"
            time.sleep(0.01)

    def stop(self) -> None:
        """STOP, which must end the input within 5 s (a lost wake-up: 60 s)."""
        self.router.send_multipart([b"sink-0", protocol.pack(protocol.STOP)])
        self.reader.join(5)
        assert not self.reader.is_alive(), "STOP did not end the input"


def test_a_message_that_comes_during_a_spell_is_taken_from_it(monkeypatch):
    with _Spells(monkeypatch, spell_ms=2000) as spells:  # longer than the test's own steps
        spells.reader.start()
        spells.push.send_multipart(codec.encode([1]))
        assert spells.entered.wait(10), "no spell after the first message"
        spells.slept.clear()  # (it waited on them before the first message)
        spells.push.send_multipart(codec.encode([2, 3]))
        spells.until(lambda: spells.inbox.received == 3, "the message sent during the spell")
        assert spells.ends and spells.ends[0] is not None  # the spell's receive took it
        assert spells.got[:3] == [1, 2, 3]
        # ... and after it, the next wait begins with a spell too
        spells.until(lambda: spells.spells == 2, "a spell after the message of the spell")
        assert not spells.slept.is_set()  # none of it waited on the descriptors
        spells.stop()  # (once the spell has run out)


def test_a_command_that_comes_during_a_spell_is_handled_once_it_ends(monkeypatch):
    # The spell looks at no command; the wait after it must: were the control
    # socket's wake-up lost in between, STOP would wait for IDLE_POLL_MS (60 s).
    with _Spells(monkeypatch, spell_ms=300) as spells:
        spells.reader.start()
        spells.push.send_multipart(codec.encode([1, 2]))
        assert spells.entered.wait(10), "no spell after the message"
        spells.stop()
        assert spells.got == [1, 2] and spells.ends == [None]


def test_an_idle_inbox_has_one_spell_then_sleeps_on_its_descriptors(monkeypatch):
    with _Spells(monkeypatch, spell_ms=20) as spells:
        spells.reader.start()
        assert spells.slept.wait(10)  # no message yet: no spell, the usual wait
        assert spells.ends == []
        spells.slept.clear()
        spells.push.send_multipart(codec.encode([1]))
        assert spells.slept.wait(10), "the wait after the spell did not begin"
        assert spells.ends == [None]  # one spell, which ran out, then the descriptors
        spells.stop()
        assert spells.got == [1] and spells.ends == [None]


def test_an_idle_inbox_answers_drain_and_stop_at_once(monkeypatch):
    # A sleeping replica must wake for commands, not find them at its next
    # timeout: with the timeout at a minute, a missed wake-up fails here.
    monkeypatch.setattr(inbox_module, "IDLE_POLL_MS", 60_000)
    import threading
    ctx = zmq.Context()
    try:
        router = ctx.socket(zmq.ROUTER)
        router.bind("inproc://supervisor")
        dealer = ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.IDENTITY, b"sink-0")
        dealer.connect("inproc://supervisor")
        pull, push = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
        pull.bind("inproc://input")
        push.connect("inproc://input")
        inbox = Inbox(pull, Control(dealer), "sink", 10)
        got: list = []
        reader = threading.Thread(target=lambda: got.extend(inbox), daemon=True)
        reader.start()
        push.send_multipart(codec.encode([1, 2, 3]))

        def until(condition, what):
            deadline = time.monotonic() + 10
            while not condition():
                assert time.monotonic() < deadline, what
                time.sleep(0.01)

        until(lambda: inbox.received == 3, "the items never arrived")
        for _ in range(3):  # DRAIN while the replica sleeps, more than once
            assert not router.poll(0)
            router.send_multipart([b"sink-0", protocol.pack(protocol.DRAIN, expected=3)])
            assert router.poll(5000), "no RECEIVED after DRAIN"
            kind, fields = protocol.unpack(router.recv_multipart()[1])
            assert (kind, fields["received"]) == (protocol.RECEIVED, 3)
            # The inbox notes what it reported just after sending it: reset that
            # only once it has, or the reset could come first and be undone.
            until(lambda: inbox.reported == 3, "the report to be noted")
            inbox.reported = None  # so that the next DRAIN is answered again
        router.send_multipart([b"sink-0", protocol.pack(protocol.STOP)])
        reader.join(5)
        assert not reader.is_alive(), "STOP did not end the input"
        assert got == [1, 2, 3]
    finally:
        ctx.destroy(linger=0)
