"""The zpipe side of every scenario, through the public surface only: a
pipeline.toml and a stage module written into a temporary folder, run with
`zpipe launch FILE` as a user would; sinks print their figures (bench/stages.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

from . import work
from .procs import (
    Child,
    cmdline,
    cpu_of,
    cpu_seconds,
    cpu_used,
    descendants,
    free_ports,
    python_module,
    rss_mb,
)

STAGES = Path(__file__).with_name("stages.py")
WORK = Path(__file__).with_name("work.py")
MODULE = "bench_stages"
TIMEOUT = 180.0  # seconds for any one launch; zpipe's own inactivity_timeout is 30 s


def stage(name: str, function: str, **fields: Any) -> dict:
    return {"name": name, "run": f"{MODULE}:{function}", **fields}


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + " }"
    raise TypeError(value)


def write_pipeline(folder: Path, name: str, stages: list[dict], hwm: int) -> Path:
    shutil.copy(STAGES, folder / f"{MODULE}.py")
    shutil.copy(WORK, folder / "bench_work.py")  # what the stages import
    lines = ["[pipeline]", f"name = {_toml(name)}", f"hwm = {hwm}", "inactivity_timeout = 30", ""]
    for spec in stages:
        lines.append("[[stages]]")
        lines += [f"{key} = {_toml(value)}" for key, value in spec.items()]
        lines.append("")
    path = folder / "pipeline.toml"
    path.write_text("\n".join(lines))
    return path


def zpipe_command(*args: str) -> list[str]:
    script = Path(sys.executable).with_name("zpipe")
    return [str(script), *args] if script.exists() else python_module("zpipe", *args)


@contextlib.contextmanager
def launched(name: str, stages: list[dict], hwm: int = 100,
             options: tuple[str, ...] = ()) -> Iterator[Child]:
    """`zpipe launch` of a generated pipeline; the group is cleaned up on the way out."""
    with tempfile.TemporaryDirectory(prefix="bench-zpipe-") as tmp:
        path = write_pipeline(Path(tmp), name, stages, hwm)
        with Child(zpipe_command("launch", str(path), *options), cwd=tmp) as child:
            yield child


def run_to_end(name: str, stages: list[dict], hwm: int = 100,
               expect: int | None = None, options: tuple[str, ...] = ()) -> tuple[dict, Child]:
    """Launch, wait for the end; the sink's figures (checked: ``expect`` items arrived)."""
    with launched(name, stages, hwm, options) as child:
        status = child.wait(TIMEOUT)
        if status != 0:
            raise RuntimeError(f"zpipe launch {name} exited {status}:\n{child.tail(30)}")
        result = child.result()
        if expect is not None and result["count"] != expect:
            raise RuntimeError(f"zpipe {name}: {result['count']} items of {expect} arrived")
        return result, child


def stage_pids(launcher: int) -> dict[str, int]:
    """Stage name -> pid of each `zpipe stage --replica I -- FILE NAME` process under the launcher."""
    found = {}
    for pid in descendants(launcher):
        argv = cmdline(pid)
        if "stage" in argv and "--" in argv and argv.index("--") + 2 < len(argv):
            found[argv[argv.index("--") + 2]] = pid
    return found


def replica_pids(launcher: int) -> dict[str, int]:
    """Replica name (NAME-I) -> pid of each `zpipe stage --replica I -- FILE NAME` process."""
    found = {}
    for pid in descendants(launcher):
        argv = cmdline(pid)
        if "stage" in argv and "--replica" in argv and "--" in argv and \
                argv.index("--") + 2 < len(argv) and argv.index("--replica") + 1 < len(argv):
            name = argv[argv.index("--") + 2]
            found[f"{name}-{argv[argv.index('--replica') + 1]}"] = pid
    return found


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# -- the scenarios ------------------------------------------------------------

# restart = "on-failure", with room for a kill every 2 s: a replica's deaths past
# max_restarts within restart_window would fail the run as flapping.
RESTART = {"restart": "on-failure", "max_restarts": 1000, "restart_window": 60}


def small_stages(count: int, restart: bool = False) -> list[dict]:
    """The small scenario's 4 stages. ``restart``: restart = "on-failure" on every stage
    after the source, so that every link is leased (acknowledgements, kept messages)."""
    again = RESTART if restart else {}
    return [stage("source", "small_source", params={"count": count}),
            stage("relay1", "relay", **again), stage("relay2", "relay", **again),
            stage("sink", "rate_sink", stream=True, **again)]


def small(count: int, restart: bool = False) -> dict:
    """4 stages (source -> relay -> relay -> sink), ~100-byte dicts, hwm 1000."""
    result, _ = run_to_end("small", small_stages(count, restart), hwm=1000, expect=count)
    return result


