"""multiprocessing.Pool as a pipeline, a peer for information (issue 14).

Run in its own process (`python -m bench.pool --count N`): the small items of
the small-message scenarios through a chain of 4 stages, the source and the
sink in the main process, the two relays on one Pool of os.cpu_count() worker
processes::

    sink(pool.imap(relay, pool.imap(relay, source(count), CHUNKSIZE), CHUNKSIZE))

Each imap sends its items to the workers CHUNKSIZE at a time (one pickle per
chunk) and gives them back in order. One pool serving both relays was faster
here than a pool of one process per relay (650,000 against 285,000 items/s, in
two runs each). The sink prints one `BENCH {json}` line, as the zpipe sinks do:
items/s from its first item to its last.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import time

CHUNKSIZE = 64


def relay(item):
    return item


def source(count: int):
    for i in range(count):
        yield {"id": i, "payload": "x" * 60, "v": 1.5}


def rate_sink(items) -> dict:
    clock = time.perf_counter
    count = nbytes = 0
    first = last = None
    for item in items:
        last = clock()
        if count == 0:
            first = last
        count += 1
        if hasattr(item, "nbytes"):  # what the other sinks do per item
            nbytes += item.nbytes
    seconds = (last - first) if count else 0.0
    return {"count": count, "nbytes": nbytes, "seconds": seconds,
            "rate": (count - 1) / seconds if seconds > 0 else None}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.pool", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--chunksize", type=int, default=CHUNKSIZE)
    parser.add_argument("--processes", type=int, default=os.cpu_count() or 2)
    args = parser.parse_args()
    with multiprocessing.Pool(args.processes) as pool:
        result = rate_sink(pool.imap(relay, pool.imap(relay, source(args.count), args.chunksize),
                                     args.chunksize))
    print("BENCH " + json.dumps({**result, "processes": args.processes,
                                 "chunksize": args.chunksize}), flush=True)
    sys.stdout.flush()


def run(count: int, timeout: float = 120) -> dict:
    """The chain in a subprocess; the sink's figures."""
    from .procs import peer_result, python_module

    return peer_result(python_module("bench.pool", "--count", str(count)),
                       "multiprocessing.Pool chain", count, timeout)


if __name__ == "__main__":
    main()
