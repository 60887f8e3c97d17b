"""The Outbox's fast path: outputs packed and appended without the lock, batches still bounded,
and the Flusher taking a batch while outputs keep coming loses or repeats none."""

from __future__ import annotations

import threading
import time

import pytest
import zmq

from zpipe.replica import outbox as outbox_module
from zpipe.replica.control import Control
from zpipe.replica.outbox import Outbox
from zpipe.wire import codec


@pytest.fixture
def link():
    """A PUSH -> PULL link over inproc with room for everything, and a control
    DEALER with nobody behind it."""
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    pull.setsockopt(zmq.RCVHWM, 0)
    pull.bind("inproc://outbox")
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.SNDHWM, 0)
    push.connect("inproc://outbox")
    control = ctx.socket(zmq.DEALER)
    control.connect("inproc://nobody")
    yield push, pull, Control(control)
    ctx.destroy(linger=0)


def receive(pull: zmq.Socket, count: int, timeout: float = 20.0) -> list[list]:
    """The messages (each a list of items) until ``count`` items have come."""
    messages, got, deadline = [], 0, time.monotonic() + timeout
    while got < count and time.monotonic() < deadline:
        if pull.poll(50):
            items = codec.decode(pull.recv_multipart())
            messages.append(items)
            got += len(items)
    return messages


