"""Load-aware dispatch into a stage with several replicas: credit-based flow control.

A PUSH socket deals messages round-robin, an equal share to each replica, and
ZeroMQ's queues and the kernel's socket buffers hold hundreds of small
messages: a replica that the host slows down keeps its share and sets the
finish time. Into a stage with several replicas, both ends are therefore
ROUTER sockets and work goes where there is room for it (the ZeroMQ guide's
load-balancing pattern, with credits):

- An upstream replica starts with FIRST_CREDITS messages it may send to each
  downstream replica, spends one per message and sends each message to the
  next replica, round-robin, that has one left (Dispatcher).
- A downstream replica gives credits back as it takes messages off its socket
  (Lender). It keeps about QUEUE_TIME of work waiting behind the message it
  works on, from the time its messages take: one message or two for slow
  items, up to MAX_WINDOW for fast ones, whose credits must cover the way back
  to the sender.

A slow replica thus holds little work; the others take the rest. Every such
link is also leased (delivery.py): each message is kept by its sender until
acknowledged. A link that is not leased (no stage up to it may lose a
replica) keeps PUSH/PULL, one replica: there is no choice to make.
"""

from __future__ import annotations

import time
from typing import Any

import msgpack
import zmq

from ..wire.transport import (
    NOBLOCK,
    POLLIN,
    SNDMORE,
    peer_id,
    recv_message,
    send_frame,
    send_frames,
)
from .delivery import Lots, Outstanding, lease_frame

FIRST_CREDITS = 2
MIN_WINDOW = 1      # always one message waiting: the next starts without a round trip
MAX_WINDOW = 64
QUEUE_TIME = 0.002  # seconds of work a replica keeps waiting (the credits' way back, with room)
MAX_CREDIT = 1 << 20  # a credit message granting more is not one of ours
SENT, FULL, GONE = "sent", "full", "gone"  # what _transmit did
_MORE_NOBLOCK = NOBLOCK | SNDMORE
_monotonic = time.monotonic


class Dispatcher:
    """An upstream replica's side of a leased link (delivery.py): the credits it holds
    for each downstream replica, and the messages they have not acknowledged yet."""

    def __init__(self, sock: zmq.Socket, addresses: tuple[str, ...], cap: int):
        replicas = len(addresses)
        self.sock = sock
        self.addresses = addresses
        self.peers = [peer_id(r) for r in range(replicas)]
        self.credits = [FIRST_CREDITS] * replicas
        self.index = {peer: r for r, peer in enumerate(self.peers)}
        self.next = 0
        self.credit_waiting = [(sock, POLLIN)]
        self.outstanding = Outstanding(replicas, cap)
        # LOST and REJOINED, from the control channel: applied where the
        # socket is ours (under the outbox's lock, which the Flusher shares).
        self.events: list[tuple[str, int, int]] = []

    def send(self, frames: list[Any], items: int) -> bool:
        """Send one message to the next replica with a credit and room; False if none
        has one now (or messages to send again still wait: they go first)."""
        if self.events:
            self._apply_events()
        out = self.outstanding
        if out.resend and not self._resend():
            return False
        while True:
            replica = self._choose()
            if replica is None:
                self._take_messages()
                replica = self._choose()
                if replica is None:
                    return False
            sent = self._transmit(replica, out.next_seq, frames)
            if sent is FULL:
                return False
            if sent is SENT:
                out.record(replica, frames, items)
                return True

    def pump(self) -> None:
        """Take credits and acknowledgements, apply LOST and REJOINED, send again what
        waits for it: what a replica does while it has nothing else to send."""
        if self.events:
            self._apply_events()
        self._take_messages()
        if self.outstanding.resend:
            self._resend()

    def starting_from(self, downstream: list[object]) -> None:
        """WELCOME's view of the next stage: which replicas are up, down or gone, and
        the generation each one's messages must carry (a sender started again)."""
        for replica, state in enumerate(downstream[:len(self.peers)]):
            if type(state) is list and len(state) == 2 and type(state[0]) is int:
                self.outstanding.generation[replica] = state[0]
                if state[1] != "up":
                    self.credits[replica] = 0  # REJOINED gives them (and "gone": never)

    def event(self, kind: str, replica: int, generation: int) -> None:
        """From the control channel: downstream ``replica`` was lost, or has rejoined."""
        if 0 <= replica < len(self.peers):
            self.events.append((kind, replica, generation))

    def _apply_events(self) -> None:
        while self.events:
            kind, replica, generation = self.events.pop(0)
            if kind == "lost":
                # What ZeroMQ still queues for the lost replica reaches its next
                # life on that address, which drops it: it is meant for an
                # earlier generation, and is sent again from here anyway. (A
                # disconnect and connect under the same routing id would trip
                # libzmq's assertion that the old pipe is gone.)
                self.credits[replica] = 0
                self.outstanding.lose(replica, generation)
            else:  # rejoined: it starts as every replica does
                self.credits[replica] = FIRST_CREDITS
                self.outstanding.generation[replica] = generation
                address = self.addresses[replica]
                if address.startswith("inproc://"):
                    # An inproc connection ends with the socket it went to and is
                    # not made again by itself: connect anew, under a routing id
                    # of its own (the old one may not be released yet).
                    peer = peer_id(replica) + b":" + str(generation).encode()
                    self.sock.setsockopt(zmq.CONNECT_ROUTING_ID, peer)
                    self.sock.connect(address)
                    del self.index[self.peers[replica]]
                    self.peers[replica] = peer
                    self.index[peer] = replica

    def _resend(self) -> bool:
        """Send again what lost replicas held; True once nothing waits for it."""
        out = self.outstanding
        while out.resend:
            seq = out.resend[0]
            if seq not in out.unacked:  # acknowledged after all
                out.resend.popleft()
                continue
            replica = self._choose()
            if replica is None:
                self._take_messages()
                replica = self._choose()
                if replica is None:
                    return False
            entry = out.unacked[seq]
            sent = self._transmit(replica, seq, entry[1], entry[3])
            if sent is FULL:
                return False
            if sent is GONE:
                continue
            out.resend.popleft()
            out.resent(seq, replica)
        return True

    def _transmit(self, replica: int, seq: int, frames: list[Any], attempt: int = 0) -> object:
        """Send one message to ``replica``: SENT; FULL if its queue is (try later);
        GONE if it is (its credits went with it: choose another)."""
        sock = self.sock
        try:
            send_frame(sock, self.peers[replica], _MORE_NOBLOCK)
        except zmq.Again:
            # Its queue is at the HWM (ROUTER_MANDATORY: rather than dropped):
            # under a very low hwm, or full of what was queued for an earlier
            # life of the replica, which that one drops (granting nothing).
            # Its credits stand; the message waits until there is room.
            return FULL
        except zmq.ZMQError as exc:
            if exc.errno != zmq.EHOSTUNREACH:
                raise
            # That replica's connection is gone (it died): its death is
            # the supervisor's to report, not this sender's. Its credits
            # died with it; the message goes to another replica.
            self.credits[replica] = 0
            return GONE
        self.credits[replica] -= 1
        send_frame(sock, lease_frame(seq, self.outstanding.generation[replica], attempt),
                   _MORE_NOBLOCK)
        if len(frames) == 1:
            send_frame(sock, frames[0], NOBLOCK)
        else:
            send_frames(sock, frames, NOBLOCK)
        return SENT

    def _choose(self) -> int | None:
        """The next replica, round-robin, with a credit and room left."""
        credits, count, room = self.credits, len(self.credits), self.outstanding.room
        for step in range(count):
            replica = (self.next + step) % count
            if credits[replica] > 0 and room(replica):
                self.next = (replica + 1) % count
                return replica
        return None

    def _take_messages(self) -> None:
        """Count every credit and acknowledgement that has come back (without waiting)."""
        sock = self.sock
        while zmq.zmq_poll(self.credit_waiting, 0):
            frames = recv_message(sock, NOBLOCK)
            replica = self.index.get(frames[0])
            if replica is None or not 2 <= len(frames) <= 3:
                continue
            try:
                value = msgpack.unpackb(frames[1])
                acks = msgpack.unpackb(frames[2]) if len(frames) == 3 else None
            except Exception:  # noqa: BLE001 - not a credit, whatever it is
                continue
            if len(frames) == 3:
                # A credit with the acknowledgements that waited for it (Lender.took).
                if type(value) is not int or type(acks) is not list:
                    continue
                self.outstanding.acknowledged(acks)
            if type(value) is int:
                if 0 < value <= MAX_CREDIT:
                    self.credits[replica] += value
            elif type(value) is list:
                self.outstanding.acknowledged(value)


