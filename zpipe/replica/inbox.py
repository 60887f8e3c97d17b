"""A replica's input: items off its PULL (or, replicated, ROUTER) socket, as the
iterator its stage consumes."""

from __future__ import annotations

import collections
import inspect
import itertools
import logging
import math
import operator
import select
import time
from typing import Any, Callable, Iterator

import msgpack
import zmq

from ..watch.observe import Times
from ..wire import codec, protocol, shm
from ..wire.transport import NOBLOCK, POLLIN, recv_frame, recv_rest
from .balance import Lender
from .control import Control
from .delivery import Lot, Lots, Poisoned, read_lease
from .shapes import Inputs

log = logging.getLogger("zpipe")

IDLE_POLL_MS = 1000
# A wait for input that begins after a message first waits this long inside
# ZeroMQ's own blocking receive (see Inbox._spell), commands unlooked at.
SPELL_MS = 5
MALFORMED_REPORTED = 5   # malformed messages logged one by one,
MALFORMED_EVERY = 1000   # then one line per this many
_monotonic = time.monotonic
_length_hint = operator.length_hint


class Inbox(Inputs):
    """The items arriving on a replica's input socket, as an iterator.

    It ends when the supervisor says STOP, which it does only once the
    replicas of this stage together have received every item upstream sent.
    """

    def __init__(self, sock: zmq.Socket, control: Control, stage: str, batch_limit: int,
                 lender: Lender | None = None, lots: Lots | None = None):
        self.sock = sock
        self.lender = lender  # a ROUTER input (a leased link): gives credits back
        # ... and acknowledges what it has finished (delivery.py). Messages meant
        # for an earlier generation of this replica are dropped.
        self.lots = lots
        self.generation = 0
        self.arrival: tuple[bytes, int, int] = (b"", 0, 0)  # sender, seq, attempt of the last
        # A stage whose on_error takes failed items works through a message sent
        # again item by item, naming each to the supervisor (recovery.py): one
        # that ends the replica is then poisoned, and handed to on_error.
        self.careful: Callable[[list[Any] | None], None] | None = None
        self.poison: dict[tuple[bytes, int, int], str] = control.poison
        self.batch_limit = batch_limit
        self.control = control
        self.stage = stage
        self.buffer: collections.deque[Any] = collections.deque()
        # The shared-memory side of an ipc input that takes segments (shm.py).
        self.segments: shm.Attached | None = None
        self.received = 0
        self.reported: int | None = None
        self.malformed = 0
        self.malformed_logged = 0  # the count the last log line gave
        self.malformed_why = ""
        self._last_item: Any = None  # see last_item
        # The list of items the stage is being given one by one (_lists), and the
        # iterator over it: those not given yet are still buffered (unfinished).
        self.given: list[Any] | None = None
        self.given_left: Iterator[Any] = iter(())
        self.seqs: collections.deque[int] = collections.deque()  # numbers of buffered items
        self.seq = -1                   # number of the item last returned (numbered links)
        self.reorder: Reorder | None = None
        self.owners: collections.deque[Lot] = collections.deque()  # lots of items reordered
        self.duplicates = 0  # entries for inputs already complete: sent again after a loss
        self.holding = 0  # items of a batch (set_get_all, batch) or in flight (concurrency.py)
        self.run_lots: list[list[Any]] = []  # [lot, items] of the run in hand (runs.py, leased)
        # What batches and input = "latest" did (figures for the heartbeat, observe.py):
        self.batches_taken = 0  # lists handed to the stage (batch, set_get_all)
        self.batched = 0        # ... and the items in them
        self.batch_seqs: list[int] = []  # the numbers of the last list's items (numbered links)
        self.dropped = 0        # items passed over for a newer one (input = "latest")
        # The driver of calls off the main thread (concurrency.py): a wait for
        # input also ends when this says so (a call has completed).
        self.interrupt: Callable[[], bool] | None = None
        # Whether every message on this link carries tags: an ordered stage's
        # input (its Outbox, which takes the seqs, sets this) and, with
        # reorder, the input after an ordered stage. Other links carry none.
        self.numbered = False
        self.before_idle: Callable[[], None] = lambda: None  # the outbox flushes its batch
        self.feeding: Iterator[Any] = self._lists() if lots is None else self._leased_items()
        self.items = itertools.chain.from_iterable(self.feeding) if lots is None else \
            self.feeding
        # zmq_poll's list, used directly: the Poller and ZMQ_EVENTS cost more per call
        self.input_only = [(sock, POLLIN)]
        # An idle replica sleeps in poll(2) on the sockets' ZMQ_FDs (see _idle).
        self.input_fd = sock.getsockopt(zmq.FD)
        sock.setsockopt(zmq.RCVTIMEO, SPELL_MS)  # only _spell receives blocking
        self.spell_due = False  # a message came since the last spell
        self.spelled: Any = None  # ... and the spell received one, for _receive
        self.sleep = select.poll()
        self.sleep.register(self.input_fd, select.POLLIN)
        self.sleep.register(control.sock.getsockopt(zmq.FD), select.POLLIN)
        # ... and, not taking input (concurrency.py, its calls all busy), on the rest.
        self.sleep_others = select.poll()
        self.sleep_others.register(control.sock.getsockopt(zmq.FD), select.POLLIN)
        self.wakes: dict[int, Callable[[], None]] = {}  # more descriptors that wake a wait
        self.woken_fd = -1
        self.on_wake: Callable[[], None] = lambda: None
        self.times = Times()  # the runtime's, shared with its outbox (observe.py)
        # The send time of the latest stamped message, for the next output to carry
        # on (outbox.py); at a sink, stamps are timed end to end instead.
        self.origin: float | None = None
        # The timing point of the message just taken in (now, items, idle, blocked),
        # for self.times: marked as the next one is taken (see _fill).
        self.unmarked: tuple[float, int, float, float] | None = None

    def __next__(self) -> Any:
        return next(self.items)

    def __iter__(self) -> Iterator[Any]:
        # One iterator serves `for` and next() alike (a stream function may mix
        # them), and this is every stage's hot loop: see _lists.
        return self.items

    @property
    def last_item(self) -> Any:
        """The item the stage was given last (a failure names its type)."""
        given = self.given
        if given is not None:
            taken = len(given) - _length_hint(self.given_left)
            if taken:
                return given[taken - 1]
        return self._last_item

    @last_item.setter
    def last_item(self, item: Any) -> None:
        self._last_item, self.given = item, None

    def _lists(self) -> Iterator[Iterator[Any]]:
        """What ``items`` chains: the buffered items, a list at a time (a message's
        worth, usually), so that the stage is given each one in C (by
        itertools.chain and a list's iterator), not by a generator resumed per
        item: in callgrind a sink of small items ran about 500 instructions an
        item fewer (of 8,000). Items numbered by their link go one by one, each
        with its number (``seq``)."""
        buffer, seqs = self.buffer, self.seqs
        while True:
            while not buffer:  # a message may add nothing yet (held back for reordering)
                if not self._fill(block=True):
                    return
            if seqs:
                self.given = None
                yield self._numbered()
                continue
            self.given = items = list(buffer)
            buffer.clear()
            self.given_left = left = iter(items)
            yield left
            # Gone through (the chain asks for more): its items go now, not once the
            # next message has come (maybe long after) and been decoded beside them.
            self._last_item, self.given = items[-1], None
            del items, left

    def _numbered(self) -> Iterator[Any]:
        buffer, seqs = self.buffer, self.seqs
        while buffer:
            if seqs:
                self.seq = seqs.popleft()
            item = self._last_item = buffer.popleft()
            yield item

    def queued(self) -> int:
        """Items received and not given to the stage yet (any thread: a figure)."""
        return len(self.buffer) + _length_hint(self.given_left)

    def _leased_items(self) -> Iterator[Any]:
        """``items`` on a leased link, an item at a time (not _lists): the stage asking
        for the next item has finished the one it held, which may let its message
        be acknowledged."""
        buffer, seqs, lots, owners = self.buffer, self.seqs, self.lots, self.owners
        assert lots is not None
        taking = lots.taking
        while True:
            while not buffer:
                if not self._fill(block=True):
                    return
            if seqs:
                self.seq = seqs.popleft()
            item = self._last_item = buffer.popleft()
            if owners:
                lots.hold(owners.popleft())
                yield item
                lots.finish()
                continue
            lot = taking[0]
            if not lot.attempt or self.careful is None:
                # Items come in order of arrival and are finished one after the
                # other: a lot is finished once the stage asks for the item after
                # its last one. Its items are at the front of the buffer: handed
                # out in a row, with nothing to note per item on the way.
                taking.popleft()
                rest, lot.to_take = lot.to_take - 1, 0
                yield item
                for _ in range(rest):
                    if seqs:
                        self.seq = seqs.popleft()
                    item = self._last_item = buffer.popleft()
                    yield item
                lots.finished(lot)
                continue
            lot.to_take -= 1
            if not lot.to_take:
                taking.popleft()
            lots.in_hand.append(lot)
            key = (lot.sender, lot.seq, lot.size - lot.to_take - 1)
            cause = self.poison.get(key)
            if cause is not None:
                yield Poisoned(item, cause)
            else:
                self.careful([*key])
                yield item
                self.careful(None)
            lots.finish()

    def batches(self, limit: int | None = None, wait: float = 0.0) -> Any:
        """Lists of the items waiting (at least one).

        Without ``limit`` (``set_get_all()``): every item waiting, taking in
        messages while fewer than ``batch_limit`` wait. With ``limit``
        (``batch = {...}``, batching.py): at most ``limit`` items, and while
        fewer wait, up to ``wait`` seconds for more: a deadline on the input
        socket, during which commands (ABORT, STOP) are still served and the
        outbox sends what it holds. An item sent again after a loss, on a
        stage whose on_error takes failed items, comes alone in its list,
        named to the supervisor first (``careful``; Poisoned if it is).
        """
        bounded = limit is not None
        limit = limit if limit is not None else self.batch_limit
        buffer, seqs, lots = self.buffer, self.seqs, self.lots
        while True:
            while not buffer:
                if not self._fill(block=True):
                    return
            while len(buffer) < limit and self._fill(block=False):
                pass
            if wait > 0 and len(buffer) < limit and not self.control.stopped:
                deadline = _monotonic() + wait
                while len(buffer) < limit and self._fill(block=True, deadline=deadline):
                    pass
            key = None
            count = len(buffer) if not bounded else min(limit, len(buffer))
            if bounded and self.careful is not None and lots is not None and not self.owners:
                count, key = self._careful_count(count)
            if count == len(buffer):
                batch = list(buffer)
                buffer.clear()
            else:
                batch = [buffer.popleft() for _ in range(count)]
            if seqs:
                self.batch_seqs = [seqs.popleft() for _ in range(min(count, len(seqs)))]
                self.seq = self.batch_seqs[-1]
            if lots is not None:
                for _ in batch:
                    lots.hold(self.owners.popleft()) if self.owners else lots.take()
            cause = self.poison.get(key) if key is not None else None
            if cause is not None:
                batch = [Poisoned(batch[0], cause)]
            elif key is not None:
                assert self.careful is not None
                self.careful([*key])
            self.last_item = batch
            self.holding = count
            self.batches_taken += 1
            self.batched += count
            yield batch
            self.holding = 0
            if key is not None and cause is None:
                assert self.careful is not None
                self.careful(None)
            if lots is not None:
                lots.finish()

    def take_run(self, limit: int) -> list[Any]:
        """Up to ``limit`` items, in order, for one run of a map stage (runs.py): those
        waiting (a message's worth, usually), or the next message's. [] once the
        input has ended. On a leased link the run's lots are noted (run_lots) and
        finished with run_done(). Unnumbered links only.

        It does not look for more messages while some items wait: at a low rate
        that look (a poll, and the last message's timing) would come before the
        item's call, on its latency."""
        buffer = self.buffer
        while not buffer:
            if not self._fill(block=True):
                return []
        count = min(limit, len(buffer))
        if self.lots is not None:
            self.run_lots = self.lots.take_counts(count)
        if count * 4 <= len(buffer):
            # A few items of many (a slow stage's runs of one, out of a message of
            # 1,000): copying the whole buffer, as below, would cost each run the
            # message's length (3.8 µs a run of one out of 1,000, 0.4 µs this way).
            popleft = buffer.popleft
            return [popleft() for _ in range(count)]
        items = list(buffer)
        buffer.clear()
        if count == len(items):
            return items
        buffer.extend(items[count:])  # in C, as the rest: cheaper than popleft() per item
        return items[:count]

    def run_done(self) -> None:
        """Every item of the last run is finished (its outputs are in the outbox)."""
        if self.lots is not None and self.run_lots:
            self.lots.finish_counts(self.run_lots)
            self.run_lots = []

    def give_back(self, items: list[Any]) -> None:
        """The last ``len(items)`` items of the run, not reached: first again, in their
        order, and on a leased link their lots' to take again."""
        self.buffer.extendleft(reversed(items))
        if self.lots is not None:
            self.lots.untake(self.run_lots, len(items))

    def _careful_count(self, count: int) -> tuple[int, tuple[bytes, int, int] | None]:
        """How many of the next ``count`` items may go in one list, on a leased link:
        those of messages sent for the first time; an item of one sent again goes
        alone (its key: the supervisor is told of it before the call)."""
        assert self.lots is not None
        taking = self.lots.taking
        if taking and taking[0].attempt:
            lot = taking[0]
            return 1, (lot.sender, lot.seq, lot.size - lot.to_take)
        allowed = 0
        for lot in taking:
            if lot.attempt or allowed >= count:
                break
            allowed += lot.to_take
        return max(1, min(count, allowed)), None

    # -- one item at a time, finished in any order (concurrency.py) ---------------

    def take(self) -> tuple[Any, Lot | None, int, tuple[bytes, int, int] | None]:
        """The next buffered item (there must be one): (item, its lot on a leased link,
        its number on a numbered one or -1, its key when it was sent again to a
        careful stage). ``finish(lot)`` once it is done, in whatever order."""
        item = self._last_item = self.buffer.popleft()
        seq = self.seqs.popleft() if self.seqs else -1
        lot = key = None
        lots = self.lots
        if lots is not None:
            if self.owners:
                lot = self.owners.popleft()
            else:
                lot = lots.taking[0]
                lot.to_take -= 1
                if not lot.to_take:
                    lots.taking.popleft()
                if lot.attempt and self.careful is not None:
                    key = (lot.sender, lot.seq, lot.size - lot.to_take - 1)
        return item, lot, seq, key

    def next_is_careful(self) -> bool:
        """Whether the next item was sent again to a stage that names such items before
        its call (it must then be the only one in the stage's hands)."""
        lots = self.lots
        return self.careful is not None and lots is not None and not self.owners and \
            bool(lots.taking) and lots.taking[0].attempt > 0

    def finish(self, lot: Lot | None) -> None:
        """An item ``take`` gave is finished: its outputs are sent, or it was dropped."""
        if lot is not None:
            assert self.lots is not None
            self.lots.done(lot)

    def drop_older(self, end_input: Callable[[], None] | None) -> int:
        """input = "latest": every buffered item but the newest is dropped: counted,
        finished (acknowledged on a leased link, so never sent again) and, on an
        ordered stage's numbered input, closed with a marker."""
        dropped = 0
        buffer = self.buffer
        while len(buffer) > 1:
            _, lot, seq, _ = self.take()
            if end_input is not None and seq >= 0:
                self.seq = seq
                end_input()
            if lot is not None:
                self._finish_dropped(lot)
            dropped += 1
        self.dropped += dropped
        return dropped

    def _finish_dropped(self, lot: Lot) -> None:
        """A dropped item's lot: once all its items are done, acknowledged at once,
        ahead of earlier lots still in a call. Lots are otherwise acknowledged in
        order of arrival (delivery.Lots), which would keep every dropped message
        unacknowledged behind the one in a long call; its sender may keep only
        ``hwm`` of them, and would then wait: upstream blocked by a latest stage.
        A lot without outputs needs nothing else first, and acknowledged it is
        not sent again after a loss, which is what dropping it means."""
        lots = self.lots
        assert lots is not None
        lot.left -= 1
        if lot.left:
            return
        try:
            lots.finishing.remove(lot)
        except ValueError:
            return
        lots.send([lot.sender, msgpack.packb([lot.seq])])
        lots.acknowledge()  # those behind it may be finished too

    def idle_without_input(self, timeout: float | None = None) -> None:
        """Wait for a command or a wake descriptor, not for input (the stage has all it
        may hold): the outbox sends what it holds first, commands are handled."""
        self.before_idle()
        if self.lots is not None:
            self.lots.flush()  # no input to wait for: nothing more would join them
        control = self.control
        control.check(_monotonic())
        control.handle()
        if self.woken_fd >= 0:
            self.on_wake()
        if self.interrupt is not None and self.interrupt():
            return
        ms = IDLE_POLL_MS if timeout is None else max(0, math.ceil(timeout * 1000))
        asleep = _monotonic()
        events = self.sleep_others.poll(ms)
        if not self.holding:
            self.times.idle += _monotonic() - asleep
        for fd, _ in events:
            if fd == self.woken_fd:
                self.on_wake()
            elif fd in self.wakes:
                self.wakes[fd]()
            else:
                control.handle()

    def _fill(self, block: bool, deadline: float | None = None) -> bool:
        """Receive one message into the buffer; False when none came (ended, not
        blocking, past ``deadline``, or ``interrupt``)."""
        if self.unmarked is not None:  # the last message's timing point, taken below
            self.times.mark_then(*self.unmarked)
            self.unmarked = None
        while True:
            frames = self._receive(block, deadline)
            if frames is None:
                if self.control.stopped:  # ended: the last message's items are done
                    self.times.mark(_monotonic(), 0)
                return False
            try:
                items, tags, origin = codec.decode_stamped(frames, self.segments)
                if tags is None:
                    if self.reorder is None and not self.numbered:
                        break
                    raise codec.DecodeError("untagged, on a link that numbers every item")
                self._check_numbers(tags, self.lots is not None)
                break
            except codec.DecodeError as exc:
                # Anyone may reach a socket: what is not zpipe's format is
                # dropped, never fatal (a real peer of another version is
                # caught by the supervisor when it says hello).
                self._malformed(str(exc))
                if self.lots is not None:
                    # A sender that leased it waits for it: nothing to do, done.
                    sender, seq, _ = self.arrival
                    self.lots.arrived(sender, seq, 0)
        self.received += len(items)
        times = self.times
        if self.interrupt is None:  # concurrency.py times each call itself
            # Marked at the next _fill, once the stage has had these items: at a
            # low rate, marking (a histogram's update) on a cold cache costs a few
            # microseconds on each item's way to its stage.
            self.unmarked = (_monotonic(), len(items), times.idle, times.blocked)
        if origin is not None:
            if times.end_to_end is not None:
                times.end_to_end.add(max(0.0, time.time() - origin))
            else:
                self.origin = origin
        if self.lots is not None:
            self._arrived(items, tags)
        elif tags is None:
            self.buffer.extend(items)
        elif self.reorder is not None:
            self.buffer.extend(self.reorder.add(items, tags))
        else:
            self.buffer.extend(items)
            self.seqs.extend(tag[0] for tag in tags)
        return True

    def _log_malformed(self) -> None:
        self.malformed_logged = self.malformed
        log.warning("stage %r dropped a malformed message (%d so far): %s", self.stage,
                    self.malformed, self.malformed_why)

    def _arrived(self, items: list[Any], tags: list[Any] | None) -> None:
        """A message on a leased link: its items, and its lot to acknowledge once done."""
        lots = self.lots
        assert lots is not None
        sender, seq, attempt = self.arrival
        if self.reorder is None:
            lots.arrived(sender, seq, len(items), attempt=attempt)
            self.buffer.extend(items)
            if tags is not None:
                self.seqs.extend(tag[0] for tag in tags)
            return
        lot = lots.arrived(sender, seq, len(items), reordered=True)
        ready, done = self.reorder.add_owned(items, tags, lot)
        self.duplicates = self.reorder.duplicates
        for item, owner in ready:
            self.buffer.append(item)
            self.owners.append(owner)
        for owner in done:  # markers, and entries for inputs already complete
            lots.done(owner)

    def _check_numbers(self, tags: list[Any], leased: bool = False) -> None:
        """Raise DecodeError unless ``tags`` (each a well-formed ``[seq, flags]``, as
        decode_tagged checked) belong on this link, before anything is counted.

        On a leased link, entries for an input already complete may come again
        (a replica of the ordered stage was lost, and its input sent again to
        another): those are dropped when they arrive, not the whole message."""
        reorder = self.reorder
        if reorder is None:
            if not self.numbered:
                raise codec.DecodeError("tagged, on a link that does not number items")
            # Into an ordered stage: each entry is one input, the last of its number.
            for tag in tags:
                if tag[1] != codec.TAG_LAST:
                    raise codec.DecodeError(f"tag {tag} into an ordered stage, not [seq, LAST]")
            return
        # Out of an ordered stage: nothing may come for an input once its LAST has.
        released, complete, closed = reorder.next, reorder.complete, set()
        for seq, flags in tags:
            if seq in closed or (not leased and (seq < released or seq in complete)):
                raise codec.DecodeError(f"an entry for input {seq}, after its last")
            if flags & codec.TAG_LAST:
                closed.add(seq)

    def _receive(self, block: bool, deadline: float | None = None) -> list[Any] | None:
        """The frames of the next message; None when none came (ended, not blocking,
        past ``deadline``, or ``interrupt`` says a call has completed)."""
        sock, control, lender = self.sock, self.control, self.lender
        wanted_at = _monotonic() if lender is not None else 0.0
        ready = False  # the last poll saw a message waiting
        while True:
            # Asking first is cheaper than a receive that fails (pyzmq raises
            # Again), and on an idle link that failure would sit between a
            # replica's send and its next wait.
            spelled = self.spelled
            if spelled is not None or ready or zmq.zmq_poll(self.input_only, 0):
                if spelled is not None:
                    head, self.spelled = spelled, None
                else:
                    try:
                        head = sock.recv(NOBLOCK, copy=False)
                    except zmq.Again:
                        ready = False
                        continue
                self.spell_due = True
                # More frames: arrays, and on a leased link the sender's id
                # and the lease before the data (one frame: no call, on the way
                # of every lone item).
                frames = recv_rest(sock, head) if head.more else [head]
                if lender is not None:
                    # On a ROUTER the sender's id comes first, then the lease.
                    frames = self._leased(frames, wanted_at)
                    if frames is None:
                        continue
                now = _monotonic()
                if now >= control.next_check:
                    control.check(now)
                return frames
            if not block or control.stopped:
                return None
            if deadline is not None and deadline <= _monotonic():
                return None
            if self.interrupt is not None and self.interrupt():
                return None
            ready = self._idle(deadline)

    def _leased(self, frames: list[Any], wanted_at: float) -> list[Any] | None:
        """The data frames of a message on a leased link, once its lease is read; None
        for a message dropped here (no lease, or meant for an earlier generation)."""
        lender, lots = self.lender, self.lots
        assert lender is not None and lots is not None
        if len(frames) < 3:
            self._malformed("no lease and data after the sender's id")
            return None
        sender = frames[0].bytes
        try:
            seq, generation, attempt = read_lease(frames[1].bytes)
        except codec.DecodeError as exc:
            self._malformed(str(exc))
            return None
        if generation != self.generation:
            lots.stale += 1  # queued for this replica's earlier life: sent again anyway
            return None
        # This replica starts on the message now, which frees a credit.
        lender.took(sender, wanted_at)
        self.arrival = (sender, seq, attempt)
        return frames[2:]

    def _malformed(self, why: str) -> None:
        self.malformed += 1
        self.malformed_why = why
        # A flood must not become a flood of log lines: the first few
        # say why, then one line per MALFORMED_EVERY, and the count
        # whenever the input falls idle (_idle).
        if self.malformed <= MALFORMED_REPORTED or self.malformed % MALFORMED_EVERY == 0:
            self._log_malformed()

    def _idle(self, deadline: float | None = None) -> bool:
        """Wait for input or a command (handling it), until ``deadline`` if given;
        True if input may be waiting.

        A ZMQ_FD only wakes on activity that came after its socket was last
        looked at, so both sockets are looked at first (the input just was,
        by the caller). Sleeping on the bare descriptors rather than in
        zmq_poll spares the wake-up, which is on every item's way at low load,
        zmq_poll's look at the control socket.
        """
        self.before_idle()  # never sit on outputs while waiting for input
        if self.malformed != self.malformed_logged:
            self._log_malformed()
        control = self.control
        # The last look at the control socket must come after the last send
        # on it (a send may take in the wake-up of a command that arrived), and
        # DRAIN may come in with that look: hence a loop that ends with a look.
        while True:
            control.handle()
            if control.stopped or not (control.draining and self.received != self.reported):
                break
            control.send(protocol.RECEIVED, received=self.received)
            self.reported = self.received
        if control.stopped:
            return False
        lots = self.lots
        sent_on_input = False
        if lots is not None and lots.due and lots.due <= _monotonic():
            # Acknowledgements that waited for others to join them (delivery.py):
            # their time is up.
            lots.flush()
            sent_on_input = True
        if self.woken_fd >= 0:
            self.on_wake()  # looked at: its ZMQ_FD then wakes for what comes next
            sent_on_input = True  # it sends acknowledgements on the input socket
        # A send on the input socket may have taken in the input's wake-up: look
        # at the input before sleeping on it.
        if sent_on_input and zmq.zmq_poll(self.input_only, 0):
            return True
        if self.spell_due and self._spell(deadline):
            return True
        ready = False
        asleep = _monotonic()
        timeout = IDLE_POLL_MS if deadline is None else \
            max(0, min(IDLE_POLL_MS, math.ceil((deadline - asleep) * 1000)))
        if lots is not None and lots.due:
            # ... and until then, input may come and finish more to join them.
            timeout = max(0, min(timeout, math.ceil((lots.due - asleep) * 1000)))
        events = self.sleep.poll(timeout)
        if not self.holding:  # calls in flight (concurrency.py): not idle
            self.times.idle += _monotonic() - asleep
        for fd, _ in events:
            if fd == self.input_fd:
                ready = True
            elif fd == self.woken_fd:
                self.on_wake()
                ready = ready or bool(zmq.zmq_poll(self.input_only, 0))
            elif fd in self.wakes:
                self.wakes[fd]()
            else:
                control.handle()
        return ready

    def _spell(self, deadline: float | None) -> bool:
        """The first part of a wait that begins after a message, on a plain input with
        nothing else to wake for: up to SPELL_MS in ZeroMQ's blocking receive; True
        if a message came (``spelled``, taken by _receive), else the wait goes on
        as usual, commands that came meanwhile first.

        At a low rate the next message often comes within it, and handed over
        from inside ZeroMQ's own wait, each receiving hop takes about 15 µs less
        than from the wake-up of poll(2) on the ZMQ_FDs and the receive after
        it (paired runs of a sink at one item every 2 ms: median 14 and 20 µs
        over 8 and 10 pairs; the bench's 3-stage latency, two receiving hops:
        -17 µs over 10 pairs). A command waits at most SPELL_MS for it, and a
        replica that stays idle has one spell, then sleeps on the descriptors.
        """
        self.spell_due = False
        if deadline is not None or self.lots is not None or self.lender is not None or \
                self.woken_fd >= 0 or self.wakes or self.interrupt is not None:
            return False
        asleep = _monotonic()
        try:
            self.spelled = recv_frame(self.sock, 0, False)
        except zmq.Again:
            pass
        if not self.holding:
            self.times.idle += _monotonic() - asleep
        # Came just after the receive gave up: the ZMQ_FD would not say so.
        return self.spelled is not None or bool(zmq.zmq_poll(self.input_only, 0))

    def wake_for(self, fd: int, on_wake: Callable[[], None]) -> None:
        """Also wake an idle wait for ``fd`` (a ZMQ_FD), running ``on_wake``."""
        self.woken_fd, self.on_wake = fd, on_wake
        self.sleep.register(fd, select.POLLIN)
        self.sleep_others.register(fd, select.POLLIN)

    def add_wake(self, fd: int, callback: Callable[[], None]) -> None:
        """Also end a wait when ``fd`` (a level-triggered descriptor: a pipe) is
        readable, calling ``callback`` (which must drain it)."""
        self.wakes[fd] = callback
        self.sleep.register(fd, select.POLLIN)
        self.sleep_others.register(fd, select.POLLIN)

    def remove_wake(self, fd: int) -> None:
        if self.wakes.pop(fd, None) is not None:
            self.sleep.unregister(fd)
            self.sleep_others.unregister(fd)

    def unfinished(self, output_taken: bool = False) -> int:
        """Entries received and not finished: buffered, held back for reordering, or in
        the stage's hands (an item the body took and has not come back from, unless
        ``output_taken``: its output already went to the outbox)."""
        held = sum(len(v) for v in self.reorder.waiting.values()) if self.reorder else 0
        # The generator is suspended exactly while the body holds the last item it
        # was given (_lists: while the list it gave is gone through).
        in_hand = self.holding or int(inspect.getgeneratorstate(self.feeding) ==
                                      inspect.GEN_SUSPENDED)
        return self.queued() + held + (0 if output_taken else in_hand)


