"""Whether a replica is alive, without depending on its GIL.

A replica's own heartbeats come from a Python thread: one that is inside a
long C call holding the GIL sends none, though it is well. So liveness comes
from ZeroMQ instead: the supervisor's ROUTER sends ZMTP PINGs every
PING_INTERVAL (ZMQ_HEARTBEAT_IVL), which each replica's libzmq I/O thread
answers whatever its Python code does, and drops a connection that has not
answered for PONG_TIMEOUT (ZMQ_HEARTBEAT_TIMEOUT): a frozen process (SIGSTOP)
or a lost host. A socket monitor reports the dropped connection by its file
descriptor; every message received records the descriptor it came on
(ZMQ_SRCFD), which says whose connection it was.

A replica that exits drops its connections too: the supervisor tells the two
apart (a local process that is still there is frozen; a remote replica that
had finished is not).
"""

from __future__ import annotations

import struct

import zmq

PING_INTERVAL_MS = 1000
PONG_TIMEOUT_MS = 3000  # a replica is reported within this and the supervisor's tick


def configure(sock: zmq.Socket) -> None:
    """Before bind: ZMTP heartbeats on the supervisor's control socket."""
    sock.setsockopt(zmq.HEARTBEAT_IVL, PING_INTERVAL_MS)
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, PONG_TIMEOUT_MS)


class Liveness:
    """Which replicas' connections to the supervisor have dropped."""

    def __init__(self, sock: zmq.Socket):
        self.monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED,
                                               addr=f"inproc://zpipe-liveness-{id(self)}")
        # descriptor -> (the identity heard on it, the count of messages heard
        # before its first): a replica started again (a container restarted)
        # speaks on new connections, and the drop of an old one, noticed
        # later, is not news of the new life (see dropped()).
        self.fds: dict[int, tuple[str, int]] = {}
        self.count = 0  # messages heard so far
        self.gone: list[tuple[str, int]] = []

    def heard(self, identity: str, frame: zmq.Frame) -> int:
        """A message from ``identity`` came in ``frame`` (received with copy=False):
        its number, in the order messages were heard."""
        self.count += 1
        try:
            fd = frame.get(zmq.SRCFD)
        except zmq.ZMQError:
            return self.count  # inproc: no descriptor, and no heartbeats either
        if fd >= 0:
            # Drops first: the OS may give a new connection the descriptor of
            # one that has just ended, whose drop was reported before it.
            self._take_events()
            known = self.fds.get(fd)
            if known is None or known[0] != identity:
                self.fds[fd] = (identity, self.count)
        return self.count

    def dropped(self) -> list[tuple[str, int]]:
        """(identity, number of the first message heard on it) of each connection that
        has dropped since the last call: one first heard before a replica's latest
        hello was its earlier life's."""
        self._take_events()
        gone, self.gone = self.gone, []
        return gone

    def _take_events(self) -> None:
        while self.monitor.poll(0):
            fd = _event_value(self.monitor.recv_multipart())
            known = self.fds.pop(fd, None)
            if known is not None:
                self.gone.append(known)

    def close(self) -> None:
        self.monitor.close(0)


# A monitor event's first frame: the event (uint16) and its value (int32), in
# the host's byte order (zmq_socket_monitor(3)). Read here rather than with
# zmq.utils.monitor, which imports asyncio: every replica imports this module
# (transport.py), and asyncio is a fifth of what a replica imports.
_EVENT = struct.Struct("=Hi")


def _event_value(frames: list[bytes]) -> int:
    return _EVENT.unpack_from(frames[0])[1]