class Lender:
    """A downstream replica's side: gives credits back to the senders of the messages it takes."""

    def __init__(self, sock: zmq.Socket, hwm: int, balancing: bool = True,
                 lots: Lots | None = None):
        self.sock = sock
        # The replica's acknowledgements (delivery.py): those waiting for a sender
        # go with its credit, in the same message, rather than in one of their own.
        self.lots = lots
        # More credits than the HWM would only make senders wait on a full queue.
        self.max_window = max(MIN_WINDOW, min(MAX_WINDOW, hwm))
        self.window = FIRST_CREDITS
        # The only replica of its stage (a leased link without siblings): there
        # is no choice of replica to keep open, so the window is the widest, and
        # a sender never waits a round trip for room it has.
        self.balancing = balancing
        if not balancing:
            self.window = self.max_window
        self.left: dict[bytes, int] = {}  # per sender: messages it may still send
        self.took_at: float | None = None  # when the message in hand was taken
        self.work = 0.0                    # seconds a message takes, smoothed

    def took(self, sender: bytes, wanted_at: float) -> None:
        """A message from ``sender`` was taken; the replica ran out of items at ``wanted_at``."""
        now = _monotonic()
        if self.took_at is not None and self.balancing:
            # From taking a message to wanting the next: the time its items
            # took, not counting any wait for input in between.
            work = wanted_at - self.took_at
            self.work = work if not self.work else 0.75 * self.work + 0.25 * work
            self.window = max(MIN_WINDOW, min(self.max_window,
                                              round(QUEUE_TIME / max(self.work, 1e-6))))
        self.took_at = now
        left = self.left.get(sender, FIRST_CREDITS) - 1
        # Credits go back in bunches once half the window is spent: one small
        # message per several taken when the window is large.
        if left <= self.window // 2:
            grant = self.window - left
            if grant > 0:
                acks = self.lots.take_unsent(sender) if self.lots is not None else None
                sock = self.sock
                sock.send(sender, SNDMORE)
                if acks is None:
                    sock.send(msgpack.packb(grant))
                else:
                    sock.send(msgpack.packb(grant), SNDMORE)
                    sock.send(acks)
                left += grant
        self.left[sender] = left
