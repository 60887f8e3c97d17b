"""Python bytecodes a relay runs per message at a low rate: zpipe's against raw pyzmq's.

What the latency row's gap is made of, counted rather than timed (a count does
not move with the host): a relay process takes one small item at a time from a
feeder process, which sends the next only once the relay has sent the last on
and 2 ms have passed, so every message finds the relay asleep, as at a low
rate. The relay's main thread counts the bytecodes it runs (``sys.settrace``
with opcode events) from its second message to its last: the wait, the
receive, the decoding, the call, the encoding, the send and the bookkeeping
around them. zpipe's relay is its own Inbox, Runs and Outbox, as a replica of a
map stage on plain links runs them; the raw relay is bench/raw.py's loop for
the latency items (``_recv``, ``_send``).

    python -m bench.bytecodes zpipe|raw COUNT   (prints "BYTECODES <per message>")
"""

from __future__ import annotations

import collections
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

import msgpack
import zmq

from .procs import python_module

PAUSE = 0.002
_HEAD = b"\x92\x07\x91"  # zpipe's [version, [one item]] header (raw takes the item alone)


def per_message(kind: str, count: int = 200, timeout: float = 60.0) -> float:
    """Bytecodes per message of a ``kind`` ("zpipe" or "raw") relay over ``count`` messages."""
    with tempfile.TemporaryDirectory(prefix="bench-bytecodes-") as tmp:
        out = subprocess.run(python_module("bench.bytecodes", kind, str(count), tmp),
                             capture_output=True, text=True, timeout=timeout)
    lines = [line for line in out.stdout.splitlines() if line.startswith("BYTECODES ")]
    if out.returncode or not lines:
        raise RuntimeError(f"bench.bytecodes {kind} exited {out.returncode}:\n"
                           f"{out.stderr[-2000:]}")
    return float(lines[-1].split()[1])


def _feeder(count: int, tmp: str, framed: bool) -> None:
    ctx = zmq.Context()
    push, back = ctx.socket(zmq.PUSH), ctx.socket(zmq.PULL)
    push.connect(f"ipc://{tmp}/in")
    back.bind(f"ipc://{tmp}/out")
    back.rcvtimeo = 30_000  # a relay that died: the feeder gives up too
    for i in range(count + 1):
        time.sleep(PAUSE)
        item = msgpack.packb({"id": i, "t": time.monotonic_ns(), "payload": "x" * 60})
        push.send(_HEAD + item if framed else item)
        if i < count:  # the relay stops inside its last call
            back.recv()


class _Counter:
    """Counts the bytecodes the main thread runs, once started, until stopped."""

    def __init__(self) -> None:
        self.counts: collections.Counter[str] = collections.Counter()

    def _trace(self, frame: Any, event: str, arg: Any) -> Any:
        frame.f_trace_opcodes = True
        if event == "opcode":
            self.counts[frame.f_code.co_name] += 1
        return self._trace

    def start(self) -> None:
        frame = sys._getframe(1)
        while frame is not None:  # the frames already running count too
            frame.f_trace, frame.f_trace_opcodes = self._trace, True
            frame = frame.f_back
        sys.settrace(self._trace)

    def stop(self) -> int:
        sys.settrace(None)
        return sum(self.counts.values())


class _Done(BaseException):
    pass


def _relay(kind: str, count: int, tmp: str) -> float:
    ctx = zmq.Context()
    pull, push = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
    pull.bind(f"ipc://{tmp}/in")
    push.connect(f"ipc://{tmp}/out")
    feeder = subprocess.Popen(python_module("bench.bytecodes", "feeder", str(count), tmp,
                                            "framed" if kind == "zpipe" else "bare"))
    counter, calls = _Counter(), [0]

    def relay(item: Any) -> Any:
        calls[0] += 1
        if calls[0] == 2:
            counter.start()
        elif calls[0] == count + 1:
            raise _Done
        return item

    try:
        if kind == "zpipe":
            _zpipe_relay(ctx, pull, push, relay, f"ipc://{tmp}/nobody")
        else:
            from .raw import _recv, _send
            while (item := _recv(pull, "latency")) is not None:
                _send(push, "latency", relay(item))
    except _Done:
        pass
    finally:
        total = counter.stop()
        try:
            feeder.wait(30)
        finally:
            if feeder.poll() is None:
                feeder.kill()
    return total / (count - 1)


def _zpipe_relay(ctx: zmq.Context, pull: zmq.Socket, push: zmq.Socket, relay: Any,
                 nobody: str) -> None:
    from zpipe.replica.control import Control
    from zpipe.replica.inbox import Inbox
    from zpipe.replica.outbox import Outbox
    from zpipe.replica.runs import Runs

    dealer = ctx.socket(zmq.DEALER)
    dealer.connect(nobody)  # the supervisor: silent, as while a stage runs
    control = Control(dealer)
    inbox = Inbox(pull, control, "relay", 100)
    outbox = Outbox(push, control, source=False)
    inbox.before_idle = outbox.flush
    Runs(inbox, outbox, "relay").map(relay)


if __name__ == "__main__":
    role, n, directory = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    if role == "feeder":
        _feeder(n, directory, sys.argv[4] == "framed")
    else:
        print(f"BYTECODES {_relay(role, n, directory):.1f}", flush=True)
        os._exit(0)  # the outbox's threads and the context: nothing left to wait for
