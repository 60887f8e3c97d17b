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
ABORTED = "aborted"      # counts, pending, unsent: what it held when ABORT came (see losses.py)
ATTEMPT = "attempt"      # key: the item sent again now worked on, or None (recovery.py)
HEARTBEAT = "heartbeat"  # received, sent, call_started_ago
ITEM_ERROR = "item_error"  # exc_type, message, traceback, item_type, action, count: an item
                           # skipped or dead-lettered (on_error, itempolicy.py)
STUCK = "stuck"          # item_type, seconds, stack, action, limit: a call past item_timeout
                         # (stuck.py); on the /hb socket, as the heartbeat thread sees it

# anyone -> supervisor, and its answer (status.py)
STATUS = "status"        # what is the pipeline doing?
SNAPSHOT = "snapshot"    # snapshot: the answer (observe.py), nil before the first

# supervisor -> replica
WELCOME = "welcome"      # generation: the answer to HELLO; how often this replica was started before
START = "start"          # a source may begin producing
DRAIN = "drain"          # upstream has finished: report received counts when idle
STOP = "stop"            # every item of upstream has arrived: end the input (sources: stop producing)
EXIT = "exit"            # every output has arrived downstream: close and exit
ABORT = "abort"          # reason: stop at once (a failure elsewhere, or an interrupt)
PING = "ping"            # the supervisor is alive (to heartbeat sockets)
LOST = "lost"            # replica, generation: a replica of the next stage is gone (delivery.py)
REJOINED = "rejoined"    # replica, generation: ... and it is back, as that generation
POISON = "poison"        # keys: items that ended a replica, to skip or dead-letter (recovery.py)
NOTED = "noted"          # key: the answer to ATTEMPT (the replica waits for it before the call)


_COUNTS = {"received": int, "sent": int, "markers_received": int, "markers_sent": int,
           "pending": int, "unsent": int, "redelivered": int, "stale": int, "unacked": int,
           # What it measured of itself (observe.py checks what is inside).
           "figures": dict}
_TEXT = (str, type(None))
# What each kind may carry: a field of another type makes the whole message
# malformed (dropped and counted, never acted on); fields not named here are
# ignored, so a later version may add some.
FIELDS: dict[str, dict[str, Any]] = {
    HELLO: {"pid": int, "host": str, "version": int},
    READY: {},
    RECEIVED: {"received": int},
    ERROR: {"exc_type": _TEXT, "exc_module": _TEXT, "exc_qualname": _TEXT, "message": str,
            "traceback": _TEXT, "phase": _TEXT, "item_type": _TEXT, "args": (list, type(None)),
            **_COUNTS},
    DONE: _COUNTS,
    ABORTED: _COUNTS,
    # Seconds since the call in progress began (a stage with item_timeout), else nil.
    HEARTBEAT: {**_COUNTS, "call_started_ago": (float, int, type(None))},
    ITEM_ERROR: {"exc_type": _TEXT, "message": str, "traceback": _TEXT, "item_type": _TEXT,
                 "action": str, "count": int},
    STUCK: {"item_type": _TEXT, "seconds": (float, int), "stack": str, "action": str,
            "limit": (float, int)},
    WELCOME: {"generation": int, "poison": list, "downstream": list},
    START: {},
    DRAIN: {"expected": int},
    STOP: {},
    EXIT: {},
    ABORT: {"reason": str},
    PING: {},
    LOST: {"replica": int, "generation": int},
    POISON: {"keys": list},
    NOTED: {"key": (list, type(None))},
    ATTEMPT: {"key": (list, type(None))},
    REJOINED: {"replica": int, "generation": int},
    STATUS: {},
    SNAPSHOT: {"snapshot": (dict, type(None))},
}


def pack(kind: str, **fields: Any) -> bytes:
    return msgpack.packb([PROTOCOL_VERSION, kind, fields], use_bin_type=True)


class VersionMismatch(ValueError):
    """A control message from a peer speaking another protocol version."""


def unpack(data: bytes) -> tuple[str, dict[str, Any]]:
    """(kind, fields) of a well-formed control message; raises ValueError on anything else.

    Well-formed means: a known kind, and every field it names of its type
    (counts are non-negative integers).
    """
    try:
        version, kind, fields = msgpack.unpackb(data, raw=False)
    except Exception as exc:  # noqa: BLE001 - any decoding failure, at any depth
        raise ValueError(f"malformed control message: {type(exc).__name__}: {exc}") from None
    if version != PROTOCOL_VERSION:
        raise VersionMismatch(f"control message of protocol version {version!r}; this zpipe "
                              f"speaks {PROTOCOL_VERSION}: run the same zpipe version everywhere")
    if not isinstance(kind, str) or not isinstance(fields, dict):
        raise ValueError("malformed control message: expected [version, kind, fields]")
    schema = FIELDS.get(kind)
    if schema is None:
        raise ValueError(f"malformed control message: unknown kind {kind[:40]!r}")
    for name, expected in schema.items():
        if name not in fields:
            continue
        value = fields[name]
        if not isinstance(value, expected) or isinstance(value, bool) or \
                (type(value) is int and value < 0):
            raise ValueError(f"malformed control message: field {name!r} of {kind!r} is "
                             f"{type(value).__name__} {str(value)[:40]!r}")
    return kind, fields
