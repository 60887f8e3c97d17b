"""ZeroMQ sockets as zpipe uses them: every one with a finite LINGER and HWMs.

Each replica binds a PULL socket on its own input address; upstream replicas
connect a PUSH socket to every replica of the next stage, which blocks when it
is full (backpressure). Into a stage with several replicas both ends are
ROUTER sockets instead, and credits spread the work (see balance.py).
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable

import zmq

from ..supervision import liveness
from .security import Curve

# Nothing may hang at exit: a socket drops what it could not deliver after
# this long. zpipe never relies on LINGER to deliver items: a replica exits
# only once the supervisor has counted its outputs downstream.
LINGER_MS = 1000
CONTROL_HWM = 1000
CONTROL_MAX_MESSAGE = 4 * 1024 * 1024

# For the hot path: pyzmq's enum members cost a Python-level enum operation
# (about 1 us) wherever a flag is combined or tested; plain ints do not.
NOBLOCK = int(zmq.NOBLOCK)
POLLIN = int(zmq.POLLIN)
SNDMORE = int(zmq.SNDMORE)
# The backend's send, under pyzmq's Python-level Socket.send (which only adds
# the routing_id and group arguments of draft sockets): one call less per message.
send_frame = zmq.backend.Socket.send
recv_frame = zmq.backend.Socket.recv


# pyzmq's send_multipart and recv_multipart cost about 5 us more a message of
# three frames than the backend's calls below: they type-check every part,
# combine flags as enum members and ask ZMQ_RCVMORE through getsockopt, which
# makes an enum of the option on every call (a Frame's ``more`` is cheaper
# still than the backend's getsockopt). Every message on a leased link has
# three frames (routing id, lease, data), as has every message of arrays.
def send_frames(sock: zmq.Socket, frames: list[Any], flags: int = 0) -> None:
    """Send ``frames`` as one message; those of COPY_THRESHOLD bytes and more
    without a copy (pyzmq copies smaller ones anyway, which is cheaper for them)."""
    more = flags | SNDMORE
    last = len(frames) - 1
    for i, frame in enumerate(frames):
        send_frame(sock, frame, flags if i == last else more, False)


def recv_rest(sock: zmq.Socket, head: zmq.Frame) -> list[Any]:
    """``head`` (received with copy=False) and the frames that follow it in its
    message, as zmq.Frame objects (the rest of a message has arrived with it)."""
    frames = [head]
    while head.more:
        head = recv_frame(sock, 0, False)
        frames.append(head)
    return frames


def recv_message(sock: zmq.Socket, flags: int = 0) -> list[bytes]:
    """Every frame of the next message, as bytes (zmq.Again, with NOBLOCK, if none waits)."""
    return [frame.bytes for frame in recv_rest(sock, recv_frame(sock, flags, False))]


# A replica's I/O threads (replica_context): the first carries its control channel
# alone, the others its data links, each connection to a replica downstream on
# one of them in turn. libzmq looks up a peer's host name in the I/O thread of
# the connection, with the system's resolver, before each attempt to reconnect:
# where the name of a replica that is gone stops resolving and the lookup
# waits on a DNS server (5 s and more, with one that does not answer), that
# thread does nothing else meanwhile. Apart, commands, heartbeats and the
# links to the other replicas go on.
CONTROL_IO_THREAD = 0
MAX_DATA_IO_THREADS = 8
CONTEXT_END_WAIT = LINGER_MS / 1000 + 1.0


def replica_context(downstream: int) -> zmq.Context:
    """The context of a replica process with ``downstream`` replicas to send to."""
    return zmq.Context(io_threads=1 + max(1, min(downstream, MAX_DATA_IO_THREADS)))


def end_context(ctx: zmq.Context) -> bool:
    """Close what is left open of ``ctx`` and end it, waiting at most CONTEXT_END_WAIT
    seconds; False if it has not ended by then.

    Ending waits for every I/O thread, and one inside a name lookup (see above)
    answers only once the lookup returns, 25 s later in a container here. What
    had to go out went in the sockets' linger, shorter than the wait: past
    it, the process may exit without the context (its threads end with it).
    """
    # destroy, not term: a signal may have cut a cleanup short and left a
    # socket open, and term would wait on it for ever.
    ending = threading.Thread(target=ctx.destroy, kwargs={"linger": 0}, daemon=True,
                              name="zpipe-context-end")
    ending.start()
    ending.join(CONTEXT_END_WAIT)
    return not ending.is_alive()


def _data_threads(ctx: zmq.Context) -> int:
    """How many I/O threads of ``ctx`` carry data (0: one thread carries everything)."""
    threads = ctx.get(zmq.IO_THREADS)
    return threads - 1 if threads > 1 else 0


def _on_data_threads(sock: zmq.Socket, connection: int | None = None) -> None:
    """Put the socket's next connection on a data I/O thread: the one to downstream
    replica ``connection`` on each in turn; those it accepts (None) on the least loaded."""
    data = _data_threads(sock.context)
    if data:
        sock.setsockopt(zmq.AFFINITY, ((1 << data) - 1) << 1 if connection is None else
                        1 << (1 + connection % data))


def _socket(ctx: zmq.Context, kind: int, hwm: int | None = None) -> zmq.Socket:
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, LINGER_MS)
    # Replicas start in any order: a connect to a peer not bound yet retries
    # after 10 ms rather than ZeroMQ's 100 ms, backing off to 1 s while it is gone.
    sock.setsockopt(zmq.RECONNECT_IVL, 10)
    sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
    if hwm is not None:
        sock.setsockopt(zmq.SNDHWM, hwm)
        sock.setsockopt(zmq.RCVHWM, hwm)
    return sock


def peer_id(replica: int) -> bytes:
    """The routing id of an upstream ROUTER's connection to downstream ``replica``."""
    return str(replica).encode()


