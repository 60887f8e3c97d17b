"""One function per scenario of issue 4: it runs zpipe and its references in the
same run and returns rows of the table. Sizes come from SIZES[--quick or not];
every throughput and latency figure, zpipe's and the references' alike, is the
best of `repeat` runs (the machine is shared: the best run is the least disturbed)."""

from __future__ import annotations

import statistics
import sys

from . import peers, raw, scenarios
from .report import (
    Best,
    Row,
    bounded,
    failed,
    gbps,
    megabytes,
    micros,
    rate,
    seconds,
    versus,
)

MB10 = 10 * 2**20

SIZES = {
    "full": dict(small=200_000, small_process=20_000, small_thread=100_000,
                 arrays=100, arrays_mnp=50, arrays_shm=40,
                 latency=1000, startup_runs=3, replicas=1000, idle_wait=2.0,
                 pressure_items=300, repeat=5,
                 soak=1_000_000, soak_kills=None, soak_seconds=60.0, soak_timeout=300.0),
    "quick": dict(small=20_000, small_process=2_000, small_thread=10_000,
                  arrays=20, arrays_mnp=10, arrays_shm=10,
                  latency=200, startup_runs=1, replicas=200, idle_wait=1.0,
                  pressure_items=60, repeat=1,
                  soak=50_000, soak_kills=3, soak_seconds=7.0, soak_timeout=90.0),
}
# The soak: soak items; soak_kills (None: every SOAK_KILL_EVERY s while the source
# sends); the source's shortest duration; the run's timeout.
SOAK_KILL_EVERY = 2.0
SOAK_REPLICAS = 3
PAUSE = 0.002   # seconds between items in the latency scenario
WARMUP = 20     # first latency samples left out


def step(text: str) -> None:
    print(f"bench: {text}", file=sys.stderr, flush=True)


def best(n: dict, measure, lowest: bool = False) -> Best:
    """The best of n["repeat"] runs of measure(): the highest, or the lowest."""
    return interleaved(n, measure, lowest=lowest)[0]


def interleaved(n: dict, *measures, lowest: bool = False) -> list[Best]:
    """The best of n["repeat"] runs of each measure, taken in turns (a, b, a, b, ...),
    so that a ratio of two is not skewed by the machine getting busier or quieter."""
    runs: list[list[float]] = [[] for _ in measures]
    for _ in range(n["repeat"]):
        for measure, taken in zip(measures, runs):
            taken.append(measure())
    return [Best(min(r) if lowest else max(r), r) for r in runs]


def _attempt(rows: list[Row], scenario: str, measure) -> None:
    """Append measure()'s row(s); an exception becomes an ERROR row, not a crash."""
    try:
        made = measure()
        rows.extend(made if isinstance(made, list) else [made])
    except Exception as exc:  # noqa: BLE001 - one broken scenario must not hide the others
        step(f"{scenario}: {type(exc).__name__}: {exc}")
        rows.append(failed(scenario, exc))


def small(n: dict) -> list[Row]:
    rows: list[Row] = []
    step(f"small messages: raw pyzmq chain and zpipe launch (4 stages) in turns, "
         f"{n['small']:,} items")
    reference, zpipe = interleaved(n, lambda: raw.chain("small", n["small"], relays=2)["rate"],
                                   lambda: scenarios.small(n["small"])["rate"])
    rows.append(versus("small msgs, 4 stages vs raw pyzmq", zpipe, reference, rate,
                       "(raw pyzmq)", ">=", 1.0))
    step(f"small messages: pipeline-lib process mode, {n['small_process']:,} items")
    _attempt(rows, "small msgs vs pipeline-lib process", lambda: versus(
        "small msgs vs pipeline-lib process", zpipe,
        best(n, lambda: peers.run("small", "process", n["small_process"])["rate"]), rate,
        "(pipeline-lib process)", ">=", 25))
    step(f"small messages: pipeline-lib thread mode, {n['small_thread']:,} items")
    _attempt(rows, "small msgs vs pipeline-lib thread", lambda: versus(
        "small msgs vs pipeline-lib thread", zpipe,
        best(n, lambda: peers.run("small", "thread", n["small_thread"])["rate"]), rate,
        "(pipeline-lib thread)"))
    return rows


def _gbps(result: dict) -> float:
    # bytes from the first to the last item: count - 1 items' worth
    per_item = result["nbytes"] / result["count"]
    return (result["count"] - 1) * per_item / result["seconds"] / 1e9


