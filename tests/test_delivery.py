"""Leases on a link: what a sender keeps until acknowledged, and when a receiver acknowledges."""

from __future__ import annotations

import functools
import time

import msgpack
import pytest
import zmq

from zpipe.replica import balance, delivery
from zpipe.replica.control import Control
from zpipe.replica.delivery import ACK_DELAY, Lots, Outstanding, lease_frame, read_lease
from zpipe.replica.inbox import Inbox
from zpipe.wire import codec, transport
from zpipe.wire.codec import DecodeError


def test_lease_frames_round_trip_and_garbage_is_a_decode_error():
    assert read_lease(lease_frame(7, 2)) == (7, 2, 0)
    assert read_lease(lease_frame(7, 2, 1)) == (7, 2, 1)  # sent once before
    for junk in (b"", b"\xc1", msgpack.packb(7), msgpack.packb([1]), msgpack.packb([-1, 0]),
                 msgpack.packb(["a", 0]), msgpack.packb([1, 2, 3, 4]), msgpack.packb([1, 2, -1])):
        with pytest.raises(DecodeError):
            read_lease(junk)


def test_a_sender_keeps_each_message_until_acknowledged_and_caps_each_replica():
    out = Outstanding(replicas=2, cap=2)
    a = out.record(0, [b"a"], 3)
    b = out.record(0, [b"b"], 1)
    assert (a, b) == (0, 1) and not out.room(0) and out.room(1)
    assert out.items() == 4 and out.acked_below() == 0
    out.acknowledged([a, 99, "junk"])  # unknown and malformed seqs are ignored
    assert out.room(0) and out.acked_below() == 1 and out.items() == 1
    out.acknowledged([b])
    assert not out and out.acked_below() == out.next_seq == 2


def test_a_lost_replica_s_messages_are_sent_again_and_counted():
    out = Outstanding(replicas=2, cap=10)
    seqs = [out.record(r, [f"{r}-{i}".encode()], 2) for r in (0, 1) for i in range(3)]
    assert out.lose(1, generation=1) == 6
    assert list(out.resend) == seqs[3:] and out.redelivered == 6 and out.held == [3, 0]
    assert out.generation == [0, 1]
    frames = out.resent(seqs[3], 0)
    assert frames == [b"1-0"] and out.held == [4, 0]
    out.acknowledged(seqs)
    assert not out and out.held == [0, 0]


def _lots(acks: list) -> Lots:
    return Lots(lambda frames: acks.append((frames[0], msgpack.unpackb(frames[1]))))


def test_a_sink_acknowledges_a_message_once_every_item_in_it_is_finished():
    acks: list = []
    lots = _lots(acks)
    lots.arrived(b"up", 5, 2)
    lots.take()
    lots.finish()
    assert acks == []  # one of two items finished
    lots.take()
    assert acks == []  # the second is in the stage's hands
    lots.finish()
    assert acks == [(b"up", [5])] and not lots.waiting()


def test_a_relay_acknowledges_only_once_its_outputs_are_acknowledged():
    acks: list = []
    lots = _lots(acks)
    state = {"next_seq": 0, "acked_below": 0}
    lots.outputs_pending = lambda: state["next_seq"] - 1
    lots.outputs_acked_below = lambda: state["acked_below"]
    lots.arrived(b"up", 0, 1)
    lots.take()
    state["next_seq"] = 1  # its output went out as this relay's message 0
    lots.finish()
    assert acks == []
    state["acked_below"] = 1  # the next stage acknowledged message 0
    lots.acknowledge()
    assert acks == [(b"up", [0])]


def test_acknowledgements_go_in_order_of_arrival():
    acks: list = []
    lots = _lots(acks)
    lots.arrived(b"a", 0, 1)
    lots.arrived(b"b", 0, 1)
    first = lots.taking[0]
    lots.take()
    lots.take()  # both items in hand at once (a batch)
    first.left = 1  # as if the first were not finished yet
    lots.in_hand = [lots.finishing[1]]
    lots.finish()
    assert acks == []  # the second waits for the first
    lots.in_hand = [first]
    lots.finish()
    assert acks == [(b"a", [0]), (b"b", [0])]


