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

A slow replica thus holds little work; the others take the rest. A stage with
one replica keeps PUSH/PULL: there is no choice to make.
"""

from __future__ import annotations

import time
from typing import Any

import msgpack
import zmq

from .transport import NOBLOCK, POLLIN, SNDMORE, peer_id, send_frame

FIRST_CREDITS = 2
MIN_WINDOW = 1      # always one message waiting: the next starts without a round trip
MAX_WINDOW = 64
QUEUE_TIME = 0.002  # seconds of work a replica keeps waiting (the credits' way back, with room)
_MORE_NOBLOCK = NOBLOCK | SNDMORE
_monotonic = time.monotonic


class Dispatcher:
    """An upstream replica's side: the credits it holds for each downstream replica."""

    def __init__(self, sock: zmq.Socket, replicas: int):
        self.sock = sock
        self.peers = [peer_id(r) for r in range(replicas)]
        self.credits = [FIRST_CREDITS] * replicas
        self.index = {peer: r for r, peer in enumerate(self.peers)}
        self.next = 0
        self.credit_waiting = [(sock, POLLIN)]

    def send(self, frames: list[Any]) -> bool:
        """Send one message to the next replica with a credit; False if none has one now."""
        while True:
            replica = self._choose()
            if replica is None:
                self._take_credits()
                replica = self._choose()
                if replica is None:
                    return False
            try:
                send_frame(self.sock, self.peers[replica], _MORE_NOBLOCK)
            except zmq.Again:
                # Its queue is at the HWM (ROUTER_MANDATORY: rather than dropped),
                # which credits reach only under a very low hwm: the message
                # waits for the next credit, from whichever replica.
                return False
            except zmq.ZMQError as exc:
                if exc.errno != zmq.EHOSTUNREACH:
                    raise
                # That replica's connection is gone (it died): its death is
                # the supervisor's to report, not this sender's. Its credits
                # died with it; the message goes to another replica.
                self.credits[replica] = 0
                continue
            self.credits[replica] -= 1
            if len(frames) == 1:
                send_frame(self.sock, frames[0], NOBLOCK)
            else:
                self.sock.send_multipart(frames, NOBLOCK, copy=False)
            return True

    def _choose(self) -> int | None:
        """The next replica, round-robin, with a credit left."""
        credits, count = self.credits, len(self.credits)
        for step in range(count):
            replica = (self.next + step) % count
            if credits[replica] > 0:
                self.next = (replica + 1) % count
                return replica
        return None

    def _take_credits(self) -> None:
        """Count every credit that has come back (without waiting)."""
        sock = self.sock
        while zmq.zmq_poll(self.credit_waiting, 0):
            frames = sock.recv_multipart(NOBLOCK)
            replica = self.index.get(frames[0])
            if replica is None or len(frames) != 2:
                continue
            try:
                count = msgpack.unpackb(frames[1])
            except ValueError:
                continue
            if type(count) is int and count > 0:
                self.credits[replica] += count


class Lender:
    """A downstream replica's side: gives credits back to the senders of the messages it takes."""

    def __init__(self, sock: zmq.Socket, hwm: int):
        self.sock = sock
        # More credits than the HWM would only make senders wait on a full queue.
        self.max_window = max(MIN_WINDOW, min(MAX_WINDOW, hwm))
        self.window = FIRST_CREDITS
        self.left: dict[bytes, int] = {}  # per sender: messages it may still send
        self.took_at: float | None = None  # when the message in hand was taken
        self.work = 0.0                    # seconds a message takes, smoothed

    def took(self, sender: bytes, wanted_at: float) -> None:
        """A message from ``sender`` was taken; the replica ran out of items at ``wanted_at``."""
        now = _monotonic()
        if self.took_at is not None:
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
                self.sock.send(sender, SNDMORE)
                self.sock.send(msgpack.packb(grant))
                left += grant
        self.left[sender] = left