def small_watched(count: int) -> dict:
    """small(), with /metrics served and scraped every SCRAPE_EVERY s all along, and the
    live view's status lines every second: what watching a run costs. ``scrapes`` and
    ``status_lines``: how much of it there was (a run shorter than a second has no
    status line at all)."""
    import socket
    import threading
    import urllib.request
    with socket.socket() as probe:  # a free port (the launcher binds it a moment later)
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    done = threading.Event()
    scrapes = [0]

    def scrape() -> None:
        while not done.wait(SCRAPE_EVERY):
            with contextlib.suppress(OSError):
                urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read()
                scrapes[0] += 1
    scraper = threading.Thread(target=scrape, daemon=True)
    scraper.start()
    try:
        result, child = run_to_end("small", small_stages(count), hwm=1000, expect=count,
                                   options=("--metrics-port", str(port),
                                            "--status-interval", "1"))
    finally:
        done.set()
        scraper.join(5)
    lines = sum(1 for line in child.lines if line.startswith("zpipe: status "))
    return {**result, "scrapes": scrapes[0], "status_lines": lines}


SCRAPE_EVERY = 0.2


def arrays(count: int, nbytes: int) -> dict:
    result, _ = run_to_end("arrays", [
        stage("source", "array_source", params={"count": count, "nbytes": nbytes}),
        stage("relay", "relay"),
        stage("sink", "rate_sink", stream=True)], hwm=4, expect=count)
    return result


def chain_cpu(count: int, relays: int) -> dict:
    """source -> ``relays`` relays -> sink, the small items of small() (hwm 1000), and
    the CPU time (user + system, every thread) the stage processes used from just
    before the first item to just after the last: ``cpu_s`` (their sum) and
    ``cpu_stages_s``. The source waits for the bench before its first item and
    after its last (gated_source), so every replica is running at both readings;
    the sink says when the last item has arrived (counted_sink). ``launcher_cpu_s``:
    the launcher's own CPU time over the same span, not in the sum."""
    with tempfile.TemporaryDirectory(prefix="bench-flags-") as flags:
        go, release = os.path.join(flags, "go"), os.path.join(flags, "release")
        stages = [stage("source", "gated_source",
                        params={"count": count, "go": go, "release": release}),
                  *[stage(f"relay{i + 1}", "relay") for i in range(relays)],
                  stage("sink", "counted_sink", params={"count": count}, stream=True)]
        with launched("chain", stages, hwm=1000) as child:
            child.wait_line('"event": "waiting"', timeout=60)
            pids = stage_pids(child.pid)
            if len(pids) != len(stages):
                raise RuntimeError(f"{len(pids)} stage processes found, {len(stages)} expected")
            before, launcher_before = cpu_of(pids), cpu_seconds(child.pid)
            Path(go).touch()
            child.wait_line('"event": "arrived"', timeout=TIMEOUT)
            after, launcher_after = cpu_of(pids), cpu_seconds(child.pid)
            Path(release).touch()
            status = child.wait(TIMEOUT)
            if status != 0:
                raise RuntimeError(f"zpipe launch chain exited {status}:\n{child.tail(30)}")
            result = child.result()
    if result["count"] != count:
        raise RuntimeError(f"zpipe chain: {result['count']} items of {count} arrived")
    return {**result, "cpu_s": cpu_used(before, after),
            "cpu_stages_s": {name: after[name] - before[name] for name in pids},
            "launcher_cpu_s": launcher_after - launcher_before
            if None not in (launcher_before, launcher_after) else None}


def sized(count: int, nbytes: int, kind: str, hwm: int) -> dict:
    """source -> relay -> sink of ``count`` items of ``nbytes``, one object sent again
    and again: ``kind`` "bytes" (same_bytes_source) or "array" (float32,
    same_array_source); the sink counts items and bytes (sized_sink)."""
    source = {"bytes": "same_bytes_source", "array": "same_array_source"}[kind]
    result, _ = run_to_end(f"sized-{kind}", [
        stage("source", source, params={"count": count, "nbytes": nbytes}),
        stage("relay", "relay"),
        stage("sink", "sized_sink", stream=True)], hwm=hwm, expect=count)
    return result


def arrays_tcp(count: int, nbytes: int) -> dict:
    """arrays() with the relay and the sink on tcp addresses (127.0.0.1, free ports)."""
    relay_port, sink_port = free_ports(2)
    result, _ = run_to_end("arrays-tcp", [
        stage("source", "array_source", params={"count": count, "nbytes": nbytes}),
        stage("relay", "relay", address=f"tcp://127.0.0.1:{relay_port}"),
        stage("sink", "rate_sink", stream=True, address=f"tcp://127.0.0.1:{sink_port}")],
        hwm=4, expect=count)
    return result


