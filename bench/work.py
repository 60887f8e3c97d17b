"""The busy work of the replicas scenario: the same loops in zpipe's stage
(bench/stages.py, Busy) and in the raw workers (bench/raw.py).

It imports nothing of zpipe, so that a raw node runs without it; the bench
copies it beside each run's stage module, as bench_work.py (write_pipeline).
"""

import time


def spin(spins: int) -> None:
    """A pure-Python loop of ``spins`` additions (calibrated to ~2 ms by the bench)."""
    x = 0
    for k in range(spins):
        x += k


def busy_for(seconds: float) -> None:
    """Pure-Python work until this thread has used ``seconds`` of CPU: the same cost
    for every item, whatever the host's speed does (here a fixed loop took from 1.3
    to 2.5 ms from one process to the next)."""
    clock = time.thread_time
    end = clock() + seconds
    x = 0
    while clock() < end:
        for k in range(200):
            x += k
