"""The raw pyzmq reference for starting many processes (issue 14, `--only many`).

32 plain Python processes, each importing only pyzmq and msgpack (and the
standard library's argparse, json, sys, time): a source, RELAYS relays and a
sink, fanned out as zpipe's pipeline of the scenario is (source -> relay with
30 replicas -> sink). The driver starts them all at once, one after another in
flow order, without waiting for any of them, as a launcher does; each relay
binds its input, the source connects to every relay (PUSH, round-robin), every
relay connects to the sink, which binds its input; connecting sockets retry
after 10 ms, as zpipe's do. The source sends its items at once (ZeroMQ queues
them for the relays not yet up); each relay unpacks an item, marks it with its
number, packs it and sends it on. The sink reports when its first item
arrived (``first_wall``), when it had had an item from every relay
(``all_wall``), and when its last item arrived; then the driver lets the
others go (their stdin closes).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import msgpack
import zmq

RELAYS = 30


def _socket(ctx: zmq.Context, kind: int, hwm: int) -> zmq.Socket:
    sock = ctx.socket(kind)
    sock.sndhwm = sock.rcvhwm = hwm
    sock.linger = 5000
    sock.reconnect_ivl = 10          # zpipe's (wire/transport.py)
    sock.reconnect_ivl_max = 1000
    return sock


def _hold_or_serve(pull: zmq.Socket | None, serve=None) -> None:
    """Serve ``pull`` (if any) until stdin closes: the driver says when to stop."""
    stdin = sys.stdin.fileno()
    poller = zmq.Poller()
    poller.register(stdin, zmq.POLLIN)
    if pull is not None:
        poller.register(pull, zmq.POLLIN)
    while True:
        ready = dict(poller.poll())
        if pull is not None and pull in ready:
            while True:
                try:
                    message = pull.recv(zmq.NOBLOCK)
                except zmq.Again:
                    break
                serve(message)
        if stdin in ready and not sys.stdin.buffer.read1(4096):
            return


def source(ctx, args) -> None:
    push = _socket(ctx, zmq.PUSH, args.hwm)
    for address in args.out:
        push.connect(address)
    for i in range(args.count):
        push.send(msgpack.packb({"id": i, "payload": "x" * 60, "v": 1.5}))
    _hold_or_serve(None)


def relay(ctx, args) -> None:
    pull, push = _socket(ctx, zmq.PULL, args.hwm), _socket(ctx, zmq.PUSH, args.hwm)
    pull.bind(args.inp)
    push.connect(args.out[0])

    def serve(message: bytes) -> None:
        item = msgpack.unpackb(message)
        item["via"] = args.index
        push.send(msgpack.packb(item))

    _hold_or_serve(pull, serve)


def sink(ctx, args) -> None:
    pull = _socket(ctx, zmq.PULL, args.hwm)
    pull.bind(args.inp)
    seen: set[int] = set()
    first_wall = all_wall = None
    for count in range(args.count):
        item = msgpack.unpackb(pull.recv())
        if count == 0:
            first_wall = time.time()
        if all_wall is None:
            seen.add(item["via"])
            if len(seen) == args.relays:
                all_wall = time.time()
    print("BENCH " + json.dumps({"count": args.count, "first_wall": first_wall,
                                 "all_wall": all_wall, "last_wall": time.time(),
                                 "relays_seen": len(seen)}), flush=True)


ROLES = {"source": source, "relay": relay, "sink": sink}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.rawstart", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("role", choices=sorted(ROLES))
    parser.add_argument("--in", dest="inp")
    parser.add_argument("--out", action="append", default=[])
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--hwm", type=int, default=1000)
    parser.add_argument("--index", type=int, default=0)
    parser.add_argument("--relays", type=int, default=RELAYS)
    args = parser.parse_args()
    ctx = zmq.Context()
    try:
        ROLES[args.role](ctx, args)
    finally:
        ctx.destroy(linger=0)  # the sink has had everything by now (the driver waits for it)


# -- the driver (runs in the bench process) -------------------------------------

def run(count: int, relays: int = RELAYS, timeout: float = 60) -> dict:
    """Start the 2 + ``relays`` processes at once; the sink's times, from the
    moment the driver started the first process: ``first_item_s`` (its first
    item) and ``all_relays_s`` (an item from every relay)."""
    import tempfile

    from .procs import Child, python_module

    with tempfile.TemporaryDirectory(prefix="bench-rawstart-") as tmp:
        inputs = [f"ipc://{tmp}/relay{i}" for i in range(relays)]
        into_sink = f"ipc://{tmp}/sink"
        common = ["--count", str(count), "--relays", str(relays)]
        argvs = [["source", *common, *[a for address in inputs for a in ("--out", address)]]]
        argvs += [["relay", *common, "--in", inputs[i], "--out", into_sink, "--index", str(i)]
                  for i in range(relays)]
        argvs += [["sink", *common, "--in", into_sink]]
        children: list[Child] = []
        started = time.time()
        try:
            for argv in argvs:
                children.append(Child(python_module("bench.rawstart", *argv), stdin_pipe=True))
            sink_child = children[-1]
            status = sink_child.wait(timeout)
            if status != 0:
                raise RuntimeError(f"raw start sink exited {status}:\n{sink_child.tail()}")
            result = sink_child.result()
            for child in children[:-1]:
                child.popen.stdin.close()
            for child in children[:-1]:
                status = child.wait(10)
                if status != 0:
                    raise RuntimeError(f"raw start {child.argv[3]} exited {status}:\n"
                                       + child.tail())
        finally:
            for child in children:
                child.__exit__(None, None, None)
    if result["count"] != count or result["all_wall"] is None:
        raise RuntimeError(f"raw start: {result}")
    return {**result, "processes": len(argvs), "first_item_s": result["first_wall"] - started,
            "all_relays_s": result["all_wall"] - started}


if __name__ == "__main__":
    main()
