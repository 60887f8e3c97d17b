"""At-least-once delivery on a link: every message is a lease, returned as its acknowledgement.

A link is leased from the input of the first stage whose replicas may die
without failing the run (``restart = "on-failure"``, or several replicas:
PipelineSpec.leased) to the sink. On such a link:

- The sender numbers each message (``seq``, one count per sender) and keeps
  it (``Outstanding``) until the replica it went to acknowledges it; it sends
  to a replica at most the receiving stage's ``hwm`` messages not yet
  acknowledged, so what it keeps is bounded by the link's hwm.
- The receiver acknowledges a message (``Lots``) once it has finished every
  item in it: the call on each returned and every output those calls made
  has been acknowledged by the next stage in turn (a sink: the calls
  returned). An item is finished when the stage asks for the next one, so a
  stream function's items count as finished once taken from its iterator:
  what it keeps inside (a window) cannot be told apart, and is lost with it.
- Acknowledgements that come close together share a message: one that
  follows the last sent by more than ACK_DELAY leaves at once, the others
  wait at most ACK_DELAY for more to join them (the replica's idle wait is
  cut short for them). Each message between processes wakes a thread at
  both ends, about 20 µs of CPU each here: a sink taking a thousand
  one-item messages a second sent as many acknowledgements, which woke
  the senders as often. A credit to a sender (balance.Lender) takes those
  waiting for it along: a replica of a slow stage, which gives a credit
  for each message it takes, sends no message for its acknowledgements.
- When a replica is lost, the supervisor says LOST: its senders move what it
  had not acknowledged to the front of what they send (to a sibling, or to
  its restarted self once that has said it is back: REJOINED), count those
  items as redelivered. Each message carries the generation of the replica
  it is meant for: what ZeroMQ still queued for the lost one reaches its
  restarted self (a later generation), which drops it.

The first frame of a data message on a leased link, after the routing id,
is the lease: msgpack ``[seq, generation]``. An acknowledgement, from
receiver to sender, is msgpack ``[seq, ...]``; a credit (balance.py) is a
bare integer, and may be followed by an acknowledgement in the same message.
"""

from __future__ import annotations

import collections
import itertools
import time
from collections.abc import Iterable, Sequence
from typing import Any, Callable

import msgpack

from ..wire.codec import DecodeError

ACK_DELAY = 0.005  # seconds an acknowledgement may wait for others to join it
_monotonic = time.monotonic


def lease_frame(seq: int, generation: int, attempt: int = 0) -> bytes:
    return msgpack.packb([seq, generation, attempt] if attempt else [seq, generation])


def read_lease(frame: bytes) -> tuple[int, int, int]:
    """(seq, generation, attempt) of a lease frame; DecodeError for anything else."""
    try:
        value = msgpack.unpackb(frame)
    except Exception as exc:  # noqa: BLE001 - any decoding failure
        raise DecodeError(f"not a lease: {type(exc).__name__}") from None
    if type(value) is not list or not 2 <= len(value) <= 3 or \
            any(type(v) is not int or v < 0 for v in value):
        raise DecodeError("not a lease: expected [seq, generation] or [seq, generation, attempt]")
    return value[0], value[1], value[2] if len(value) == 3 else 0


class Poisoned:
    """An item that ended a replica while it was being worked on, after it was sent
    again: the stage's on_error takes it instead of its call (itempolicy.py)."""

    __slots__ = ("item", "cause")

    def __init__(self, item: Any, cause: str):
        self.item, self.cause = item, cause