def arrays(n: dict) -> list[Row]:
    rows: list[Row] = []
    step(f"10 MB arrays: raw pyzmq frames copy=False, {n['arrays']} arrays")
    reference = best(n, lambda: _gbps(raw.chain("array", n["arrays"], relays=1, hwm=4)))
    step(f"10 MB arrays: zpipe launch, 3 stages, {n['arrays']} arrays")
    results = [scenarios.arrays(n["arrays"], MB10) for _ in range(n["repeat"])]
    zpipe = Best(max(_gbps(r) for r in results), [_gbps(r) for r in results])
    row = versus("10 MB arrays vs raw frames", zpipe, reference, gbps,
                 "(raw pyzmq, copy=False)", ">=", 0.9)
    row.data["writable_at_sink"] = results[0].get("writable")
    rows.append(row)
    step(f"10 MB arrays: raw pyzmq msgpack-numpy, {n['arrays_mnp']} arrays")
    _attempt(rows, "10 MB arrays vs raw msgpack-numpy", lambda: versus(
        "10 MB arrays vs raw msgpack-numpy", zpipe,
        best(n, lambda: _gbps(raw.chain("mnp", n["arrays_mnp"], relays=1, hwm=4))), gbps,
        "(raw pyzmq, msgpack-numpy)"))
    step(f"10 MB arrays: pipeline-lib shared memory, {n['arrays_shm']} arrays")
    _attempt(rows, "10 MB arrays vs pipeline-lib shm", lambda: versus(
        "10 MB arrays vs pipeline-lib shm", zpipe,
        best(n, lambda: _gbps(peers.run("array", "process", n["arrays_shm"], shm=True,
                                        in_flight=4))), gbps,
        "(pipeline-lib process, shm)"))
    return rows


def _p50_us(result: dict) -> float:
    return statistics.median(result["latencies_ns"]) / 1e3


def latency(n: dict) -> list[Row]:
    count = n["latency"]
    step(f"latency: zpipe launch (source -> relay -> sink), the raw pyzmq round trip through "
         f"one relay and the raw one-way chain in turns, {count} items {PAUSE * 1e3:g} ms apart")
    round_trip, zpipe, chain = interleaved(
        n, lambda: _p50_us(raw.round_trip(count, PAUSE, WARMUP)),
        lambda: _p50_us(scenarios.latency(count, PAUSE, WARMUP)),
        lambda: _p50_us(raw.chain("latency", count, relays=1, pause=PAUSE, warmup=WARMUP)),
        lowest=True)
    # The target is on the reference issue 4 names, the raw relay round trip.
    # The one-way raw chain has zpipe's very topology (a source, a relay and
    # a sink, each its own process) and is the stricter one: shown too.
    return [versus("latency p50 vs raw round trip", zpipe, round_trip, micros,
                   "(raw pyzmq, one relay and back)", "<=", 1.5),
            versus("latency p50 vs raw one-way chain", zpipe, chain, micros,
                   "(raw pyzmq, source -> relay -> sink)")]


def startup(n: dict) -> list[Row]:
    step(f"startup/shutdown: zpipe launch, 4 stages, {n['startup_runs']} run(s)")
    result = scenarios.startup(count=1000, runs=n["startup_runs"])
    rows = [bounded("launch -> first item at sink", result["first_item_s"], seconds, "<=", 1.0),
            bounded("last item -> launcher exit", result["exit_s"], seconds, "<=", 0.5)]
    for row, key in zip(rows, ("first_item_s", "exit_s")):
        row.data["runs"] = result["runs"][key]
    return rows


def replicas(n: dict) -> list[Row]:
    spins = scenarios.calibrate_spins(0.002)
    step(f"replicas: zpipe busy stage ({spins:,} spins, ~2 ms here), {n['replicas']} items, "
         f"replicas=1 and 2 in turns")
    tails: list[float] = []

    def two_replicas() -> float:
        result = scenarios.replicas(n["replicas"], spins, 2)
        tails.append(result["idle_tail_s"])
        return result["rate"]

    one, two = interleaved(n, lambda: scenarios.replicas(n["replicas"], spins, 1)["rate"],
                           two_replicas)
    row = versus("CPU-bound stage, replicas=2 vs 1", two, one, rate, "(zpipe, replicas=1)",
                 ">=", 1.8)
    row.data.update(spins=spins, ms_per_item=1e3 / one)
    paired = statistics.median(b / a for a, b in zip(one.runs, two.runs))
    tail = statistics.median(tails)
    return [row,
            Row("same, median of the ratios run by run", "-", ratio=f"{paired:.2f}x",
                data={"ratio": paired}),
            Row("same: one replica idle, the other busy, at the end", f"{tail * 1e3:.0f} ms",
                f"median of {len(tails)} run{'s' * (len(tails) != 1)}, each about "
                f"{n['replicas'] / two:.2f} s",
                data={"runs": tails})]


