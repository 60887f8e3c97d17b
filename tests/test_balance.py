"""Credits into a replicated stage: a slow replica holds little work, nothing is lost."""

from __future__ import annotations

import collections
import json
import re

import msgpack
import zmq
from conftest import wait_until
from test_launcher import toml

from zpipe.replica import balance, delivery
from zpipe.replica.control import Control
from zpipe.replica.delivery import Lots
from zpipe.replica.inbox import Inbox
from zpipe.wire import codec, transport


def _replicas(ctx: zmq.Context, count: int, hwm: int = 100):
    """An upstream ROUTER connected to ``count`` downstream ROUTERs, each behind an Inbox."""
    addresses = tuple(f"inproc://replica-{r}" for r in range(count))
    inputs = [transport.pull(ctx, a, hwm, balanced=True) for a in addresses]
    up = transport.push(ctx, addresses, hwm, lambda: None, 5.0, balanced=True)
    control = ctx.socket(zmq.DEALER)
    control.connect("inproc://nobody")
    inboxes = [Inbox(s, Control(control), "work", hwm, balance.Lender(s, hwm),
                     Lots(s.send_multipart)) for s in inputs]
    return balance.Dispatcher(up, addresses, hwm), inboxes


def test_a_replica_that_takes_nothing_holds_only_its_first_credits():
    ctx = zmq.Context()
    try:
        dispatcher, (busy, stuck) = _replicas(ctx, 2)
        got = []
        for i in range(50):
            while not dispatcher.send(codec.encode([i]), 1):
                # Out of credits: the busy replica takes a message, which frees one.
                assert busy._fill(block=True)
                got += busy.buffer
                busy.buffer.clear()
        while busy._fill(block=False):
            pass
        got += busy.buffer
        # The stuck replica was sent its first credits' worth, the busy one all the rest.
        assert got == [i for i in range(50) if i not in (1, 3)]
        assert busy.received == 50 - balance.FIRST_CREDITS
        assert dispatcher.credits[1] == 0
    finally:
        ctx.destroy(linger=0)


class RecordingSocket:
    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def send(self, data: bytes, flags: int = 0) -> None:
        self.sent.append(data)


def _credits_given(lender: balance.Lender, sock: RecordingSocket, seconds_each: float,
                   messages: int, monkeypatch) -> list[int]:
    """Credits the lender gives back for ``messages`` messages that take ``seconds_each``."""
    clock = [100.0]
    monkeypatch.setattr(balance, "_monotonic", lambda: clock[0])
    sock.sent.clear()
    for _ in range(messages):
        lender.took(b"up", clock[0])
        clock[0] += seconds_each
    return [msgpack.unpackb(frame) for frame in sock.sent[1::2]]


def test_the_window_follows_the_time_a_message_takes(monkeypatch):
    sock = RecordingSocket()
    lender = balance.Lender(sock, hwm=1000)  # type: ignore[arg-type]
    # Slow messages: one waits behind the one in hand, a credit per message taken.
    assert _credits_given(lender, sock, 0.010, 20, monkeypatch)[-5:] == [1] * 5
    assert lender.window == balance.MIN_WINDOW
    # Fast ones: the window grows to cover QUEUE_TIME, its credits given in bunches.
    grants = _credits_given(lender, sock, 0.00001, 200, monkeypatch)
    assert lender.window == balance.MAX_WINDOW
    assert max(grants) > balance.MAX_WINDOW // 4 and len(grants) < 200 / 4
    # The sender never holds more than the window (here 64) unanswered.
    assert lender.left[b"up"] <= balance.MAX_WINDOW


def test_the_window_stays_under_the_hwm(monkeypatch):
    sock = RecordingSocket()
    lender = balance.Lender(sock, hwm=5)  # type: ignore[arg-type]
    _credits_given(lender, sock, 0.00001, 50, monkeypatch)
    assert lender.window == 5 and lender.left[b"up"] <= 5


def test_credits_that_are_not_credits_are_ignored():
    ctx = zmq.Context()
    try:
        dispatcher, (first, _) = _replicas(ctx, 2)
        assert dispatcher.send(codec.encode(["a"]), 1)
        first._fill(block=True)  # its sender's id is now known: answer it with junk
        dispatcher._take_messages()  # (the real credit for "a", inproc: already there)
        assert dispatcher.credits == [2, 2]
        sender = next(iter(first.lender.left))
        for junk in ([b"\xc1"], [msgpack.packb("many")], [msgpack.packb(-3)], [b"1", b"2"]):
            first.sock.send_multipart([sender, *junk])
        first.sock.send_multipart([sender, msgpack.packb(1)])  # and then a real one
        dispatcher._take_messages()
        assert dispatcher.credits == [3, 2]
    finally:
        ctx.destroy(linger=0)


class MessageSocket:
    """Records what is sent as whole messages (the frames up to one without SNDMORE)."""

    def __init__(self) -> None:
        self.messages: list[list[bytes]] = []
        self.part: list[bytes] = []

    def send(self, data: bytes, flags: int = 0) -> None:
        self.part.append(data)
        if not flags & zmq.SNDMORE:
            self.messages.append(self.part)
            self.part = []