def test_a_message_with_nothing_to_finish_is_acknowledged_at_once():
    acks: list = []
    lots = _lots(acks)
    lots.arrived(b"up", 3, 0)  # all its entries dropped here (duplicates, or malformed)
    assert acks == [(b"up", [3])]


@pytest.fixture
def clock(monkeypatch):
    """delivery's clock, moved by hand."""
    now = [1000.0]
    monkeypatch.setattr(delivery, "_monotonic", lambda: now[0])
    return now


def _finish_one(lots: Lots) -> None:
    lots.take()
    lots.finish()


def test_acknowledgements_close_together_share_a_message(clock):
    acks: list = []
    lots = Lots(lambda frames: acks.append((frames[0], msgpack.unpackb(frames[1]))),
                delay=0.005, hwm=100)
    for seq in range(5):
        lots.arrived(b"up", seq, 1)
    _finish_one(lots)
    assert acks == [(b"up", [0])]  # after a pause: at once
    clock[0] += 0.001
    _finish_one(lots)
    clock[0] += 0.001
    _finish_one(lots)
    assert acks == [(b"up", [0])] and lots.waiting()  # waiting for others to join
    clock[0] += 0.0035
    lots.acknowledge()
    assert acks == [(b"up", [0])]  # 4.5 ms after the first of them: not yet
    clock[0] += 0.001
    lots.acknowledge()
    assert acks == [(b"up", [0]), (b"up", [1, 2])]  # one message for both
    clock[0] += 0.001
    _finish_one(lots)
    lots.flush()  # the replica is about to wait, or end
    assert acks[-1] == (b"up", [3])
    assert lots.waiting()  # lot 4 is still to finish
    lots.take()
    lots.finish()
    lots.flush()
    assert acks[-1] == (b"up", [4]) and not lots.waiting()


def test_acknowledgements_wait_only_while_their_sender_has_room_for_more(clock):
    acks: list = []
    send = lambda frames: acks.append(msgpack.unpackb(frames[1]))  # noqa: E731
    # A sender keeps hwm messages unacknowledged to a replica at most: a
    # quarter of that waiting goes at once.
    lots = Lots(send, delay=0.005, hwm=8)
    for seq in range(4):
        lots.arrived(b"up", seq, 1)
    for _ in range(3):
        _finish_one(lots)
        clock[0] += 0.0001
    assert acks == [[0], [1, 2]]
    # With an hwm under 4, none waits.
    acks.clear()
    lots = Lots(send, delay=0.005, hwm=3)
    for seq in range(3):
        lots.arrived(b"up", seq, 1)
        _finish_one(lots)
        clock[0] += 0.0001
    assert acks == [[0], [1], [2]]


def test_an_idle_replica_sends_the_acknowledgements_waiting_when_their_time_is_up():
    # Three one-item messages in, each taken: the first is acknowledged at once,
    # the second waits for others to join it. The replica then waits for input
    # that does not come: its wait is cut short to send that acknowledgement.
    ctx = zmq.Context()
    try:
        sock = transport.pull(ctx, "inproc://acks", 100, balanced=True)
        up = ctx.socket(zmq.DEALER)
        up.setsockopt(zmq.IDENTITY, b"up")
        up.connect("inproc://acks")
        nobody = ctx.socket(zmq.DEALER)
        nobody.connect("inproc://nobody")
        lots = Lots(functools.partial(sock.send_multipart, flags=zmq.NOBLOCK), ACK_DELAY, 100)
        inbox = Inbox(sock, Control(nobody), "sink", 100, balance.Lender(sock, 100, False), lots)
        for seq in range(3):
            up.send_multipart([lease_frame(seq, 0), *codec.encode([seq])])
        items = inbox.items
        assert [next(items) for _ in range(3)] == [0, 1, 2]  # lots 0 and 1 finished
        acks = []

        def take_acks() -> None:
            while up.poll(0):
                message = msgpack.unpackb(up.recv())
                if type(message) is list:  # not a credit (a bare count)
                    acks.extend(message)

        take_acks()
        assert acks == [0]
        assert inbox._fill(block=True, deadline=time.monotonic() + 1.0) is False
        take_acks()
        assert acks == [0, 1]
    finally:
        ctx.destroy(linger=0)
