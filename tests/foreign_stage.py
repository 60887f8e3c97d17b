"""A stage written with only pyzmq and msgpack, from docs/protocol.md (no zpipe import).

Usage: python foreign_stage.py CONTROL BIND DOWNSTREAM[,DOWNSTREAM...] NAME-R REPLICAS
It multiplies every item by ten. REPLICAS is how many replicas its own stage
has; in the pipelines it is tested in, more than one replica means its links
are leased (docs/protocol.md, "Leases"): ROUTER sockets, credits, a lease
frame on every message and acknowledgements; one means PUSH/PULL.
"""

import os
import socket
import sys
import time

import msgpack
import zmq

VERSION = 7
FIRST_CREDITS = 2


def main() -> None:
    control, bind, downstream, name, replicas = sys.argv[1:6]
    downstream = downstream.split(",")
    leased = int(replicas) > 1  # the stage has several replicas: every link from here is leased
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
            return None, {}
        version, kind, fields = msgpack.unpackb(ctl.recv(), raw=False)
        assert version == VERSION
        return kind, fields

    tell("hello", pid=os.getpid(), host=socket.gethostname(), version=VERSION)
    kind, fields = command(30_000)
    assert kind == "welcome", kind
    generation = fields["generation"]
    inbox = ctx.socket(zmq.ROUTER if leased else zmq.PULL)
    inbox.bind(bind)
    outbox = ctx.socket(zmq.ROUTER if leased else zmq.PUSH)
    credits, seq, waiting = {}, 0, {}  # waiting: my seq -> (sender, its seq), to acknowledge
    turn = 0  # where the round-robin over downstream replicas goes on
    if leased:
        outbox.setsockopt(zmq.ROUTER_MANDATORY, 1)
    # "ready" only once the handshake with every downstream replica is done
    # (docs/protocol.md, Life cycle): a ROUTER drops what it cannot route yet,
    # and the first replica to connect would take every item.
    monitor = outbox.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED)
    for number, address in enumerate(downstream):
        if leased:
            peer = str(number).encode()
            outbox.setsockopt(zmq.CONNECT_ROUTING_ID, peer)
            credits[peer] = FIRST_CREDITS
        outbox.connect(address)
    handshakes, deadline = set(), time.monotonic() + 30
    while len(handshakes) < len(downstream):
        assert time.monotonic() < deadline, f"connected to {sorted(handshakes)} of {downstream}"
        if monitor.poll(100):
            handshakes.add(monitor.recv_multipart()[1].decode())
    outbox.disable_monitor()
    monitor.close()

    def take_answers(timeout_ms=0):
        """Credits (an integer) and acknowledgements (a list of seqs) from downstream,
        or a credit with acknowledgements (a third frame)."""
        while outbox.poll(timeout_ms):
            peer, *answers = outbox.recv_multipart()
            for value in map(msgpack.unpackb, answers):
                if isinstance(value, int):
                    credits[peer] += value
                    continue
                for mine in value:  # my message is finished downstream: so is its input
                    sender, theirs = waiting.pop(mine)
                    inbox.send_multipart([sender, msgpack.packb([theirs])])
            timeout_ms = 0

    def send(frame, sender=None, theirs=None):
        nonlocal seq, turn
        if not leased:
            outbox.send(frame)
            return
        while not any(credits.values()):  # wait for a credit
            take_answers(1000)
        take_answers()
        # The next replica, round-robin, that has a credit left (docs/protocol.md):
        # the one with the most would take every message while it gives credits
        # back in bunches, and the others none.
        peers = list(credits)
        for step in range(len(peers)):
            peer = peers[(turn + step) % len(peers)]
            if credits[peer]:
                turn = (turn + step + 1) % len(peers)
                break
        credits[peer] -= 1
        waiting[seq] = (sender, theirs)
        outbox.send_multipart([peer, msgpack.packb([seq, 0]), frame])  # generation 0: none lost
        seq += 1

    tell("ready")
    received = sent = 0
    draining, reported, last_beat = False, None, 0.0
    poller = zmq.Poller()
    poller.register(inbox, zmq.POLLIN)
    poller.register(ctl, zmq.POLLIN)
    if leased:
        poller.register(outbox, zmq.POLLIN)
    while True:
        if time.monotonic() - last_beat > 1:
            beat.send(msgpack.packb([VERSION, "heartbeat", {"received": received, "sent": sent}]))
            last_beat = time.monotonic()
        while beat.poll(0):
            beat.recv()
        events = dict(poller.poll(100))
        if outbox in events:
            take_answers()
        if inbox in events:
            frames = inbox.recv_multipart()
            sender = theirs = None
            if leased:  # the sender's id, then the lease: a credit back now, the ack later
                sender, lease, *frames = frames
                theirs, meant_for = msgpack.unpackb(lease)
                if meant_for != generation:
                    continue  # queued for an earlier life of mine: it is sent again anyway
                inbox.send_multipart([sender, msgpack.packb(1)])
            version, items = msgpack.unpackb(frames[0], raw=False)[:2]
            assert version == VERSION
            received += len(items)
            send(msgpack.packb([VERSION, [x * 10 for x in items]]), sender, theirs)
            sent += len(items)
            continue
        if ctl in events:
            kind, _ = command(0)
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
    while waiting:  # before DONE, on a leased output: everything sent is acknowledged
        take_answers(100)
    tell("done", received=received, sent=sent)
    while command(1000)[0] not in ("exit", "abort"):
        beat.send(msgpack.packb([VERSION, "heartbeat", {"received": received, "sent": sent}]))
    for sock in (ctl, beat, inbox, outbox):
        sock.close(1000)
    ctx.term()


if __name__ == "__main__":
    main()
