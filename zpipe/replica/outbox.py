"""A replica's output: items batched onto its PUSH (or, into a replicated stage,
ROUTER) socket, never dropped.

Small items travel several to a message when a link is busy. An output that
follows the previous flush by more than IDLE_GAP leaves at once (no latency
on an idle link); otherwise it waits at most BATCH_WAIT for others to join it.
"""

from __future__ import annotations

import functools
import threading
import time
from typing import Any, Callable

import zmq

from ..errors import EncodeError
from ..watch.observe import Times
from ..wire import codec, shm
from ..wire.transport import NOBLOCK, send_frame, send_frames
from .balance import Dispatcher
from .control import Control, SourceStopped
from .inbox import IDLE_POLL_MS, Inbox

BATCH_ITEMS = 1000
# Credits count messages, not items (see balance.py): into a replicated stage,
# small batches keep the work a replica holds, and so the work spread, even.
BATCH_ITEMS_REPLICATED = 4
# Large items gain nothing from sharing a message, and what a link holds is
# about hwm messages: this keeps that near hwm x 64 kB for small items.
BATCH_BYTES = 64 * 1024
BATCH_WAIT = 0.001
# The fast path (Outbox._fast_send) looks at its batch at every CHECK_EVERY-th
# output, at each of a batch's first CHECK_EVERY, and at any output larger than
# LARGE_OUTPUT bytes: a batch may wait that many outputs past BATCH_WAIT or
# BATCH_BYTES, never more.
CHECK_EVERY = 16
LARGE_OUTPUT = 1024
# While the stage is busy in user code, a waiting batch leaves within this;
# a shorter period costs a busy stage more thread wake-ups than it saves.
FLUSHER_PERIOD = 0.005
# ... and within this at most: while the main thread keeps sending on its own,
# the Flusher looks half as often each time, down to once per FLUSHER_MAX
# (each look takes the GIL from the stage: see Flusher).
FLUSHER_MAX = 0.04
IDLE_LOOK = 0.05  # an idle Flusher looks at its batch this often all the same
IDLE_GAP = 0.0002
TRACK_WAIT = 0.02  # while ZeroMQ still holds a sent array, look for commands this often
STAMP_EVERY = 0.1  # a source stamps a message this often: the sink times it end to end

_NOTHING = object()
_join = b"".join
_monotonic = time.monotonic


