"""pipeline-lib 0.6.0, the peer zpipe is compared with (`pip install -e '.[bench]'`).

Run in its own process (`python -m bench.peers KIND --mode MODE --count N`) so
that its forked workers never share the bench's state; the sink prints one
`BENCH {json}` line, as the zpipe sinks do.

  small  source -> relay -> relay -> sink, ~100-byte dicts, packets_in_flight=64
  array  source -> relay -> sink, float32 arrays; --shm passes max_message_size
         so that arrays go through pipeline-lib's shared memory, not pipes
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Iterable

import numpy as np

from .procs import peer_result, python_module

MODES = {"process": "process-fork", "thread": "thread"}


def _report(**fields) -> None:
    print("BENCH " + json.dumps(fields), flush=True)


def small_source(count: int) -> Iterable[dict]:
    for i in range(count):
        yield {"id": i, "payload": "x" * 60, "v": 1.5}


def array_source(count: int, nbytes: int) -> Iterable[np.ndarray]:
    array = np.ones(nbytes // 4, dtype=np.float32)
    for _ in range(count):
        yield array


def relay(items: Iterable) -> Iterable:
    for item in items:
        yield item


def rate_sink(items: Iterable) -> None:
    clock = time.perf_counter
    count = nbytes = 0
    first = last = None
    for item in items:
        last = clock()
        if count == 0:
            first = last
        count += 1
        if isinstance(item, np.ndarray):
            nbytes += item.nbytes
    seconds = (last - first) if count else 0.0
    _report(count=count, nbytes=nbytes, seconds=seconds,
            rate=(count - 1) / seconds if seconds > 0 else None)


def main() -> None:
    from pipeline_lib import PipelineTask, execute

    parser = argparse.ArgumentParser(prog="python -m bench.peers", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", choices=["small", "array"])
    parser.add_argument("--mode", choices=sorted(MODES), default="process")
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--nbytes", type=int, default=10 * 2**20)
    parser.add_argument("--in-flight", type=int, default=64)
    parser.add_argument("--shm", action="store_true")
    args = parser.parse_args()
    if args.kind == "small":
        tasks = [PipelineTask(small_source, constants={"count": args.count},
                              packets_in_flight=args.in_flight),
                 PipelineTask(relay, packets_in_flight=args.in_flight),
                 PipelineTask(relay, packets_in_flight=args.in_flight),
                 PipelineTask(rate_sink)]
    else:
        size = args.nbytes + 2**16 if args.shm else None  # room for the pickle around it
        tasks = [PipelineTask(array_source, constants={"count": args.count,
                                                       "nbytes": args.nbytes},
                              packets_in_flight=args.in_flight, max_message_size=size),
                 PipelineTask(relay, packets_in_flight=args.in_flight, max_message_size=size),
                 PipelineTask(rate_sink)]
    execute(tasks, parallelism=MODES[args.mode], type_check_pipeline=False,
            inactivity_timeout=60)
    sys.stdout.flush()


def run(kind: str, mode: str, count: int, timeout: float = 120, **options) -> dict:
    """Run one pipeline-lib pipeline in a subprocess; the sink's figures."""
    argv = python_module("bench.peers", kind, "--mode", mode, "--count", str(count))
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        argv += [flag] if value is True else [flag, str(value)]
    return peer_result(argv, f"pipeline-lib {kind} {mode}", count, timeout)


if __name__ == "__main__":
    main()