def many(count: int, replicas: int) -> dict:
    """source -> relay (``replicas`` replicas) -> sink: launch -> first item at the
    sink, last item -> launcher exit (as startup(), one run)."""
    result, child = run_to_end("many", [
        stage("source", "small_source", params={"count": count}),
        stage("relay", "relay", replicas=replicas),
        stage("sink", "rate_sink", stream=True)], expect=count)
    return {**result, "first_item_s": result["first_wall"] - child.started,
            "exit_s": child.ended - result["last_wall"]}


def latency(count: int, pause: float, warmup: int) -> dict:
    result, _ = run_to_end("latency", [
        stage("source", "latency_source", params={"count": count, "pause": pause}),
        stage("relay", "relay"),
        stage("sink", "latency_sink", params={"warmup": warmup}, stream=True)], expect=count)
    return result


def startup(count: int, runs: int) -> dict:
    """Launch start -> first item at the sink; last item -> launcher exit (medians)."""
    firsts, exits = [], []
    for _ in range(runs):
        result, child = run_to_end("startup", [
            stage("source", "small_source", params={"count": count}),
            stage("relay1", "relay"), stage("relay2", "relay"),
            stage("sink", "rate_sink", stream=True)], expect=count)
        firsts.append(result["first_wall"] - child.started)
        exits.append(child.ended - result["last_wall"])
    return {"first_item_s": statistics.median(firsts), "exit_s": statistics.median(exits),
            "runs": {"first_item_s": firsts, "exit_s": exits}}


def replicas(count: int, replicas: int, spins: int = 0, seconds: float = 0.0) -> dict:
    """Items/s from the source's start to the last item at the sink: end to end,
    since items may reach the sink in bunches. Each item costs ``spins`` loops, or
    ``seconds`` of CPU (bench/stages.py, Busy). ``idle_tail_s``: from the first
    replica's last item to the last replica's, the time work was not shared."""
    result, child = run_to_end("replicas", [
        stage("source", "announced_source", params={"count": count}),
        stage("busy", "Busy", params={"spins": spins, "seconds": seconds}, replicas=replicas),
        stage("sink", "rate_sink", stream=True)], expect=count)
    events = child.results()
    start = next(r["t"] for r in events if r.get("event") == "start")
    ends = [r["t"] for r in events if r.get("event") == "replica_done" and r["t"] is not None]
    return {**result, "rate": count / (result["last_wall"] - start),
            "idle_tail_s": max(ends) - min(ends) if len(ends) > 1 else 0.0,
            "shares": [r["count"] for r in events if r.get("event") == "replica_done"]}


def calibrate_spins(seconds: float = 0.002) -> int:
    """Iterations of spin() (bench/work.py) that take ``seconds`` here (the fastest of
    several trials: the least disturbed by other processes)."""
    trial = 200_000
    took = min(_timed(trial) for _ in range(7))
    return max(1, int(trial * seconds / took))


def _timed(spins: int) -> float:
    start = time.perf_counter()
    work.spin(spins)
    return time.perf_counter() - start


def idle_rss(wait: float) -> dict:
    """VmRSS of every stage process while the source has not sent anything yet."""
    with launched("idle", [
            stage("source", "idle_source", params={"wait": wait, "count": 10}),
            stage("relay1", "relay"), stage("relay2", "relay"),
            stage("sink", "rate_sink", stream=True)]) as child:
        child.wait_line('"event": "idle"', timeout=60)
        time.sleep(min(0.5, wait / 3))
        rss = {name: rss_mb(pid) for name, pid in stage_pids(child.pid).items()}
        status = child.wait(TIMEOUT)
        if status != 0 or not rss:
            raise RuntimeError(f"idle run: status {status}, stages {rss}:\n{child.tail(30)}")
    return {"stages_mb": rss}


def backpressure_rss(count: int, nbytes: int, delay: float, hwm: int) -> dict:
    """The relay's VmRSS, sampled every 50 ms, between a fast source and a slow sink."""
    samples = []
    with launched("backpressure", [
            stage("source", "bytes_source", params={"count": count, "nbytes": nbytes}),
            stage("relay", "relay"),
            stage("sink", "slow_sink", params={"delay": delay}, stream=True)], hwm=hwm) as child:
        child.wait_line('"event": "flow"', timeout=60)
        pid = stage_pids(child.pid).get("relay")
        deadline = time.monotonic() + TIMEOUT
        while pid and child.popen.poll() is None and time.monotonic() < deadline:
            mb = rss_mb(pid)
            if mb is not None:
                samples.append(mb)
            time.sleep(0.05)
        status = child.wait(10)
        if status != 0 or not samples or child.result()["count"] != count:
            raise RuntimeError(f"backpressure run: status {status}, {len(samples)} samples:\n"
                               + child.tail(30))
    return {"start_mb": samples[0], "max_mb": max(samples), "end_mb": samples[-1],
            "samples_mb": samples}


