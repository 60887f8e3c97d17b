"""A replica's input: items off its PULL socket, as the iterator its stage consumes."""

from __future__ import annotations

import collections
import logging
import time
from typing import Any, Callable

import zmq

from . import codec, protocol
from .control import Control
from .shapes import Inputs

log = logging.getLogger("zpipe")

IDLE_POLL_MS = 1000


class Inbox(Inputs):
    """The items arriving on a replica's PULL socket, as an iterator.

    It ends when the supervisor says STOP, which it does only once the
    replicas of this stage together have received every item upstream sent.
    """

    def __init__(self, sock: zmq.Socket, control: Control, stage: str, batch_limit: int):
        self.sock = sock
        self.batch_limit = batch_limit
        self.control = control
        self.stage = stage
        self.buffer: collections.deque[Any] = collections.deque()
        self.received = 0
        self.reported: int | None = None
        self.malformed = 0
        self.last_item: Any = None
        self.seqs: collections.deque[int] = collections.deque()  # numbers of buffered items
        self.seq = -1                   # number of the item last returned (numbered links)
        self.reorder: Reorder | None = None
        self.before_idle: Callable[[], None] = lambda: None  # the outbox flushes its batch
        self.poller = zmq.Poller()
        self.poller.register(sock, zmq.POLLIN)
        self.poller.register(control.sock, zmq.POLLIN)

    def __next__(self) -> Any:
        while not self.buffer:  # a message may add nothing yet (held back for reordering)
            if not self._fill(block=True):
                raise StopIteration
        if self.seqs:
            self.seq = self.seqs.popleft()
        item = self.last_item = self.buffer.popleft()
        return item

    def batches(self) -> Any:
        """Lists of every item waiting (at least one), for ``set_get_all()``."""
        while True:
            while not self.buffer:
                if not self._fill(block=True):
                    return
            while len(self.buffer) < self.batch_limit and self._fill(block=False):
                pass
            batch = list(self.buffer)
            self.buffer.clear()
            self.last_item = batch
            yield batch

    def _fill(self, block: bool) -> bool:
        """Receive one message into the buffer; False when none came (ended, or not blocking)."""
        while True:
            try:
                head = self.sock.recv(zmq.NOBLOCK, copy=False)
                # Only arrays make more frames; a one-frame message skips the
                # multipart machinery (the common, small case).
                frames = [head, *self.sock.recv_multipart(copy=False)] if head.more else [head]
            except zmq.Again:
                if not block or self.control.stopped:
                    return False
                self._idle()
                continue
            self.control.check(time.monotonic())
            try:
                items, tags = codec.decode_tagged(frames)
            except codec.DecodeError as exc:
                # Anyone may reach a socket: what is not zpipe's format is
                # dropped, never fatal (a real peer of another version is
                # caught by the supervisor when it says hello).
                self.malformed += 1
                log.warning("stage %r dropped a malformed message (%d so far): %s",
                            self.stage, self.malformed, exc)
                continue
            self.received += len(items)
            if tags is None:
                self.buffer.extend(items)
            elif self.reorder is not None:
                self.buffer.extend(self.reorder.add(items, tags))
            else:
                self.buffer.extend(items)
                self.seqs.extend(tag[0] for tag in tags)
            return True

    def _idle(self) -> None:
        self.before_idle()  # never sit on outputs while waiting for input
        if self.control.draining and self.received != self.reported:
            self.control.send(protocol.RECEIVED, received=self.received)
            self.reported = self.received
        events = dict(self.poller.poll(IDLE_POLL_MS))
        if self.control.sock in events:
            self.control.handle()


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