class Reorder:
    """Puts the outputs of an ordered stage's replicas back into input order.

    Each output carries its input's number and a LAST flag on the last output
    for that input; an input without outputs sends a MARKER. Outputs wait here
    until every earlier input is complete.
    """

    def __init__(self) -> None:
        self.next = 0
        self.waiting: dict[int, list[Any]] = {}
        self.complete: set[int] = set()
        self.markers = 0
        self.duplicates = 0

    def add_owned(self, items: list[Any], tags: list[Any], lot: Any
                  ) -> tuple[list[tuple[Any, Any]], list[Any]]:
        """add() on a leased link: each entry keeps the lot it came in, to be finished
        with it. (released items with their lots, lots of entries finished here:
        markers, and entries for an input already complete, which are dropped)."""
        done: list[Any] = []
        for item, (seq, flags) in zip(items, tags):
            if seq < self.next or seq in self.complete:
                self.duplicates += 1
                done.append(lot)
                continue
            bucket = self.waiting.setdefault(seq, [])
            if flags & codec.TAG_MARKER:
                self.markers += 1
                done.append(lot)
            else:
                bucket.append((item, lot))
            if flags & codec.TAG_LAST:
                self.complete.add(seq)
        ready: list[tuple[Any, Any]] = []
        while self.next in self.complete:
            self.complete.remove(self.next)
            ready.extend(self.waiting.pop(self.next))
            self.next += 1
        return ready, done

    def add(self, items: list[Any], tags: list[Any]) -> list[Any]:
        for item, (seq, flags) in zip(items, tags):
            bucket = self.waiting.setdefault(seq, [])
            if flags & codec.TAG_MARKER:
                self.markers += 1
            else:
                bucket.append(item)
            if flags & codec.TAG_LAST:
                self.complete.add(seq)
        ready: list[Any] = []
        while self.next in self.complete:
            self.complete.remove(self.next)
            ready.extend(self.waiting.pop(self.next))
            self.next += 1
        return ready
