"""A stage written with only pyzmq and msgpack, from docs/protocol.md (no zpipe import).

Usage: python foreign_stage.py CONTROL BIND DOWNSTREAM[,DOWNSTREAM...] NAME-R REPLICAS
It multiplies every item by ten. REPLICAS is how many replicas its own stage
has; more than one address downstream means the next stage has several.
"""

import os
import socket
import sys
import time

import msgpack
import zmq

VERSION = 2
FIRST_CREDITS = 2


def main() -> None:
    control, bind, downstream, name, replicas = sys.argv[1:6]
    downstream = downstream.split(",")
    routed_in, routed_out = int(replicas) > 1, len(downstream) > 1
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
    inbox = ctx.socket(zmq.ROUTER if routed_in else zmq.PULL)
    inbox.bind(bind)
    outbox = ctx.socket(zmq.ROUTER if routed_out else zmq.PUSH)
    credits = {}
    if routed_out:
        outbox.setsockopt(zmq.ROUTER_MANDATORY, 1)
    for number, address in enumerate(downstream):
        if routed_out:
            peer = str(number).encode()
            outbox.setsockopt(zmq.CONNECT_ROUTING_ID, peer)
            credits[peer] = FIRST_CREDITS
        outbox.connect(address)

    def send(frame):
        if not routed_out:
            outbox.send(frame)
            return
        while not any(credits.values()):  # wait for a credit
            peer, count = outbox.recv_multipart()
            credits[peer] += msgpack.unpackb(count)
        while outbox.poll(0):  # and take those that came meanwhile
            peer, count = outbox.recv_multipart()
            credits[peer] += msgpack.unpackb(count)
        peer = max(credits, key=credits.get)
        credits[peer] -= 1
        outbox.send_multipart([peer, frame])

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
            if routed_in:  # the sender's id first: give its credit back
                sender, *frames = frames
                inbox.send_multipart([sender, msgpack.packb(1)])
            version, items = msgpack.unpackb(frames[0], raw=False)[:2]
            assert version == VERSION
            received += len(items)
            send(msgpack.packb([VERSION, [x * 10 for x in items]]))
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