def test_a_credit_carries_the_acknowledgements_waiting_for_its_sender(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(balance, "_monotonic", lambda: clock[0])
    monkeypatch.setattr(delivery, "_monotonic", lambda: clock[0])
    acks: list = []
    lots = Lots(lambda frames: acks.append(msgpack.unpackb(frames[1])), delay=0.005, hwm=100)
    sock = MessageSocket()
    lender = balance.Lender(sock, hwm=100, lots=lots)  # type: ignore[arg-type]
    for seq in range(3):
        lots.arrived(b"up", seq, 1)
        lender.took(b"up", clock[0])  # slow messages: a credit for each one taken
        lots.take()
        clock[0] += 0.001
        lots.finish()  # the first after a pause goes at once; the next waits for company
    assert acks == [[0]]
    packed = [[msgpack.unpackb(frame) for frame in message[1:]] for message in sock.messages]
    # The second's acknowledgement went with the credit for the third, not alone.
    assert packed == [[1], [1], [1, [1]]], packed
    assert lots.waiting() and lots.unsent == {b"up": [2]}
    lots.flush()
    assert acks == [[0], [2]] and not lots.waiting()


def test_a_sender_takes_acknowledgements_that_come_with_a_credit():
    ctx = zmq.Context()
    try:
        dispatcher, (first, _) = _replicas(ctx, 2)
        assert dispatcher.send(codec.encode(["a"]), 1)
        first._fill(block=True)
        dispatcher._take_messages()
        assert dispatcher.credits == [2, 2] and dispatcher.outstanding.held == [1, 0]
        sender = next(iter(first.lender.left))
        first.sock.send_multipart([sender, msgpack.packb(1), msgpack.packb([0])])
        dispatcher._take_messages()
        assert dispatcher.credits == [3, 2] and not dispatcher.outstanding
        assert dispatcher.outstanding.held == [0, 0]
    finally:
        ctx.destroy(linger=0)


def test_a_replica_that_has_gone_is_passed_over_not_an_error_of_the_sender():
    """ROUTER_MANDATORY says EHOSTUNREACH for a peer whose connection is gone (an
    inproc peer closed; over ipc and tcp ZeroMQ keeps the pipe for a reconnect):
    the sender must not fail for it; the supervisor reports the dead replica."""
    ctx = zmq.Context()
    try:
        dispatcher, (alive, gone) = _replicas(ctx, 2)
        gone.sock.close(0)

        def unreachable() -> bool:
            try:
                dispatcher.sock.send(transport.peer_id(1), zmq.SNDMORE | zmq.NOBLOCK)
            except zmq.ZMQError as exc:
                return exc.errno == zmq.EHOSTUNREACH
            dispatcher.sock.send(b"probe")  # the pipe is still there: end the message
            return False
        wait_until(unreachable, timeout=10, what="the closed replica to be unreachable")
        got = []
        for i in range(20):
            while not dispatcher.send(codec.encode([i]), 1):
                assert alive._fill(block=True)
                got += alive.buffer
                alive.buffer.clear()
        while alive._fill(block=False):
            pass
        got += alive.buffer
        assert got == list(range(20))  # every one went to the replica that is there
        assert dispatcher.credits[1] == 0
    finally:
        ctx.destroy(linger=0)


STAGES = """
import json, os, time
from typing import Iterable

import zpipe


def numbers(count):
    yield from range(count)


class Work(zpipe.Stage):
    # The first replica to start is slow; the other is fast.
    def __init__(self, claim):
        self.claim = claim

    def setup(self):
        try:
            os.close(os.open(self.claim, os.O_CREAT | os.O_EXCL))
            self.delay = 0.05
        except FileExistsError:
            self.delay = 0.0

    def process(self, x):
        time.sleep(self.delay)
        return {"x": x, "slow": self.delay > 0}


def die_at(x, bad):
    if x == bad:
        os.kill(os.getpid(), 9)
    return x


def record(items: Iterable, path):
    with open(path, "w") as out:
        for item in items:
            out.write(json.dumps(item) + "\\n")
"""


def test_a_slow_replica_gets_little_of_the_work(project):
    # Round-robin would give each replica 200 items: 10 s for the slow one.
    project.pipeline(toml(
        'name = "source"\nrun = "stages:numbers"\nparams = { count = 400 }',
        'name = "work"\nrun = "stages:Work"\nreplicas = 2\nparams = { claim = "slow.claim" }',
        'name = "sink"\nrun = "stages:record"\nparams = { path = "out.jsonl" }'), STAGES)
    result = project.launch(timeout=60)
    assert result.returncode == 0, result.stderr
    items = [json.loads(line) for line in project.lines("out.jsonl")]
    assert sorted(i["x"] for i in items) == list(range(400))
    shares = collections.Counter(i["slow"] for i in items)
    assert shares[True] < 400 / 8, shares


def test_a_dead_replica_is_what_gets_reported(project):
    project.pipeline(toml(
        'name = "source"\nrun = "stages:numbers"\nparams = { count = 100000 }',
        'name = "work"\nrun = "stages:die_at"\nreplicas = 2\nparams = { bad = 500 }',
        'name = "sink"\nrun = "stages:record"\nparams = { path = "out.jsonl" }'), STAGES)
    result = project.launch(timeout=60)
    assert result.returncode == 1
    assert re.search(r"stage 'work' replica work-[01] \(pid \d+\) died without a word: "
                     r"killed by signal 9", result.stderr), result.stderr
    assert "Host unreachable" not in result.stderr
    assert "stage 'source' replica" not in result.stderr  # no failure of the sender