class Outstanding:
    """A sender's messages not yet acknowledged, per downstream replica (the sender's side)."""

    def __init__(self, replicas: int, cap: int):
        self.unacked: dict[int, list[Any]] = {}  # seq -> [replica or None, frames, items, attempt]
        self.held = [0] * replicas               # unacknowledged messages per replica
        self.cap = cap                           # at most this many per replica (its hwm)
        self.generation = [0] * replicas         # what each replica's messages carry
        self.next_seq = 0
        self.resend: collections.deque[int] = collections.deque()  # seqs to send again
        self.redelivered = 0                     # items sent again after a loss

    def room(self, replica: int) -> bool:
        return self.held[replica] < self.cap

    def record(self, replica: int, frames: list[Any], items: int) -> int:
        """A new message goes to ``replica``: its seq."""
        seq = self.next_seq
        self.next_seq += 1
        self.unacked[seq] = [replica, frames, items, 0]
        self.held[replica] += 1
        return seq

    def resent(self, seq: int, replica: int) -> list[Any]:
        """A message from the resend queue goes to ``replica``: its frames."""
        entry = self.unacked[seq]
        entry[0] = replica
        self.held[replica] += 1
        return entry[1]

    def acknowledged(self, seqs: Any) -> None:
        for seq in seqs:
            entry = self.unacked.pop(seq, None) if type(seq) is int else None
            if entry is not None and entry[0] is not None:
                self.held[entry[0]] -= 1

    def lose(self, replica: int, generation: int) -> int:
        """``replica`` is gone: what it held goes to the resend queue; the items counted."""
        self.generation[replica] = generation
        moved = 0
        for seq, entry in self.unacked.items():
            if entry[0] == replica:
                entry[0] = None
                entry[3] += 1  # sent again: its receiver works through it carefully
                self.resend.append(seq)
                moved += entry[2]
        self.held[replica] = 0
        self.redelivered += moved
        return moved

    def items(self) -> int:
        """Items in the messages not acknowledged yet."""
        return sum(entry[2] for entry in self.unacked.values())

    def acked_below(self) -> int:
        """Every message with a lower seq is acknowledged."""
        return next(iter(self.unacked), self.next_seq)

    def __bool__(self) -> bool:
        return bool(self.unacked)


class Lot:
    """One message taken in on a leased link, until it is acknowledged."""

    __slots__ = ("sender", "seq", "size", "to_take", "left", "needs", "attempt")

    def __init__(self, sender: bytes, seq: int, items: int, attempt: int = 0):
        self.sender, self.seq, self.size, self.attempt = sender, seq, items, attempt
        self.to_take = items   # items not yet handed to the stage
        self.left = items      # items not yet finished
        self.needs = -1        # outputs up to this seq must be acknowledged first