# -- the soak: replicas killed while a long stream goes through -----------------

AGAIN_RE = re.compile(r"stage '([^']+)': (\d+) restart\(s\); (\d+) item\(s\) sent to it again")
SUMMARY_RE = re.compile(r"pipeline \S+ — ")  # the first line of the summary (summary.py)
RESTARTING_RE = re.compile(r"restarting replica (\S+) in ([0-9.]+) s: it (.*)")
# What a launcher says in a run whose replicas are killed and restarted, as it should.
EXPECTED_RE = re.compile(r"zpipe: (.*(replicas ready in|: ok after|finished: \d+ in)|"
                         r"restarting replica |replica \S+ is back \(life|stage '[^']+': \d+ "
                         r"restart\(s\)|status )")


def soak(count: int, replicas: int, kill_every: float, max_kills: int | None,
         min_seconds: float, timeout: float, sample_every: float = 0.25,
         seed: int = 6) -> dict:
    """source -> relay1 (``replicas``, restart) -> relay2 (restart) -> id_sink, the
    source spread over at least ``min_seconds``; every ``kill_every`` s a relay replica
    chosen at random is SIGKILLed (at most ``max_kills``), and the VmRSS of the
    launcher and of every replica is sampled every ``sample_every`` s. The choice is
    seeded (the same sequence of choices every run; seed 6 has the quick run's three
    kills hit both relays). Kills stop once the source has finished (the drain is
    left alone: every replica killed had work to do, and must be restarted) or the
    launcher says anything a run with restarts does not (a failure)."""
    rng = random.Random(seed)
    relays = ("relay1", "relay2")
    samples: list[dict] = []
    kills: list[dict] = []
    with launched("soak", [
            stage("source", "paced_source", params={"count": count, "seconds": min_seconds}),
            stage("relay1", "relay", replicas=replicas, **RESTART),
            stage("relay2", "relay", **RESTART),
            stage("sink", "id_sink", params={"count": count}, stream=True)], hwm=1000,
            options=("--status-interval", "0")) as child:
        child.wait_line('"event": "start"', timeout=60)
        start = time.monotonic()
        next_kill = start + kill_every
        killing, looked, timed_out = True, 0, False
        while child.popen.poll() is None:
            lines = child.lines[looked:]
            looked += len(lines)
            if any(line.startswith("zpipe: stage 'source' finished") or
                   (line.startswith("zpipe: ") and not EXPECTED_RE.search(line))
                   for line in lines):
                killing = False
            now = time.monotonic()
            if now - start > timeout:
                # Stopped as a user would (SIGTERM: zpipe's ordered stop, then its
                # grace), so that the sink still reports what had arrived; a
                # launcher that does not exit then is killed with its group
                # (child.wait raises TimeoutError).
                timed_out = True
                os.kill(child.pid, signal.SIGTERM)
                break
            pids = replica_pids(child.pid)
            rss = {name: mb for name, pid in pids.items() if (mb := rss_mb(pid)) is not None}
            samples.append({"t": now - start, "launcher_mb": rss_mb(child.pid), "replicas_mb": rss})
            if killing and now >= next_kill and (max_kills is None or len(kills) < max_kills):
                targets = sorted(name for name in pids if name.rsplit("-", 1)[0] in relays)
                if targets:  # else every one is being started again: try at the next look
                    name = rng.choice(targets)
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pids[name], signal.SIGKILL)
                        kills.append({"t": now - start, "replica": name, "pid": pids[name]})
                        next_kill = now + kill_every
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.popen.wait(sample_every)
        status = child.wait(60 if timed_out else 10)
        output = list(child.lines)
        try:
            result = child.result()
        except RuntimeError:  # the sink did not get to say (a failed run)
            result = {"count": None}
    again = {m[1]: {"restarts": int(m[2]), "redelivered": int(m[3])}
             for line in output if (m := AGAIN_RE.search(line))}
    restarting = [m.groups() for line in output if (m := RESTARTING_RE.search(line))]
    # Anything else the launcher said (zpipe's own lines, and replicas' lines that
    # are not the sink's figures): what a clean run with restarts does not print.
    # (The summary table at the end says nothing of that: it is left out.)
    ended = next((i for i, line in enumerate(output) if SUMMARY_RE.match(line)), len(output))
    notes = [line for line in output[:ended]
             if not EXPECTED_RE.search(line) and "BENCH " not in line]
    # Why a failed run failed: the launcher's first line after the replicas started
    # that is neither a restart nor a stage's own output.
    failure = next((line for line in notes if line.startswith("zpipe: ")), None) \
        if status != 0 else None
    if timed_out:
        failure = f"still running after {timeout:g} s (the bench stopped it: SIGTERM)"
    return {**result, "status": status, "failure": failure, "timed_out": timed_out,
            "output": output,
            "kills": kills, "samples": samples,
            "per_stage": again, "restarts": sum(v["restarts"] for v in again.values()),
            "redelivered": sum(v["redelivered"] for v in again.values()),
            "restarting_lines": len(restarting),
            "restart_delays": [float(d) for _, d, _ in restarting],
            "notes": notes, "seconds_total": (child.ended or time.time()) - child.started}