def spin(seconds: float) -> None:
    """Busy in 'user code', holding the GIL as a stage's Python would."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def test_outputs_arrive_once_and_in_order_while_the_flusher_takes_batches(link):
    push, pull, control = link
    outbox = Outbox(push, control, source=False)
    count = 60_000
    received: list[list] = []
    reader = threading.Thread(target=lambda: received.extend(receive(pull, count)))
    reader.start()
    try:
        assert outbox.send != outbox.put  # the fast path is what this tests
        for i in range(count):
            outbox.send(i)
            # Pauses of every length around BATCH_WAIT, between checkpoints
            # too: the Flusher takes batches while this thread keeps appending.
            if i % 37 == 0:
                spin((i % 5) * 0.0004)
        outbox.flush()
        reader.join(30)
    finally:
        outbox.close()
    items = [item for message in received for item in message]
    assert items == list(range(count))
    assert outbox.sent == count and outbox.unsent() == 0


def test_a_fast_stream_travels_in_bounded_batches(link):
    push, pull, control = link
    outbox = Outbox(push, control, source=False)
    try:
        small, large = [{"id": i, "pad": "x" * 60} for i in range(20_000)], \
            [b"y" * 5000 for _ in range(400)]
        for item in small + large:
            outbox.send(item)
        outbox.flush()
        messages = receive(pull, len(small) + len(large))
    finally:
        outbox.close()
    assert sum(map(len, messages)) == len(small) + len(large)
    # Several to a message, as put() batches them...
    assert len(messages) < len(small) / 50
    # ...and never past its bounds by more than one look's worth of outputs.
    slack = outbox_module.CHECK_EVERY
    assert max(map(len, messages)) <= outbox.batch_items + slack
    sizes = [len(codec.encode(message)[0]) for message in messages]
    assert max(sizes) <= outbox_module.BATCH_BYTES + slack * 200 + 5100


def test_an_output_after_a_pause_leaves_at_once(link):
    push, pull, control = link
    outbox = Outbox(push, control, source=False)
    try:
        time.sleep(0.01)  # a pause longer than IDLE_GAP: the link is idle
        outbox.send("alone")
        # No flush(): the output must be on its way by itself.
        assert pull.poll(2000), "an output after a pause waited for others"
        assert codec.decode(pull.recv_multipart()) == ["alone"]
    finally:
        outbox.close()


def test_an_output_waiting_in_a_batch_leaves_while_its_stage_is_busy(link):
    push, pull, control = link
    outbox = Outbox(push, control, source=False)
    try:
        for i in range(3):  # a batch begins, and the next outputs join it
            outbox.send(i)
        got: list = []
        deadline = time.monotonic() + 5
        while len(got) < 3 and time.monotonic() < deadline:
            # Inside a long call that holds the GIL: only the Flusher can send them,
            # once CPython's switch interval (5 ms) makes this thread hand it over.
            # (A call that lets go of the GIL more often than that, as a spin of
            # 2 ms between polls did here, can keep the Flusher out for seconds:
            # each release restarts its wait for the GIL.)
            spin(0.05)
            while pull.poll(0):
                got += codec.decode(pull.recv_multipart())
        assert got == [0, 1, 2]
    finally:
        outbox.close()


def test_the_flusher_looks_less_often_while_its_stage_sends_and_at_once_again_when_it_stops(
        link):
    """While the main thread sends its batches itself, each look of the Flusher
    doubles its period, up to FLUSHER_MAX (each look takes the GIL from the
    stage); a batch left waiting through a long call still leaves within that
    period, and a look that finds no send since the last brings the period back."""
    push, pull, control = link
    outbox = Outbox(push, control, source=False)
    flusher = outbox.flusher
    sent = 0
    try:
        deadline = time.monotonic() + 10
        at_most = None  # once there, a few looks more: it stays there
        while time.monotonic() < (at_most or deadline):
            outbox.send(sent)  # a batch begins (the last send was just now) ...
            outbox.send(sent + 1)
            outbox.flush()     # ... and this thread sends it well before it is due
            sent += 2
            time.sleep(outbox_module.IDLE_GAP / 4)  # (the Flusher gets the GIL)
            if at_most is None and flusher.period >= outbox_module.FLUSHER_MAX:
                at_most = time.monotonic() + 4 * outbox_module.FLUSHER_MAX
        assert flusher.period == outbox_module.FLUSHER_MAX
        assert sum(map(len, receive(pull, sent))) == sent
        outbox.send("left")  # joins a batch of its own ...
        outbox.send("behind")
        spin(outbox_module.FLUSHER_MAX * 4)  # ... through a call that holds the GIL
        assert pull.poll(0), "the batch waited out the long call"
        assert [item for m in receive(pull, 2) for item in m] == ["left", "behind"]
        assert flusher.period == outbox_module.FLUSHER_PERIOD
    finally:
        outbox.close()


def test_outputs_with_arrays_or_large_bytes_leave_at_once_with_their_frames(link):
    np = pytest.importorskip("numpy")
    push, pull, control = link
    outbox = Outbox(push, control, source=False)
    try:
        outbox.send({"n": 1})
        big = np.arange(100_000, dtype=np.float32)  # over 64 KiB: a frame of its own
        outbox.send({"image": big})
        outbox.send(b"z" * 200_000)
        messages = receive(pull, 3)
    finally:
        outbox.close()
    items = [item for message in messages for item in message]
    assert items[0] == {"n": 1}
    assert (items[1]["image"] == big).all()
    assert items[2] == b"z" * 200_000


def test_an_unsendable_output_is_named_and_the_batch_goes_on(link):
    push, pull, control = link
    outbox = Outbox(push, control, source=False)
    try:
        outbox.send(1)
        with pytest.raises(Exception, match="type set"):
            outbox.send({"bad": {1, 2}})
        outbox.send(2)
        outbox.flush()
        items = [item for message in receive(pull, 2) for item in message]
    finally:
        outbox.close()
    assert items == [1, 2]


def test_an_output_after_a_pause_never_passes_outputs_waiting_in_the_batch(link):
    push, pull, control = link
    outbox = Outbox(push, control, source=False)
    try:
        outbox.send(0)  # after a pause: alone, at once
        outbox.send(1)  # right after it: a batch begins, for the Flusher
        outbox.send(2)
        spin(outbox_module.IDLE_GAP * 5)  # a pause, shorter than the Flusher's period
        outbox.send(3)  # joins the batch that waits, behind 1 and 2
        outbox.flush()
        items = [item for message in receive(pull, 4) for item in message]
    finally:
        outbox.close()
    assert items == [0, 1, 2, 3]


def test_a_sources_output_after_a_pause_carries_the_stamp_due(link):
    push, pull, control = link
    outbox = Outbox(push, control, source=True)
    try:
        for i in range(3):
            spin(outbox_module.IDLE_GAP * 2)  # each output after a pause
            outbox.next_stamp = 0.0 if i == 1 else float("inf")  # a stamp due for the second
            outbox.send(i)
        outbox.flush()
        stamped = []
        while len(stamped) < 3 and pull.poll(2000):
            items, _, origin = codec.decode_stamped(pull.recv_multipart())
            stamped += [(item, origin is not None) for item in items]
    finally:
        outbox.close()
    assert stamped == [(0, False), (1, True), (2, False)]


@pytest.mark.parametrize("before", [0, 3])
def test_a_run_is_measured_by_its_own_outputs(link, before):
    # run_ended() gives the mean size of the run's outputs alone, whatever the
    # batch held before it (``before`` outputs of another size), and whether one
    # may be a frame's worth; every output still leaves once, in order.
    push, pull, control = link
    outbox = Outbox(push, control, source=False)
    try:
        batch = outbox.batch
        for i in range(before):
            outbox.send("w" * 40)
        outbox.run_begins()
        outputs = ["a" * 10, "b" * 20, "c" * 30]
        batch.encoded.extend(map(batch.packer.pack, outputs))
        mean, large = outbox.run_ended(len(outputs), time.monotonic())
        sizes = [len(codec.encode([o])[0]) - len(codec.HEAD_ONE) for o in outputs]
        assert sizes == [11, 21, 31]  # msgpack's fixstr: a byte, then the characters
        assert (mean, large) == (-(-sum(sizes) // 3), False)
        outbox.run_begins()
        huge = "h" * codec.FRAME_MIN
        batch.encoded.extend(map(batch.packer.pack, [huge, "e"]))
        mean, large = outbox.run_ended(2, time.monotonic())
        assert large and mean == -(-(len(batch.packer.pack(huge)) + 2) // 2)
        outbox.flush()
        got = [item for message in receive(pull, before + 5) for item in message]
    finally:
        outbox.close()
    assert got == ["w" * 40] * before + outputs + [huge, "e"]
