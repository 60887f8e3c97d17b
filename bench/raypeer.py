"""Ray Data as a pipeline, an optional peer for information (issue 14).

Not a dependency of zpipe nor of its bench: when `ray` cannot be imported the
row says "not installed" (`pip install 'ray[data]'` to have it). Run in its own
process (`python -m bench.raypeer --count N`), on a local Ray instance of
os.cpu_count() CPUs started for the run (its start is not timed) and shut down
after it, in a temporary folder of its own::

    ray.data.range(count).map(make_item).map(relay).map(relay).iter_rows()

the small items of the small-message scenarios, made by the first map (a
source), through two identity maps, read one by one by the driver (the sink):
items/s from the first row to the last. Ray plans the three maps as one
operator (fused: one task runs all three on a block), which is Ray's own way
of running such a chain.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time


def make_item(row: dict) -> dict:
    return {"id": row["id"], "payload": "x" * 60, "v": 1.5}


def relay(row: dict) -> dict:
    return row


def _report(**fields) -> None:
    print("BENCH " + json.dumps(fields), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.raypeer", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=1000)
    args = parser.parse_args()
    try:
        import ray
        import ray.data
    except ImportError as exc:
        _report(missing=True, why=str(exc))
        return
    folder = tempfile.mkdtemp(prefix="bench-ray-")
    try:
        ray.init(num_cpus=os.cpu_count() or 2, include_dashboard=False, log_to_driver=False,
                 _temp_dir=folder)
        try:
            context = ray.data.DataContext.get_current()
            context.enable_progress_bars = False
            dataset = ray.data.range(args.count).map(make_item).map(relay).map(relay)
            clock = time.perf_counter
            count = 0
            first = last = None
            for _row in dataset.iter_rows():
                last = clock()
                if count == 0:
                    first = last
                count += 1
            seconds = (last - first) if count else 0.0
            _report(count=count, seconds=seconds,
                    rate=(count - 1) / seconds if seconds > 0 else None,
                    version=ray.__version__, plan=str(dataset._plan._logical_plan.dag)
                    if hasattr(dataset, "_plan") else None)
        finally:
            ray.shutdown()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    sys.stdout.flush()


def run(count: int, timeout: float = 300) -> dict | None:
    """The chain in a subprocess; the driver's figures, or None without ray."""
    from .procs import peer_result, python_module

    result = peer_result(python_module("bench.raypeer", "--count", str(count)),
                         "Ray Data chain", count, timeout)
    return None if result.get("missing") else result


if __name__ == "__main__":
    main()
