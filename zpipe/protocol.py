"""Control messages between the supervisor and every replica.

Each is one ZeroMQ frame: msgpack ``[PROTOCOL_VERSION, kind, fields]``. The
supervisor binds a ROUTER; each replica connects a DEALER whose identity is its
replica name (``square-1``) and a second one (``square-1/hb``) for heartbeats.
"""

from __future__ import annotations

from typing import Any

import msgpack

from .codec import PROTOCOL_VERSION

# replica -> supervisor
HELLO = "hello"          # pid, host, version: the replica is up and connected to the supervisor
READY = "ready"          # data sockets connected and set-up done
RECEIVED = "received"    # received: items received so far (sent when idle while draining)
ERROR = "error"          # exc_type, message, traceback, item_type, phase
DONE = "done"            # received, sent: input ended, outputs handed on, teardown done
HEARTBEAT = "heartbeat"  # received, sent

# supervisor -> replica
START = "start"          # a source may begin producing
DRAIN = "drain"          # upstream has finished: report received counts when idle
STOP = "stop"            # every item of upstream has arrived: end the input (sources: stop producing)
EXIT = "exit"            # every output has arrived downstream: close and exit
ABORT = "abort"          # reason: stop at once (a failure elsewhere, or an interrupt)
PING = "ping"            # the supervisor is alive (to heartbeat sockets)


def pack(kind: str, **fields: Any) -> bytes:
    return msgpack.packb([PROTOCOL_VERSION, kind, fields], use_bin_type=True)


class VersionMismatch(ValueError):
    """A control message from a peer speaking another protocol version."""


def unpack(data: bytes) -> tuple[str, dict[str, Any]]:
    """(kind, fields); raises ValueError on anything else."""
    try:
        version, kind, fields = msgpack.unpackb(data, raw=False)
    except Exception as exc:
        raise ValueError(f"malformed control message: {exc}") from None
    if version != PROTOCOL_VERSION:
        raise VersionMismatch(f"control message of protocol version {version!r}; this zpipe speaks "
                         f"{PROTOCOL_VERSION}: run the same zpipe version everywhere")
    if not isinstance(kind, str) or not isinstance(fields, dict):
        raise ValueError("malformed control message: expected [version, kind, fields]")
    return kind, fields