# -- issue 15: batches, latest frames, concurrency ------------------------------------

def _started(child: Child) -> float:
    """The time.time() the source reported as it started (announce / announced_source)."""
    return next(r["t"] for r in child.results() if r.get("event") == "start")


def costly_stage(cost: dict, batch: dict | None) -> dict:
    """The batching scenario's stage: costly_batch with ``batch = {...}``, or, without
    ``batch``, costly_item (the same cost model, one item per call)."""
    if batch is None:
        return stage("work", "costly_item", params=cost)
    return stage("work", "costly_batch", params=cost, batch=batch)


def batching_rate(count: int, cost: dict, batch: dict | None) -> dict:
    """A fast source -> the costly stage (one replica) -> rate_sink: items/s from the
    source's start to the last item at the sink (end to end: a batched stage's
    outputs reach the sink in bunches)."""
    result, child = run_to_end("batching", [
        stage("source", "stamped_source", params={"count": count, "announce": True}),
        costly_stage(cost, batch),
        stage("sink", "rate_sink", stream=True)], expect=count)
    return {**result, "rate": count / (result["last_wall"] - _started(child))}


def batching_latency(count: int, period: float, cost: dict, batch: dict | None) -> dict:
    """One item every ``period`` s, stamped with time.time() as it is sent -> the
    costly stage -> stamped_sink: per item, now - stamp at the sink, its call's
    duration and when its call started (after the stamp)."""
    result, _ = run_to_end("batching-latency", [
        stage("source", "stamped_source", params={"count": count, "period": period}),
        costly_stage(cost, batch),
        stage("sink", "stamped_sink", stream=True)], expect=count)
    return result


def latest(count: int, fps: float, seconds: float) -> dict:
    """frame_source at ``fps`` -> latest_look (input = "latest", ``seconds`` a call) ->
    look_sink, with ``--summary-json``: what the stage saw at each call (the frame's
    number, the newest number the source had produced, the frame's age) and the
    summary's counts (source sent, stage dropped and sent)."""
    with tempfile.TemporaryDirectory(prefix="bench-latest-") as flags:
        newest, summary = os.path.join(flags, "newest"), os.path.join(flags, "summary.json")
        result, _ = run_to_end("latest", [
            stage("source", "frame_source", params={"count": count, "fps": fps, "path": newest}),
            stage("look", "latest_look", params={"path": newest, "seconds": seconds},
                  input="latest"),
            stage("sink", "look_sink", stream=True)], options=("--summary-json", summary))
        with open(summary) as f:
            figures = {s["name"]: s for s in json.load(f)["stages"]}
    return {**result, "produced": figures["source"]["sent"],
            "received": figures["look"]["received"], "dropped": figures["look"]["dropped"],
            "processed": figures["look"]["sent"]}


def concurrency(count: int, seconds: float, calls: int, asynchronous: bool) -> dict:
    """A fast source -> a stage whose call waits ``seconds`` (wait_thread: time.sleep on
    ``calls`` threads; wait_async: asyncio.sleep on the replica's loop), one replica,
    ``concurrency = calls`` -> rate_sink: items/s from the source's start to the last
    item at the sink."""
    waits = stage("wait", "wait_async" if asynchronous else "wait_thread",
                  params={"seconds": seconds}, concurrency=calls)
    result, child = run_to_end("concurrency", [
        stage("source", "stamped_source", params={"count": count, "announce": True}),
        waits,
        stage("sink", "rate_sink", stream=True)], expect=count)
    return {**result, "rate": count / (result["last_wall"] - _started(child))}