def pull(ctx: zmq.Context, address: str, hwm: int, curve: Curve | None = None,
         max_size: int | None = None, balanced: bool = False) -> zmq.Socket:
    """A stage replica's input, bound on its own address: PULL, or ROUTER if ``balanced``
    (a leased link, delivery.py).

    ``max_size`` caps each frame (ZMQ_MAXMSGSIZE): ZeroMQ drops a peer that
    sends more, so zpipe's own senders check it before sending.
    """
    sock = _socket(ctx, zmq.ROUTER if balanced else zmq.PULL, hwm)
    if balanced:
        # What it sends back (credits, acknowledgements) is small, and a ROUTER
        # drops what would pass its HWM: a sender would wait for ever.
        sock.setsockopt(zmq.SNDHWM, 0)
    if max_size is not None:
        sock.setsockopt(zmq.MAXMSGSIZE, max_size)
    if curve is not None:
        curve.server(ctx, sock)
    _on_data_threads(sock)
    try:
        sock.bind(address)
    except zmq.ZMQError as exc:
        sock.close(0)
        raise OSError(f"cannot bind {address}: {exc}") from None
    return sock


def push(ctx: zmq.Context, addresses: tuple[str, ...], hwm: int,
         on_idle: Callable[[], None], timeout: float, curve: Curve | None = None,
         balanced: bool = False, identity: bytes | None = None,
         absent: set[int] | frozenset[int] = frozenset()) -> zmq.Socket:
    """A stage replica's output, connected to every replica of the next stage:
    PUSH, or if ``balanced`` a ROUTER that names each connection ``peer_id(replica)``
    and is known to them as ``identity`` (one per life of the sender).

    Returns only once a handshake with each of them has completed: this is what
    avoids the slow-joiner burst (a source starts only once every replica
    downstream is really connected). ``on_idle`` runs about every 100 ms and
    may raise to give up; after ``timeout`` seconds TimeoutError is raised.
    """
    sock = _socket(ctx, zmq.ROUTER if balanced else zmq.PUSH, hwm)
    if balanced:
        # At the HWM a ROUTER drops what it is given; this makes it say Again instead.
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        if identity is not None:
            sock.setsockopt(zmq.ROUTING_ID, identity)
    if curve is not None:
        curve.client(sock)
    # The monitor must watch before the first connect, or a fast handshake
    # could complete unseen.
    monitor = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED)
    connected: set[str] = set()
    deadline = time.monotonic() + timeout
    # inproc links (threads) have no handshake, and need none: connecting is immediate.
    # Nor is a replica ``absent`` (down, being started again, or gone) waited for.
    expected = sum(not address.startswith("inproc://")
                   for replica, address in enumerate(addresses) if replica not in absent)
    try:
        for replica, address in enumerate(addresses):
            if balanced:
                sock.setsockopt(zmq.CONNECT_ROUTING_ID, peer_id(replica))
            _on_data_threads(sock, replica)
            sock.connect(address)
        while len(connected) < expected:
            if monitor.poll(100):
                # A monitor event is [event id and value (6 bytes), endpoint].
                _, endpoint = monitor.recv_multipart()
                connected.add(endpoint.decode())
                continue
            on_idle()
            if time.monotonic() > deadline:
                raise TimeoutError(f"connected to {len(connected)} of {expected} "
                                   f"replicas downstream after {timeout:g} s")
    except BaseException:
        sock.disable_monitor()
        monitor.close(0)
        sock.close(0)
        raise
    sock.disable_monitor()
    monitor.close(0)
    return sock


def dealer(ctx: zmq.Context, address: str, identity: str,
           curve: Curve | None = None) -> zmq.Socket:
    sock = _socket(ctx, zmq.DEALER)
    if _data_threads(ctx):
        sock.setsockopt(zmq.AFFINITY, 1 << CONTROL_IO_THREAD)
    if curve is not None:
        curve.client(sock)
    sock.setsockopt(zmq.IDENTITY, identity.encode())
    sock.connect(address)
    return sock


def router(ctx: zmq.Context, address: str, curve: Curve | None = None) -> zmq.Socket:
    """The supervisor's control socket, with ZMTP heartbeats (liveness.py)."""
    sock = _socket(ctx, zmq.ROUTER)
    liveness.configure(sock)
    if curve is not None:
        curve.server(ctx, sock)
    # A ROUTER never drops what it receives at the HWM (it stops reading that
    # peer), so a finite one bounds what a flooding stranger can make us hold;
    # a replica's control traffic is a few messages at a time.
    sock.setsockopt(zmq.RCVHWM, CONTROL_HWM)
    sock.setsockopt(zmq.SNDHWM, 0)  # never drop a command to a replica
    # An ERROR report is well under this (failures.MAX_TEXT); a peer sending
    # more is disconnected by ZeroMQ before the message is held.
    sock.setsockopt(zmq.MAXMSGSIZE, CONTROL_MAX_MESSAGE)
    try:
        sock.bind(address)
    except zmq.ZMQError as exc:
        sock.close(0)
        raise OSError(f"cannot bind the supervisor's control socket {address}: {exc}") from None
    return sock
