"""A replica's end of the control channel, and the two commands that unwind it."""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

import zmq

from ..wire import protocol
from ..wire.transport import NOBLOCK, POLLIN

log = logging.getLogger("zpipe")

CONTROL_CHECK = 0.02  # while busy, look for commands (ABORT, STOP) this often
NOTED_TIMEOUT = 5.0   # at most this long for the supervisor to note an ATTEMPT


# Both are BaseExceptions, like GeneratorExit: they pass through user code
# (a stream function iterating its inputs) even where it catches Exception.
class Aborted(BaseException):
    """The supervisor said ABORT: stop at once, without handing anything on."""


class SourceStopped(BaseException):
    """The supervisor said STOP to a source: end production after the item just sent."""


class Control:
    """The replica's end of the control channel (a DEALER to the supervisor's ROUTER)."""

    def __init__(self, sock: zmq.Socket):
        self.sock = sock
        self.started = False
        self.draining = False
        self.stopped = False
        self.exit = False
        self.generation: int | None = None  # from WELCOME
        # Items that ended a replica while worked on: (sender, seq, index) -> why.
        self.poison: dict[tuple[bytes, int, int], str] = {}
        self.noted: list[Any] | None = None  # the last ATTEMPT the supervisor has
        self.downstream: list[Any] = []  # from WELCOME: the next stage's replicas, as they are
        self.early: list[tuple[str, int, int]] = []  # LOST, REJOINED before on_peer is set
        self.next_check = 0.0
        self.poll_items = [(sock, POLLIN)]
        # LOST and REJOINED go to the outbox's dispatcher (a leased output);
        # ``periodic`` runs at every look while busy (acknowledgements).
        self.on_peer: Callable[[str, int, int], None] | None = None
        self.periodic: Callable[[], None] | None = None

    def send(self, kind: str, **fields: Any) -> None:
        self.sock.send(protocol.pack(kind, **fields))

    def pending(self) -> bool:
        # zmq_poll rather than ZMQ_EVENTS: pyzmq's getsockopt makes an enum
        # of the option on every call, which costs more than the poll.
        return bool(zmq.zmq_poll(self.poll_items, 0))

    def check(self, now: float) -> None:
        """Handle waiting commands, at most every CONTROL_CHECK seconds (a busy replica's poll)."""
        if now >= self.next_check:
            self.next_check = now + CONTROL_CHECK
            if self.pending():
                self.handle()
            if self.periodic is not None:
                self.periodic()

    def handle(self) -> None:
        """Apply every waiting command; ABORT raises Aborted."""
        while self.pending():
            try:
                kind, fields = protocol.unpack(self.sock.recv(NOBLOCK))
            except zmq.Again:
                return
            except ValueError as exc:
                log.warning("ignored a control message: %s", exc)
                continue
            if kind == protocol.START:
                self.started = True
            elif kind == protocol.DRAIN:
                self.draining = True
            elif kind == protocol.STOP:
                self.stopped = True
            elif kind == protocol.EXIT:
                self.exit = True
            elif kind == protocol.ABORT:
                raise Aborted(fields.get("reason", "aborted"))
            elif kind == protocol.WELCOME:
                self.generation = fields.get("generation", 0)
                self._poisoned(fields.get("poison", []))
                self.downstream = fields.get("downstream", [])
            elif kind == protocol.POISON:
                self._poisoned(fields.get("keys", []))
            elif kind == protocol.NOTED:
                self.noted = fields.get("key")
            elif kind in (protocol.LOST, protocol.REJOINED):
                event = (kind, fields.get("replica", -1), fields.get("generation", 0))
                if self.on_peer is not None:
                    self.on_peer(*event)
                else:  # the dispatcher is being made (connecting): it takes them then
                    self.early.append(event)

    def attempt(self, key: list[Any] | None) -> None:
        """Name the item (sent again) the replica starts on, or None once it is done;
        before its call the supervisor must have it: if the call ends the process,
        it is this item's fault (recovery.py)."""
        self.send(protocol.ATTEMPT, key=key)
        if key is not None:
            self.wait_for(lambda: self.noted == key, NOTED_TIMEOUT)

    def _poisoned(self, keys: list[Any]) -> None:
        for key in keys:
            if type(key) is list and len(key) == 4 and type(key[0]) is bytes and \
                    type(key[1]) is int and type(key[2]) is int:
                self.poison[(key[0], key[1], key[2])] = str(key[3])

    def wait_for(self, condition: Callable[[], bool], timeout: float | None = None) -> bool:
        """Handle commands until ``condition()`` holds; False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            self.handle()
            if condition():
                return True
            if deadline is not None and time.monotonic() >= deadline:
                return False
            self.sock.poll(100 if deadline is None else
                           max(1, min(100, int((deadline - time.monotonic()) * 1000))))