class Lots:
    """A receiver's messages in hand, acknowledged to their senders once finished."""

    def __init__(self, send: Callable[[list[bytes]], None], delay: float = 0.0, hwm: int = 0):
        self.send = send                              # frames out of the input socket
        # Acknowledgements waiting to share a message (ACK_DELAY; 0.0: none wait),
        # per sender, until ``due``; when the last message of them left. A sender
        # may keep only ``hwm`` messages unacknowledged to this replica: a quarter
        # of that waiting is sent at once, and with an hwm under 4 none waits.
        self.most = hwm // 4
        self.delay = delay if self.most else 0.0
        self.unsent: dict[bytes, list[int]] = {}
        self.due = 0.0
        self.last_sent = -delay
        self.taking: collections.deque[Lot] = collections.deque()  # items still to hand out
        self.finishing: collections.deque[Lot] = collections.deque()  # in order of arrival
        self.in_hand: list[Lot] = []                  # the lots of the items the stage holds
        # Set by the runtime: the seq outputs so far will have, and what the
        # next stage has acknowledged (none: a sink, whose lots need nothing).
        self.outputs_pending: Callable[[], int] = lambda: -1
        self.outputs_acked_below: Callable[[], int] = lambda: 0
        self.stale = 0                                # messages meant for an earlier generation

    def arrived(self, sender: bytes, seq: int, items: int, reordered: bool = False,
                attempt: int = 0) -> Lot:
        """A message of ``items`` entries came in (``attempt``: how often it was sent
        before). Its items are handed out in order of arrival (take), or,
        ``reordered``, each with its lot (hold, done)."""
        lot = Lot(sender, seq, items, attempt)
        self.finishing.append(lot)
        if not items:
            lot.needs = self.outputs_pending()  # nothing to finish (all dropped here)
            self.acknowledge()
        elif not reordered:
            self.taking.append(lot)
        return lot

    def take(self) -> Lot:
        """The stage takes the next item, in order of arrival: its lot (the item is
        number ``lot.size - lot.to_take - 1`` in it)."""
        lot = self.taking[0]
        lot.to_take -= 1
        if not lot.to_take:
            self.taking.popleft()
        self.in_hand.append(lot)
        return lot

    def hold(self, lot: Lot) -> None:
        """The stage takes an item of ``lot`` (released by the reordering)."""
        self.in_hand.append(lot)

    def done(self, lot: Lot) -> None:
        """An entry of ``lot`` needs no call: a marker, or a duplicate dropped."""
        lot.left -= 1
        if not lot.left:
            lot.needs = self.outputs_pending()
            self.acknowledge()

    def finished(self, lot: Lot) -> None:
        """Every item of ``lot`` is finished (the stage took them in turn, and asks for
        more after the last)."""
        lot.left = 0
        lot.needs = self.outputs_pending()
        self.acknowledge()

    def finish(self) -> None:
        """The stage has finished every item it held (it asks for more, or has ended)."""
        hand = self.in_hand
        if not hand:
            return
        self.finish_counts(zip(hand, itertools.repeat(1)))
        hand.clear()

    def take_counts(self, count: int) -> list[list[Any]]:
        """The stage takes the next ``count`` items in a row (a run, runs.py), as take()
        would one by one: ``[lot, n]`` for each lot they come from, in order."""
        taking, counts = self.taking, []
        while count:
            lot = taking[0]
            n = min(count, lot.to_take)
            lot.to_take -= n
            if not lot.to_take:
                taking.popleft()
            counts.append([lot, n])
            count -= n
        return counts

    def untake(self, counts: list[list[Any]], back: int) -> None:
        """The last ``back`` items of a take_counts() were not reached: they are taken
        again later, first (``counts`` is left with what was reached)."""
        for entry in reversed(counts):
            if not back:
                break
            lot, n = entry
            m = min(back, n)
            if not lot.to_take:
                self.taking.appendleft(lot)
            lot.to_take += m
            entry[1] -= m
            back -= m

    def finish_counts(self, counts: Iterable[Sequence[Any]]) -> None:
        """The stage has finished ``n`` items of each ``(lot, n)``."""
        finished = False
        for lot, n in counts:
            lot.left -= n
            if not lot.left:
                lot.needs = self.outputs_pending()
                finished = True
        if finished:
            self.acknowledge()

    def acknowledge(self) -> None:
        """Acknowledge, in order of arrival, the lots that are finished and whose
        outputs the next stage has acknowledged; send those waiting whose time is up."""
        finishing = self.finishing
        if finishing and not finishing[0].left:
            acked_below = self.outputs_acked_below()
            done: dict[bytes, list[int]] = {}
            while finishing and not finishing[0].left and finishing[0].needs < acked_below:
                lot = finishing.popleft()
                done.setdefault(lot.sender, []).append(lot.seq)
            if done:
                self._send_or_hold(done)
        if self.due and _monotonic() >= self.due:
            self.flush()

    def _send_or_hold(self, done: dict[bytes, list[int]]) -> None:
        """Acknowledgements just due, per sender: sent now (no delay, a pause since the
        last were sent, or a quarter of the hwm waiting for a sender), or held to
        share a message with those that follow, until ``due``."""
        unsent = self.unsent
        at_once = not self.delay
        for sender, seqs in done.items():
            seqs = unsent[sender] = unsent.get(sender, []) + seqs
            at_once = at_once or len(seqs) >= self.most  # its sender may soon wait for them
        if not at_once and not self.due:
            now = _monotonic()
            at_once = now - self.last_sent > self.delay  # after a pause: at once
            self.due = now + self.delay
        if at_once:
            self.flush()

    def flush(self) -> None:
        """Send every acknowledgement waiting (before the replica waits, or ends)."""
        unsent = self.unsent
        if unsent:
            self.unsent = {}
            self.due = 0.0
            self.last_sent = _monotonic()
            for sender, seqs in unsent.items():
                self.send([sender, msgpack.packb(seqs)])

    def take_unsent(self, sender: bytes) -> bytes | None:
        """The acknowledgements waiting for ``sender``, packed, to go with a credit to
        it (balance.Lender.took), taken from those waiting; None if there are none."""
        seqs = self.unsent.pop(sender, None)
        if seqs is None:
            return None
        if not self.unsent:
            self.due = 0.0
        self.last_sent = _monotonic()
        return msgpack.packb(seqs)

    def waiting(self) -> bool:
        """Whether some lot is not acknowledged yet."""
        return bool(self.finishing or self.unsent)