def memory(n: dict) -> list[Row]:
    rows: list[Row] = []
    step("memory: idle stage processes of a 4-stage zpipe launch")
    idle = scenarios.idle_rss(n["idle_wait"])["stages_mb"]
    raw_idle = raw.idle_rss()
    found = [v for v in idle.values() if v is not None]
    row = versus("idle stage process RSS (max)", max(found), raw_idle, megabytes,
                 "(raw pyzmq relay, idle)")
    row.data["stages_mb"] = idle
    rows.append(row)
    step(f"memory: relay RSS under backpressure, {n['pressure_items']} x 1 MB, hwm 5, "
         f"sink 10 ms/item")
    result = scenarios.backpressure_rss(n["pressure_items"], 2**20, 0.01, hwm=5)
    growth = result["max_mb"] - result["start_mb"]
    rows.append(Row("relay RSS under backpressure", f"max {megabytes(result['max_mb'])}",
                    f"start {megabytes(result['start_mb'])} (same relay)",
                    f"+{growth:.1f} MB", "<= +50 MB", "PASS" if growth <= 50 else "FAIL",
                    {**result, "growth_mb": growth}))
    # Flat, not leaking: the second half of the run climbs no higher than the first.
    samples = result["samples_mb"]
    first, second = max(samples[:len(samples) // 2]), max(samples[len(samples) // 2:])
    rows.append(Row("same, max RSS in the run's 2nd half", megabytes(second),
                    f"{megabytes(first)} (1st half)", f"{second - first:+.1f} MB",
                    data={"first_half_mb": first, "second_half_mb": second}))
    return rows


def delivery(n: dict) -> list[Row]:
    count = n["small"]
    step(f"delivery: the small scenario's chain, raw pyzmq, zpipe with restart off and with "
         f"restart = \"on-failure\" on every stage after the source in turns, {count:,} items")
    reference, off, on = interleaved(
        n, lambda: raw.chain("small", count, relays=2)["rate"],
        lambda: scenarios.small(count)["rate"],
        lambda: scenarios.small(count, restart=True)["rate"])
    paired = statistics.median(b / a for a, b in zip(off.runs, on.runs))
    return [versus("small msgs, restart on vs off (4 stages)", on, off, rate,
                   "(zpipe, restart off)", ">=", 0.9),
            Row("same, median of the ratios run by run", "-", ratio=f"{paired:.2f}x",
                data={"ratio": paired, "runs": [b / a for a, b in zip(off.runs, on.runs)]}),
            versus("same, restart off vs raw pyzmq", off, reference, rate, "(raw pyzmq)"),
            Row("restart off changes nothing", "no lease: PUSH/PULL, no acks",
                "the pipeline of \"small msgs\"",
                data={"stages_off": scenarios.small_stages(count),
                      "stages_on": scenarios.small_stages(count, restart=True)})]


def watching(n: dict) -> list[Row]:
    count = n["small"]
    step(f"watching: the small scenario's chain with /metrics served and scraped every "
         f"{scenarios.SCRAPE_EVERY:g} s and status lines every second, against the same "
         f"chain unwatched, in turns, {count:,} items")
    plain, watched = interleaved(n, lambda: scenarios.small(count)["rate"],
                                 lambda: scenarios.small_watched(count)["rate"])
    paired = statistics.median(b / a for a, b in zip(plain.runs, watched.runs))
    return [versus("small msgs, watched vs not (4 stages)", watched, plain, rate,
                   "(zpipe, no metrics served)", ">=", 0.97),
            Row("same, median of the ratios run by run", "-", ratio=f"{paired:.2f}x",
                data={"ratio": paired,
                      "runs": [b / a for a, b in zip(plain.runs, watched.runs)]})]


def _halves(values: list[float]) -> tuple[float, float]:
    """The maximum in the first half of the samples and in the second."""
    half = len(values) // 2
    return max(values[:half]), max(values[half:])


def soak(n: dict) -> list[Row]:
    count, kills = n["soak"], n["soak_kills"]
    how_long = "while the source sends" if kills is None else f"at most {kills} times"
    step(f"soak: {count:,} items through source -> relay1 (replicas={SOAK_REPLICAS}) -> relay2 "
         f"-> sink, restart = \"on-failure\" on both relays, a relay replica SIGKILLed every "
         f"{SOAK_KILL_EVERY:g} s ({how_long}), the source spread over at least "
         f"{n['soak_seconds']:g} s")
    result = scenarios.soak(count, SOAK_REPLICAS, SOAK_KILL_EVERY, kills, n["soak_seconds"],
                            n["soak_timeout"])
    samples = result.pop("samples")
    done = len(result["kills"])
    step(f"soak: zpipe launch exited {result['status']} after {done} kill(s) "
         f"({', '.join(k['replica'] for k in result['kills'])})")
    for note in result["notes"][:10]:
        step(f"soak: the launcher said: {note}")
    if len(result["notes"]) > 10:
        step(f"soak: ... and {len(result['notes']) - 10} more line(s) (--json keeps them)")
    heard = result["count"] is not None  # the sink's figures (it reports even when stopped)
    failed_run = result["status"] != 0 or result["timed_out"]
    where = f"{done} kill(s)"
    if failed_run:
        why = (result["failure"] or f"exit {result['status']}").removeprefix("zpipe: ")
        where += f"; the run failed: {why.split(';')[0]}"
    elif heard:
        where += f", {result['seconds']:.1f} s, {rate(result['rate'] or 0)}"
    complete = heard and not failed_run and result["missing"] == 0 and not result["unexpected"]
    rows = [Row("soak: ids at the sink, each at least once",
                f"{result['distinct']:,} of {count:,}" if heard else "no figures from the sink",
                where, target="all", result="PASS" if complete else "FAIL",
                data={k: v for k, v in result.items() if k != "output"})]
    dup, again = (result["duplicates"] if heard else None), result["redelivered"]
    rows.append(Row("soak: duplicates at the sink vs sent again",
                    f"{dup:,} duplicates" if heard else "-",
                    f"{again:,} item(s) sent again (zpipe's count)",
                    f"{dup / again:.2f}" if heard and again else "-", "<= sent again",
                    "PASS" if heard and dup <= again else "FAIL",
                    {"duplicates": dup, "redelivered": again, "per_stage": result["per_stage"]}))
    restarts = result["restarts"]
    rows.append(Row("soak: restarts reported vs kills", f"{restarts} restart(s)",
                    f"{done} kill(s)", target="= kills",
                    result="PASS" if restarts == done and done > 0 else "FAIL",
                    data={"restarts": restarts, "kills": result["kills"],
                          "restart_delays": result["restart_delays"]}))
    # Flat, not leaking: no replica's RSS climbs more than 10 % higher in the second
    # half of the run than in the first. Per replica, not summed: a sum moves with how
    # many relays are waiting out a backoff. Killed relays start afresh; the source,
    # the sink and the launcher never do (shown on their own).
    halves = {}
    for name in sorted({name for s in samples for name in s["replicas_mb"]}):
        values = [s["replicas_mb"][name] for s in samples if name in s["replicas_mb"]]
        if len(values) >= 2:
            halves[name] = _halves(values)
    if halves:
        worst = max(halves, key=lambda name: halves[name][1] / halves[name][0])
        first, second = halves[worst]
        rows.append(Row("soak: RSS per replica, 2nd half (worst)",
                        f"max {megabytes(second)} ({worst})", f"max {megabytes(first)} (1st half)",
                        f"{(second / first - 1) * 100:+.1f} %", "<= +10 %",
                        "PASS" if all(b <= a * 1.10 for a, b in halves.values()) else "FAIL",
                        {"halves_mb": halves, "samples": samples}))
    for label, values in (("source", [s["replicas_mb"].get("source-0") for s in samples]),
                          ("sink", [s["replicas_mb"].get("sink-0") for s in samples]),
                          ("launcher", [s["launcher_mb"] for s in samples])):
        values = [v for v in values if v is not None]
        if len(values) >= 2:
            first, second = _halves(values)
            rows.append(Row(f"same, the {label} (never killed)", f"max {megabytes(second)}",
                            f"max {megabytes(first)} (1st half)", f"{second - first:+.1f} MB",
                            data={"first_half_mb": first, "second_half_mb": second}))
    return rows


SCENARIOS = {"small": small, "arrays": arrays, "latency": latency, "startup": startup,
             "replicas": replicas, "memory": memory, "delivery": delivery, "soak": soak,
             "watching": watching}


def run(names: list[str], quick: bool, repeat: int | None = None) -> list[Row]:
    sizes = dict(SIZES["quick" if quick else "full"])
    if repeat:
        sizes["repeat"] = repeat
    rows: list[Row] = []
    for name in names:
        _attempt(rows, name, lambda: SCENARIOS[name](sizes))
    return rows
