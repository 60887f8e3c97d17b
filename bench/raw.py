"""Hand-written raw pyzmq references: what zpipe is measured against.

Each node is its own process (`python -m bench.raw ROLE ...`), PUSH/PULL over ipc,
SNDHWM/RCVHWM set, every node binds its input and connects its output; an empty
frame ends the stream. A node that sends keeps its sockets open until its stdin
closes (the driver closes it once the last node is done): libzmq may drop what
is still queued when a PUSH socket closes at its high-water mark, whatever LINGER. The driver functions below start the nodes and return the
sink's figures.

Kinds of item on the wire:
  small    a ~100-byte dict, msgpack-encoded and decoded at every hop
  latency  the same with a monotonic timestamp; the source pauses between items
  array    a float32 array as its own frame (copy=False) next to a msgpack header
  mnp      the same array inside msgpack (msgpack-numpy)
  frame    `bytes` items, each one frame sent with copy=False and received with
           copy=False; the relay forwards the very Frame it received
  batched  small items, up to BATCH items per message: the message is a msgpack
           array of the items, each packed on its own (the bytes zpipe's header
           holds, without its version). The source packs each item as it comes
           and sends the batch at BATCH items, or once its oldest item has waited
           BATCH_WAIT (zpipe's wait); a relay unpacks the message in one call,
           calls the identity on each item, packs each output and sends them
           on at once, so it never holds an item (latency stays bounded); the
           sink unpacks each message and goes through its items one by one.

Links are ipc (`--transport tcp` in the driver: tcp on 127.0.0.1, free ports).
With `--gated`, the source waits for a line on its stdin before its first item
and the sink keeps running after its report until its stdin closes: the driver
reads every node's CPU time before the first item and after the last.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time

import msgpack
import zmq

from .procs import MARKER, Child, cpu_of, cpu_used, free_ports, python_module, rss_mb
from .work import busy_for, spin

END = b""
BATCH = 1000           # items per message of the batched chain (issue 14)
BATCH_WAIT = 0.001     # the batched source sends a partial batch after this (zpipe's)


# -- the nodes (run in their own processes) ------------------------------------

def _socket(ctx: zmq.Context, kind: int, hwm: int) -> zmq.Socket:
    sock = ctx.socket(kind)
    sock.sndhwm = sock.rcvhwm = hwm
    sock.linger = 5000
    return sock


# numpy and msgpack_numpy are imported only by the kinds that use them (see
# bench/stages.py: the same holds for zpipe's stages).

def _send(sock: zmq.Socket, kind: str, obj) -> None:
    if kind == "array":
        header = msgpack.packb({"dtype": obj.dtype.str, "shape": list(obj.shape)})
        sock.send_multipart([header, obj], copy=False)
    elif kind == "mnp":
        import msgpack_numpy

        sock.send(msgpack.packb(obj, default=msgpack_numpy.encode))
    else:
        sock.send(msgpack.packb(obj))


def _recv(sock: zmq.Socket, kind: str):
    """The next item, or None at the end of the stream."""
    if kind == "array":
        import numpy as np

        frames = sock.recv_multipart(copy=False)
        if len(frames) == 1 and len(frames[0]) == 0:
            return None
        header = msgpack.unpackb(frames[0].bytes)
        return np.frombuffer(frames[1].buffer, dtype=header["dtype"]).reshape(header["shape"])
    message = sock.recv()
    if not message:
        return None
    if kind == "mnp":
        import msgpack_numpy

        return msgpack.unpackb(message, object_hook=msgpack_numpy.decode)
    return msgpack.unpackb(message)


def _items(args):
    if args.kind == "small":
        for i in range(args.count):
            yield {"id": i, "payload": "x" * 60, "v": 1.5}
    elif args.kind == "latency":
        for i in range(args.count):
            yield {"id": i, "t": time.monotonic_ns(), "payload": "x" * 60}
            time.sleep(args.pause)
    elif args.kind == "frame":
        data = b"\xa5" * args.nbytes  # one immutable object, sent again and again
        for _ in range(args.count):
            yield data
    else:
        import numpy as np

        array = np.ones(args.nbytes // 4, dtype=np.float32)
        for _ in range(args.count):
            yield array


def _hold() -> None:
    """Keep the sockets open until the driver says the stream has arrived."""
    sys.stdin.read()


def _report(**fields) -> None:
    print("BENCH " + json.dumps(fields), flush=True)


def _ready(args) -> None:
    print("READY", flush=True)
    if args.gated and args.role == "source":
        sys.stdin.readline()  # the driver has read every node's CPU time


def source(ctx, args) -> None:
    outs = args.out.split(",")
    if len(outs) > 1:
        return _dealing_source(ctx, args, outs)
    push = _socket(ctx, zmq.PUSH, args.hwm)
    push.connect(args.out)
    _ready(args)
    if args.kind == "batched":
        _batched_source(push, args)
    elif args.kind == "frame":
        send = push.send
        for item in _items(args):
            send(item, copy=False)
    else:
        for item in _items(args):
            _send(push, args.kind, item)
    push.send(END)
    _hold()


def _batched_source(push: zmq.Socket, args) -> None:
    packer = msgpack.Packer()
    pack, header, join, send = packer.pack, packer.pack_array_header, b"".join, push.send
    clock = time.monotonic
    batch: list[bytes] = []
    oldest = 0.0
    for i in range(args.count):
        if not batch:
            oldest = clock()
        batch.append(pack({"id": i, "payload": "x" * 60, "v": 1.5}))
        if len(batch) >= BATCH or clock() - oldest >= BATCH_WAIT:
            send(header(len(batch)) + join(batch))
            batch = []
    if batch:
        send(header(len(batch)) + join(batch))


def _dealing_source(ctx, args, outs: list[str]) -> None:
    """Small items dealt in turn to several workers, each item a message: what one
    PUSH connected to all of them does, with a socket per worker so that each gets
    exactly one END."""
    pushes = [_socket(ctx, zmq.PUSH, args.hwm) for _ in outs]
    for push, out in zip(pushes, outs):
        push.connect(out)
    _ready(args)
    for i, item in enumerate(_items(args)):
        _send(pushes[i % len(pushes)], args.kind, item)
    for push in pushes:
        push.send(END)
    _hold()


def worker(ctx, args) -> None:
    """A relay of small items that runs spin() or busy_for() (bench/work.py) on each:
    the raw replicas=N reference."""
    pull, push = _socket(ctx, zmq.PULL, args.hwm), _socket(ctx, zmq.PUSH, args.hwm)
    pull.bind(args.inp)
    push.connect(args.out)
    _ready(args)
    spins, seconds = args.spins, args.busy_seconds
    while (item := _recv(pull, "small")) is not None:
        if seconds:
            busy_for(seconds)
        else:
            spin(spins)
        _send(push, "small", item)
    push.send(END)
    _hold()


def spinner(ctx, args) -> None:
    """spin() ``count`` times, no messaging, once the driver says go (the host's
    ceiling for several such processes at once)."""
    print("READY", flush=True)
    sys.stdin.readline()
    start = time.time()
    for _ in range(args.count):
        spin(args.spins)
    _report(start=start, end=time.time())


def identity(item):
    """The relay's stage function: a Python call per item, as zpipe's relay makes."""
    return item


def relay(ctx, args) -> None:
    pull, push = _socket(ctx, zmq.PULL, args.hwm), _socket(ctx, zmq.PUSH, args.hwm)
    pull.bind(args.inp)
    push.connect(args.out)
    _ready(args)
    if args.kind == "batched":
        packer = msgpack.Packer()
        pack, header, join = packer.pack, packer.pack_array_header, b"".join
        unpackb, recv, send, call = msgpack.unpackb, pull.recv, push.send, identity
        while message := recv():
            outputs = [pack(call(item)) for item in unpackb(message)]
            send(header(len(outputs)) + join(outputs))
    elif args.kind == "frame":
        recv, send = pull.recv, push.send
        while len(frame := recv(copy=False)):
            send(frame, copy=False)  # the very Frame received: no copy
    else:
        while (item := _recv(pull, args.kind)) is not None:
            _send(push, args.kind, item)
    push.send(END)
    _hold()


def sink(ctx, args) -> None:
    pull = _socket(ctx, zmq.PULL, args.hwm)
    pull.bind(args.inp)
    _ready(args)
    if args.kind == "batched":
        _batched_sink(pull, args)
    elif args.kind == "frame":
        _frame_sink(pull, args)
    else:
        _sink(pull, args)
    if args.gated:
        _hold()  # alive until the driver has read its CPU time


def _sink(pull: zmq.Socket, args) -> None:
    clock = time.perf_counter
    count = nbytes = 0
    first = last = None
    latencies = []
    ends = 0
    while True:
        item = _recv(pull, args.kind)
        if item is None:
            ends += 1
            if ends < args.ends:  # one END per worker feeding this sink
                continue
            break
        last = clock()
        if args.kind == "latency":
            latencies.append(time.monotonic_ns() - item["t"])
        elif hasattr(item, "nbytes"):  # a numpy array
            nbytes += item.nbytes
        if count == 0:
            first = last
        count += 1
    seconds = (last - first) if count else 0.0
    _report(count=count, nbytes=nbytes, seconds=seconds,
            rate=(count - 1) / seconds if seconds > 0 else None,
            latencies_ns=latencies[args.warmup:])


def _frame_sink(pull: zmq.Socket, args) -> None:
    """The sink of `bytes` frames: what _sink does, bytes counted with len()."""
    clock = time.perf_counter
    count = nbytes = 0
    first = last = None
    recv = pull.recv
    while len(item := recv(copy=False)):
        last = clock()
        nbytes += len(item)
        if count == 0:
            first = last
        count += 1
    seconds = (last - first) if count else 0.0
    _report(count=count, nbytes=nbytes, seconds=seconds,
            rate=(count - 1) / seconds if seconds > 0 else None, latencies_ns=[])


def _batched_sink(pull: zmq.Socket, args) -> None:
    """The sink of the batched chain: each message unpacked in one call, then its
    items gone through one by one, doing what the other sinks do per item."""
    clock = time.perf_counter
    unpackb, recv = msgpack.unpackb, pull.recv
    count = nbytes = 0
    first = last = None
    while message := recv():
        for item in unpackb(message):
            last = clock()
            if hasattr(item, "nbytes"):  # never here: the same test as the other sinks
                nbytes += item.nbytes
            if count == 0:
                first = last
            count += 1
    seconds = (last - first) if count else 0.0
    _report(count=count, nbytes=nbytes, seconds=seconds,
            rate=(count - 1) / seconds if seconds > 0 else None, latencies_ns=[])


def ping(ctx, args) -> None:
    """Round trips through one relay, one item at a time."""
    push, pull = _socket(ctx, zmq.PUSH, args.hwm), _socket(ctx, zmq.PULL, args.hwm)
    pull.bind(args.inp)
    push.connect(args.out)
    print("READY", flush=True)
    trips = []
    for i in range(args.count):
        start = time.monotonic_ns()
        push.send(msgpack.packb({"id": i, "t": start, "payload": "x" * 60}))
        msgpack.unpackb(pull.recv())
        trips.append(time.monotonic_ns() - start)
        time.sleep(args.pause)
    push.send(END)
    pull.recv()  # the relay sends the end back: everything has gone through
    _report(count=len(trips), latencies_ns=trips[args.warmup:])


ROLES = {"source": source, "relay": relay, "sink": sink, "ping": ping, "worker": worker,
         "spinner": spinner}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.raw", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("role", choices=sorted(ROLES))
    parser.add_argument("--kind", choices=["small", "latency", "array", "mnp", "frame", "batched"],
                        default="small")
    parser.add_argument("--in", dest="inp")
    parser.add_argument("--out")
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--hwm", type=int, default=1000)
    parser.add_argument("--nbytes", type=int, default=10 * 2**20)
    parser.add_argument("--pause", type=float, default=0.002)
    parser.add_argument("--warmup", type=int, default=0)
    parser.add_argument("--spins", type=int, default=0, help="spin() loops per item (worker)")
    parser.add_argument("--busy-seconds", type=float, default=0.0,
                        help="CPU seconds of busy_for() per item (worker; instead of --spins)")
    parser.add_argument("--ends", type=int, default=1, help="ENDs the sink waits for")
    parser.add_argument("--gated", action="store_true",
                        help="the source waits for a line on stdin; the sink holds after its "
                             "report (the driver reads CPU times around the stream)")
    args = parser.parse_args()
    ctx = zmq.Context()
    try:
        ROLES[args.role](ctx, args)
    finally:
        ctx.destroy(linger=0)  # everything sent has arrived by now (see _hold)


# -- the driver (runs in the bench process) -------------------------------------

def _node(role: str, opts: list[str], **addresses: str) -> Child:
    argv = python_module("bench.raw", role, *opts)
    for key, value in addresses.items():
        argv += [f"--{key}", value]
    child = Child(argv, stdin_pipe=True)
    child.wait_line("READY", timeout=30)
    return child


def _run(nodes_spec, opts: list[str], timeout: float) -> dict:
    """Start the nodes in the order given (each after the previous is ready);
    once the reporting node (the first) is done, let the others go; its result.

    With ``--gated`` in ``opts`` (the source last, the sink first): every node's
    CPU time is read once all are ready, the source told to go, and read again
    once the sink has reported (every node still running): ``cpu_s`` in the
    result is what the nodes used in between, ``cpu_nodes_s`` per node."""
    children: list[Child] = []
    gated = "--gated" in opts
    try:
        for role, addresses in nodes_spec:
            children.append(_node(role, opts, **addresses))
        deadline = time.monotonic() + timeout
        cpu = {}
        if gated:
            pids = {f"{i}-{role}": c.pid for i, ((role, _), c) in
                    enumerate(zip(nodes_spec, children))}
            before = cpu_of(pids)
            children[-1].popen.stdin.write(b"go\n")
            children[-1].popen.stdin.flush()
            children[0].wait_line(MARKER, timeout=timeout)
            after = cpu_of(pids)
            cpu = {"cpu_s": cpu_used(before, after),
                   "cpu_nodes_s": {name: after[name] - before[name] for name in pids}}
            children[0].popen.stdin.close()
        for child in children:
            status = child.wait(max(0.1, deadline - time.monotonic()))
            if status != 0:
                raise RuntimeError(f"raw {child.argv[3]} exited {status}:\n{child.tail()}")
            if child is children[0]:
                for other in children[1:]:
                    other.popen.stdin.close()
        return {**children[0].result(), **cpu}
    finally:
        for child in children:
            child.__exit__(None, None, None)


def _opts(kind: str, count: int, hwm: int = 1000, nbytes: int = 10 * 2**20,
          pause: float = 0.002, warmup: int = 0, gated: bool = False, spins: int = 0,
          busy_seconds: float = 0.0, ends: int = 1) -> list[str]:
    return ["--kind", kind, "--count", str(count), "--hwm", str(hwm), "--nbytes", str(nbytes),
            "--pause", str(pause), "--warmup", str(warmup), "--spins", str(spins),
            "--busy-seconds", repr(busy_seconds), "--ends", str(ends),
            *(["--gated"] if gated else [])]


def chain(kind: str, count: int, relays: int, timeout: float = 120, transport: str = "ipc",
          **options) -> dict:
    """source -> `relays` relay processes -> sink; the sink's figures. ``transport``
    "tcp": every link on 127.0.0.1, on free ports. ``gated=True``: the nodes' CPU
    time from the first item to the last as well (see _run)."""
    with tempfile.TemporaryDirectory(prefix="bench-raw-") as tmp:
        if transport == "tcp":
            hops = [f"tcp://127.0.0.1:{port}" for port in free_ports(relays + 1)]
        else:
            hops = [f"ipc://{tmp}/hop{i}" for i in range(relays + 1)]
        nodes = [("sink", {"in": hops[-1]})]
        nodes += [("relay", {"in": hops[i], "out": hops[i + 1]}) for i in reversed(range(relays))]
        nodes += [("source", {"out": hops[0]})]
        result = _run(nodes, _opts(kind, count, **options), timeout)
    if result["count"] != count:
        raise RuntimeError(f"raw {kind} chain: {result['count']} items of {count} arrived")
    return result


def workers(count: int, replicas: int, spins: int = 0, seconds: float = 0.0,
            hwm: int = 100, timeout: float = 120) -> dict:
    """source -> ``replicas`` worker processes (``spins`` loops or ``seconds`` of CPU
    per item) -> sink, each item a message, dealt in turn (zpipe's scenario, hwm as
    zpipe's); the sink's figures."""
    with tempfile.TemporaryDirectory(prefix="bench-raw-") as tmp:
        into = [f"ipc://{tmp}/work{r}" for r in range(replicas)]
        out = f"ipc://{tmp}/sink"
        nodes = [("sink", {"in": out})]
        nodes += [("worker", {"in": address, "out": out}) for address in into]
        nodes += [("source", {"out": ",".join(into)})]
        result = _run(nodes, _opts("small", count, hwm=hwm, spins=spins, busy_seconds=seconds,
                                   ends=replicas), timeout)
    if result["count"] != count:
        raise RuntimeError(f"raw workers: {result['count']} items of {count} arrived")
    return result


def parallel(count: int, spins: int, processes: int, timeout: float = 120) -> float:
    """spin() ``count`` times in all, shared by ``processes`` processes started
    together, with no messaging: items/s from the first start to the last end."""
    children = []
    try:
        for _ in range(processes):
            children.append(_node("spinner", _opts("small", count // processes, spins=spins)))
        for child in children:
            child.popen.stdin.write(b"go\n")
            child.popen.stdin.flush()
        results = []
        for child in children:
            status = child.wait(timeout)
            if status != 0:
                raise RuntimeError(f"raw spinner exited {status}:\n{child.tail()}")
            results.append(child.result())
    finally:
        for child in children:
            child.__exit__(None, None, None)
    done = processes * (count // processes)
    return done / (max(r["end"] for r in results) - min(r["start"] for r in results))


def round_trip(count: int, pause: float, warmup: int, timeout: float = 60) -> dict:
    """ping -> relay -> ping, one item at a time; the round-trip times."""
    with tempfile.TemporaryDirectory(prefix="bench-raw-") as tmp:
        there, back = f"ipc://{tmp}/there", f"ipc://{tmp}/back"
        nodes = [("ping", {"in": back, "out": there}), ("relay", {"in": there, "out": back})]
        return _run(nodes, _opts("latency", count, pause=pause, warmup=warmup), timeout)


def idle_rss() -> float | None:
    """RSS in MB of a raw relay process waiting for its first item."""
    with tempfile.TemporaryDirectory(prefix="bench-raw-") as tmp:
        with _node("relay", [], **{"in": f"ipc://{tmp}/a", "out": f"ipc://{tmp}/b"}) as child:
            time.sleep(0.5)
            return rss_mb(child.pid)


if __name__ == "__main__":
    main()
