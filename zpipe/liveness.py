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

import zmq
from zmq.utils.monitor import parse_monitor_message

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
        self.fds: dict[int, str] = {}  # descriptor -> the identity last heard on it

    def heard(self, identity: str, frame: zmq.Frame) -> None:
        """A message from ``identity`` came in ``frame`` (received with copy=False)."""
        try:
            fd = frame.get(zmq.SRCFD)
        except zmq.ZMQError:
            return  # inproc: no descriptor, and no heartbeats either
        if fd >= 0:
            self.fds[fd] = identity

    def dropped(self) -> list[str]:
        """Identities whose connection has dropped since the last call."""
        gone = []
        while self.monitor.poll(0):
            event = parse_monitor_message(self.monitor.recv_multipart())
            identity = self.fds.pop(event["value"], None)
            if identity is not None:
                gone.append(identity)
        return gone

    def close(self) -> None:
        self.monitor.close(0)