class Outbox:
    """Encodes and sends a replica's outputs, blocking (never dropping) when downstream is full.

    Outputs are packed into a batch as they come (see BATCH_*); the batch
    leaves when it is full, when it holds an array or many bytes, when its
    oldest output has waited BATCH_WAIT, or when the replica is about to wait
    for input. While the main thread is busy in user code, a Flusher thread
    sends a batch whose time is up; a lock hands the socket between the two.
    """

    def __init__(self, sock: zmq.Socket | None, control: Control, source: bool,
                 number_outputs: bool = False, ordered_by: Inbox | None = None,
                 dispatcher: Dispatcher | None = None, copy_arrays: bool = True,
                 segments: shm.Segments | None = None):
        self.sock = sock
        self.control = control
        self.source = source
        self.sent = 0
        self.markers = 0
        self.number_outputs = number_outputs
        self.numbered = 0
        self.ordered_by = ordered_by     # an ordered stage's inbox: outputs take its numbers
        self.pending: Any = _NOTHING     # an ordered stage's output, held until the next one
        self.dispatcher = dispatcher
        # segments: large items go through shared memory (an ipc link, not leased: shm.py).
        self.batch = codec.Batch(copy_arrays=copy_arrays, segments=segments)
        # Arrays leave without a copy; put() then returns only once ZeroMQ has
        # let go of them (see _send_now), so the stage may change them after.
        self.track_arrays = not copy_arrays
        self.lock = threading.Lock()
        self.oldest = 0.0                # when the batch's first output was added
        self.last_flush = 0.0
        self.sends = 0  # messages the main thread has sent (the Flusher's sign of progress)
        self.flusher: Flusher | None = None
        self.max_size: int | None = None
        self.downstream = ""
        self.batch_items = BATCH_ITEMS
        self.checking = False
        self.times = Times()  # the runtime's, shared with its inbox (observe.py)
        self.origins: Inbox | None = None  # the stamps to carry on (a stage with input)
        self.next_stamp = 0.0
        self.timed_sent = 0
        if sock is not None:
            # Sends one message without waiting; False when downstream has no room now.
            self.try_send = dispatcher.send if dispatcher is not None else \
                functools.partial(_send, sock)
            self.poller = zmq.Poller()
            # Room downstream shows as POLLOUT on a PUSH, as a credit coming in on a ROUTER.
            self.poller.register(sock, zmq.POLLIN if dispatcher is not None else zmq.POLLOUT)
            self.poller.register(control.sock, zmq.POLLIN)
            self.flusher = Flusher(self)
            self.flusher.start()
        # send(item) is what the stage's outputs go to: on a plain link (the
        # usual case) the fast path below, else the tagging; both end in put().
        # Plain: no numbers on the outputs (runs.py needs that too).
        self.plain = not (number_outputs or ordered_by is not None)
        self.in_run = False  # a run of calls is under way (runs.py): the Flusher stays awake
        if not self.plain:
            self.send = self._send_tagged
        else:
            self.send = self._fast_send() if sock is not None else self.put
        if ordered_by is not None:
            ordered_by.numbered = True  # its input's messages must all carry seqs

    def _send_tagged(self, item: Any) -> None:
        if self.ordered_by is not None:
            # Held back one output so that the last one of each input can carry LAST.
            if self.pending is not _NOTHING:
                self.put(self.pending, [self.ordered_by.seq, 0])
            self.pending = item
            return
        tag, self.numbered = [self.numbered, codec.TAG_LAST], self.numbered + 1
        self.put(item, tag)

    def end_input(self) -> None:
        """An ordered stage has handled one input completely: close its outputs."""
        assert self.ordered_by is not None
        seq = self.ordered_by.seq
        if self.pending is _NOTHING:
            self.markers += 1
            self.put(None, [seq, codec.TAG_LAST | codec.TAG_MARKER])
        else:
            item, self.pending = self.pending, _NOTHING
            self.put(item, [seq, codec.TAG_LAST])

    def put(self, item: Any, tag: Any = None) -> None:
        """Add one output to the batch; send the batch if it is due.

        Every output of every stage passes here: the common case (the batch
        fills, nothing is due) is kept to a few attribute reads.
        """
        now = _monotonic()
        if self.sock is None:
            self.sent += 1
        else:
            # acquire/release rather than `with`: a tenth of this call's cost.
            self.lock.acquire()
            try:
                batch = self.batch
                joining = bool(batch.encoded)
                if self.max_size is None:
                    batch.add(item, tag)
                else:
                    self._add_capped(item, tag, now)
                if joining:
                    if batch.arrays or batch.shared or len(batch.encoded) >= self.batch_items or \
                            batch.header_bytes >= BATCH_BYTES or now - self.oldest >= BATCH_WAIT:
                        self._flush_locked()
                else:
                    self.oldest = now
                    if self._stamp_due(now):
                        self._stamp(now)
                    if batch.arrays or batch.shared or now - self.last_flush > IDLE_GAP:
                        self._flush_locked()
                    elif self.flusher is not None and self.flusher.idle:
                        self.flusher.idle = False
                        self.flusher.armed.set()
            finally:
                self.lock.release()
        self._check_control(now)

    def _fast_send(self) -> Callable[[Any], None]:
        """send() on a plain link: pack and append, and nothing else for most outputs.

        put() decides per output whether the batch is due, and takes the lock
        the Flusher shares; here an output is packed and appended without
        either, and every CHECK_EVERY-th output (each of a batch's first ones,
        and any large one) makes the same decisions (_checkpoint). Appending
        without the lock is safe because only this thread appends, a list's
        append is atomic, and the Flusher sends a count of outputs it read
        under the lock and then drops just those (flush_if_due). Outputs that
        hold arrays, and every output while max_size applies, take put().
        """
        batch, put, checkpoint, alone = self.batch, self.put, self._checkpoint, self._alone
        # Bound once: every name below is a local or a closure cell, not an
        # attribute or global looked up per output.
        pack, pack_any, fresh = batch._pack, batch.pack, batch.fresh
        fresh_shared = batch.fresh_shared
        every, large = CHECK_EVERY, LARGE_OUTPUT

        def send(item: Any) -> None:
            if self.max_size is not None:
                return put(item)
            try:
                # A large bytes item becomes a frame of its own (Batch.pack).
                data = pack(item) if type(item) is not bytes else pack_any(item)
            except Exception:  # noqa: BLE001 - put() packs it again, and names the type
                batch.forget()
                return put(item)
            if fresh or fresh_shared:  # it holds arrays or made a frame or a segment:
                # those go at once (put's rule)
                return self._put_packed(data)
            encoded = batch.encoded
            if not encoded and alone(data):
                return None
            encoded.append(data)
            count = len(encoded)
            if count < every or not count % every or len(data) > large:
                checkpoint()
            return None
        return send

    def _alone(self, data: bytes) -> bool:
        """The fast path's output into an empty batch: after a pause it leaves at once
        in a message of its own, the batch left empty (_checkpoint would send it
        too, through the batch: a few microseconds more on every item's way at a
        low rate). False when it is to begin a batch instead: no pause, or a
        stamp due. The batch is empty without the lock: only this thread adds
        to it, and the Flusher only takes what is there."""
        now = _monotonic()
        if now - self.last_flush <= IDLE_GAP or self._stamp_due(now):
            return False
        self.lock.acquire()
        try:
            self._send_now([codec.HEAD_ONE + data], 1)
        finally:
            self.lock.release()
        self._check_control(now)
        return True

    def _put_packed(self, data: bytes) -> None:
        """An output already packed, holding arrays: added and sent at once, as by put()."""
        self.lock.acquire()
        try:
            self.batch.add_packed(data)
            self.oldest = _monotonic()
            self._flush_locked()
        finally:
            self.lock.release()
        self._check_control(_monotonic())

    def _checkpoint(self, added: int = 1, since: float | None = None) -> None:
        """The fast path's look at its batch: put()'s rules for when it leaves. After a
        run (runs.py), ``added`` outputs may have come since the last look, the
        first of them at ``since``."""
        now = _monotonic()
        self.lock.acquire()
        try:
            batch = self.batch
            count = len(batch.encoded)
            if count and count <= added:  # a batch begins (count 0: the Flusher just took it)
                self.oldest = now if since is None else since
                if self._stamp_due(now):
                    self._stamp(now)
                if now - self.last_flush > IDLE_GAP:
                    self._flush_locked()  # after a pause an output leaves at once
                elif self.flusher is not None and self.flusher.idle:
                    self.flusher.idle = False
                    self.flusher.armed.set()
            elif count:
                if batch.origin is None and self._stamp_due(now):
                    self._stamp(now)
                if count >= self.batch_items or now - self.oldest >= BATCH_WAIT or \
                        batch.measure() >= BATCH_BYTES:
                    self._flush_locked()
        finally:
            self.lock.release()
        self._check_control(now)

    # -- runs of a map stage (runs.py) ---------------------------------------------

    def run_begins(self) -> None:
        """A run of several calls begins: meanwhile the Flusher looks at the batch, as
        while any call is busy, so an output made before a slow call still leaves."""
        flusher = self.flusher
        self.lock.acquire()
        try:
            self.in_run = True
            if not self.batch.encoded:
                self.oldest = _monotonic()
            if flusher is not None and flusher.idle:
                flusher.idle = False
                flusher.armed.set()
        finally:
            self.lock.release()

    def run_ended(self, items: int, started: float) -> tuple[int, bool]:
        """A run of ``items`` calls, begun at ``started``, has appended its outputs to the
        batch: an output that made frames leaves now, the rest by put()'s rules.
        Returns the run's outputs' mean size, and whether one may be a frame's worth
        (codec.FRAME_MIN or more)."""
        self.lock.acquire()
        try:
            self.in_run = False
            batch = self.batch
            # At most ``items`` outputs came, the newest last (the Flusher takes the oldest).
            encoded = batch.encoded
            recent = encoded if len(encoded) <= items else encoded[-items:]
            # Their size joined in C: half the time of sum(map(len, recent)) (25 ns an item).
            size = len(_join(recent))
            batch.counted(items, size)  # _checkpoint's measure() need not count them again
            large = size >= codec.FRAME_MIN and max(map(len, recent)) >= codec.FRAME_MIN
            # Under the lock: ``recent`` may be the batch's own list, which the
            # Flusher drops sent items from in place.
            mean = -(-size // max(1, len(recent)))  # rounded up
            if batch.fresh or batch.fresh_shared:  # they go at once (put's rule)
                batch.take_fresh()
                self._flush_locked()
        finally:
            self.lock.release()
        self._checkpoint(items, started)
        return mean, large

    def run_failed(self) -> None:
        """A run ended in an exception: what its last output left unfinished is dropped."""
        self.lock.acquire()
        try:
            self.in_run = False
            if self.batch.fresh or self.batch.fresh_shared:
                self.batch.forget()  # packing that output failed: it was never appended
        finally:
            self.lock.release()

    def _check_control(self, now: float) -> None:
        control = self.control
        if now >= control.next_check:
            # Left set if ABORT comes now: the input in hand has had its output
            # taken, so it counts as finished (see Inbox.unfinished).
            self.checking = True
            control.check(now)
            self.checking = False
            if self.source and control.stopped:
                raise SourceStopped()

    def _add_capped(self, item: Any, tag: Any, now: float) -> None:
        """Add an item under max_size: if it makes a frame too big for the next
        stage, send what came before on its own first, or fail if it is too big alone."""
        assert self.max_size is not None
        batch = self.batch
        batch.max_size = self.max_size  # an array above it fails before it is copied
        mark = len(batch.arrays)
        try:
            batch.add(item, tag)
        except codec.FrameTooLarge as exc:
            raise EncodeError(f"an item holding an array of {exc.nbytes} bytes is larger than "
                              f"stage {self.downstream!r} accepts (max_message_size "
                              f"{self.max_size})") from None
        if batch.largest_frame() <= self.max_size:
            return
        last = batch.pop(mark)
        if batch.encoded:
            self._flush_locked()
        batch.push(*last)
        if batch.largest_frame() > self.max_size:
            batch.pop(0)
            data, _, arrays = last
            raise EncodeError(f"an item of {len(data) + sum(len(a) for a in arrays)} bytes is "
                              f"larger than stage {self.downstream!r} accepts "
                              f"(max_message_size {self.max_size})")
        self.oldest = now

    def _stamp_due(self, now: float) -> bool:
        if self.source:
            return now >= self.next_stamp
        origins = self.origins
        return origins is not None and origins.origin is not None

    def _stamp(self, now: float) -> None:
        """The batch just begun carries a send time: a source's own (now), or the
        one of the last stamped message in (a sampled few; observe.py)."""
        if self.source:
            self.batch.origin = time.time()
            self.next_stamp = now + STAMP_EVERY
        elif self.origins is not None:
            self.batch.origin, self.origins.origin = self.origins.origin, None

    def flush(self) -> None:
        """Send what waits in the batch (main thread; blocks while downstream is full)."""
        if self.sock is not None and self.batch.encoded:
            with self.lock:
                if self.batch.encoded:
                    self._flush_locked()

    def _flush_locked(self) -> None:
        count = self.batch.squeeze()
        if count:  # else only a map stage's None outputs waited: nothing to send
            self._send_now(self.batch.frames(), count)
        self.batch.clear()

    def _send_now(self, frames: list[Any], count: int) -> None:
        """Send one message of ``count`` items, blocking while downstream is full."""
        tracked = None
        if self.track_arrays and len(frames) > 1:
            frames, tracked = _tracked(frames)
        if not self.try_send(frames, count):
            self._send_blocking(frames, count)
        if tracked is not None:
            # A zmq.Frame holds its message too: ours must go before ZeroMQ can let go.
            frames.clear()
            self._wait_released(tracked)
        self.sent += count
        self.sends += 1
        # Taken after the send: a send that waited on a full link does not
        # make the next output look like the first after a pause.
        self.last_flush = now = _monotonic()
        if self.source:  # a source's items are timed by what it sends
            times = self.times
            times.mark(now, self.sent - self.timed_sent)
            self.timed_sent = self.sent

    def flush_if_due(self, rest: bool = True) -> bool:
        """From the Flusher: send the batch if its time is up and the socket takes it now.

        Returns whether the Flusher is to look again later: a batch still waits,
        a run is under way, or ``rest`` is False (it keeps looking all the same).
        """
        if not self.lock.acquire(blocking=False):
            return True  # the main thread is sending: look again later
        try:
            assert self.sock is not None and self.flusher is not None
            now = time.monotonic()
            batch = self.batch
            # Not while an output's frames or segments wait in ``fresh``: its encoding
            # may be in the batch already (runs.py), and the main thread sends it at once.
            if batch.encoded and not (batch.fresh or batch.fresh_shared) and \
                    now - self.oldest >= BATCH_WAIT:
                # The main thread may append as this runs (the fast path): send
                # the outputs there are now, then drop exactly those.
                count = batch.squeeze(len(batch))
                if count and not self.try_send(batch.frames(count), count):
                    return True  # downstream is full: the batch waits for the next look
                self.sent += count
                batch.drop(count)
                self.last_flush = now
            if rest and not self.batch.encoded and not self.in_run:
                # Decided under the lock, so that put() sees it and re-arms.
                self.flusher.idle = True
                return False
            return True
        finally:
            self.lock.release()

    def close(self) -> None:
        if self.flusher is not None:
            self.flusher.stop()
        if self.batch.segments is not None:
            self.batch.segments.close()

    # -- leased links (delivery.py) -----------------------------------------------

    def pending_seq(self) -> int:
        """The seq that the outputs made so far will have gone out in, once sent: an
        input finished now is acknowledged once that seq is (-1: nothing sent yet)."""
        assert self.dispatcher is not None
        # Under the lock: the Flusher may be sending the batch's first outputs
        # as one message while the last one, appended after it counted them,
        # waits for the next (see _fast_send); read apart, the seq could name
        # the message before the output's own, and an input be acknowledged
        # before its output was delivered.
        self.lock.acquire()
        try:
            waiting = bool(self.batch.encoded) or self.pending is not _NOTHING
            return self.dispatcher.outstanding.next_seq - (0 if waiting else 1)
        finally:
            self.lock.release()

    def acked_below(self) -> int:
        assert self.dispatcher is not None
        return self.dispatcher.outstanding.acked_below()

    def pump(self) -> None:
        """Take acknowledgements and credits, and send again what a lost replica held."""
        if self.dispatcher is not None:
            with self.lock:
                self.dispatcher.pump()

    def delivered(self) -> bool:
        """Whether every message sent has been acknowledged (always, unleased)."""
        return self.dispatcher is None or not (self.dispatcher.outstanding or
                                               self.dispatcher.events)

    def unsent(self) -> int:
        """Outputs produced and not handed to ZeroMQ: the batch, and a held-back output."""
        return self.batch.outputs() + (self.pending is not _NOTHING)

    def _wait_released(self, tracker: zmq.MessageTracker) -> None:
        """Wait until ZeroMQ is done with the arrays just sent (written to the socket):
        from then on the stage may change them. ABORT still comes through."""
        if tracker.done:
            return
        started = _monotonic()
        try:
            while True:
                try:
                    tracker.wait(TRACK_WAIT)
                    return
                except zmq.NotDone:
                    self.control.check(_monotonic())
        finally:
            self.times.blocked += _monotonic() - started

    def _send_blocking(self, frames: list[Any], count: int) -> None:
        started = _monotonic()
        try:
            while True:
                events = dict(self.poller.poll(IDLE_POLL_MS))
                if self.control.sock in events:
                    self.control.handle()
                if self.try_send(frames, count):
                    return
        finally:
            self.times.blocked += _monotonic() - started


def _tracked(frames: list[Any]) -> tuple[list[Any], zmq.MessageTracker | None]:
    """The frames with each large array as a tracked zmq.Frame, and their tracker
    (None when there is none: pyzmq copies a small frame as it sends it, and a
    large ``bytes`` item, codec.EXT_BYTES, never changes, so nobody waits for it)."""
    out, trackers = [frames[0]], []
    for frame in frames[1:]:
        if type(frame) is not bytes and len(frame) >= zmq.COPY_THRESHOLD:
            frame = zmq.Frame(frame, copy=False, track=True)
            trackers.append(frame.tracker)
        out.append(frame)
    return out, (zmq.MessageTracker(*trackers) if trackers else None)


def _send(sock: zmq.Socket, frames: list[Any], count: int = 0) -> bool:
    """Send without blocking (False if full); large arrays and bytes items without a copy,
    small headers copied (a copy is cheaper than a zero-copy frame for a few hundred bytes)."""
    try:
        if len(frames) == 1:
            send_frame(sock, frames[0], NOBLOCK)
        else:
            send_frames(sock, frames, NOBLOCK)
    except zmq.Again:
        return False
    return True


class Flusher(threading.Thread):
    """Sends an outbox's batch that has waited BATCH_WAIT, looking every FLUSHER_PERIOD,
    or less often, down to every FLUSHER_MAX, while it is not needed.

    It sleeps on ``armed`` while no batch waits; the outbox sets it when a
    batch starts and the Flusher is idle (both under the outbox's lock).

    Each look takes the GIL, so that a stage busy in Python is made to hand
    it over and take it back. In a chain of 12 stages on 2 cores, looks every
    5 ms cost 0.89 µs of CPU per item per hop where backing off cost 0.80
    (medians of 3 runs in turns, before the Flusher kept looking instead of
    resting; the rule below read 1.20 against 1.55 on a loaded host). With
    looks every 5 ms the Flusher threads woke 16 times per 1,000 items, and
    the stages' main threads were preempted three times as often as a raw
    chain's. A stage whose main thread has sent since the last look
    (Outbox.sends) is not stuck in a call: the period doubles, and meanwhile
    the Flusher keeps looking rather than resting between batches (a rest
    ends in a wake-up at the next batch, of which a chain makes hundreds a
    second). A look after no send (a long call, or no input) brings the
    period back to FLUSHER_PERIOD, from where it may rest again.
    """

    def __init__(self, outbox: Outbox):
        super().__init__(name="zpipe-flusher", daemon=True)
        self.outbox = outbox
        self.armed = threading.Event()
        self.idle = True
        self.stopping = False
        self.period = FLUSHER_PERIOD  # kept from one arming to the next

    def run(self) -> None:
        outbox = self.outbox
        try:
            while not self.stopping:
                # Bounded: were a wake-up ever missed, a waiting batch would
                # still leave within IDLE_LOOK (costing an idle replica a
                # look every IDLE_LOOK, nothing more).
                self.armed.wait(IDLE_LOOK)
                self.armed.clear()
                while not self.stopping:
                    sends = outbox.sends
                    time.sleep(self.period)
                    self.period = FLUSHER_PERIOD if outbox.sends == sends else \
                        min(self.period * 2, FLUSHER_MAX)
                    if not outbox.flush_if_due(rest=self.period == FLUSHER_PERIOD):
                        break
        except zmq.ZMQError:
            # The socket was closed under it: the replica is ending (a signal
            # cut its close short); what the batch held is the replica's to report.
            pass

    def stop(self) -> None:
        self.stopping = True
        self.armed.set()
        self.join(5)
