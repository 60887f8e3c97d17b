"""A stage written with only pyzmq and msgpack, from docs/protocol.md (no zpipe import).

Usage: python foreign_stage.py CONTROL BIND DOWNSTREAM NAME-R
It multiplies every item by ten.
"""

import os
import socket
import sys
import time

import msgpack
import zmq

VERSION = 1


def main() -> None:
    control, bind, downstream, name = sys.argv[1:5]
    ctx = zmq.Context()
    ctl = ctx.socket(zmq.DEALER)
    ctl.setsockopt(zmq.IDENTITY, name.encode())
    ctl.connect(control)
    beat = ctx.socket(zmq.DEALER)
    beat.setsockopt(zmq.IDENTITY, f"{name}/hb".encode())
    beat.connect(control)

    def tell(kind, **fields):
        ctl.send(msgpack.packb([VERSION, kind, fields]))

    def command(timeout_ms):
        if not ctl.poll(timeout_ms):
            return None
        version, kind, fields = msgpack.unpackb(ctl.recv(), raw=False)
        assert version == VERSION
        return kind

    tell("hello", pid=os.getpid(), host=socket.gethostname(), version=VERSION)
    inbox = ctx.socket(zmq.PULL)
    inbox.bind(bind)
    outbox = ctx.socket(zmq.PUSH)
    outbox.connect(downstream)
    tell("ready")
    received = sent = 0
    draining, reported, last_beat = False, None, 0.0
    poller = zmq.Poller()
    poller.register(inbox, zmq.POLLIN)
    poller.register(ctl, zmq.POLLIN)
    while True:
        if time.monotonic() - last_beat > 1:
            beat.send(msgpack.packb([VERSION, "heartbeat", {"received": received, "sent": sent}]))
            last_beat = time.monotonic()
        while beat.poll(0):
            beat.recv()
        events = dict(poller.poll(100))
        if inbox in events:
            frames = inbox.recv_multipart()
            version, items = msgpack.unpackb(frames[0], raw=False)[:2]
            assert version == VERSION
            received += len(items)
            outbox.send(msgpack.packb([VERSION, [x * 10 for x in items]]))
            sent += len(items)
            continue
        if ctl in events:
            kind = command(0)
            if kind == "drain":
                draining = True
            elif kind == "stop":
                break
            elif kind == "abort":
                return
            continue
        if draining and received != reported:  # idle: tell how much has arrived
            tell("received", received=received)
            reported = received
    tell("done", received=received, sent=sent)
    while command(1000) not in ("exit", "abort"):
        beat.send(msgpack.packb([VERSION, "heartbeat", {"received": received, "sent": sent}]))
    for sock in (ctl, beat, inbox, outbox):
        sock.close(1000)
    ctx.term()


if __name__ == "__main__":
    main()
