"""What `zpipe launch` shows and serves of a run, used as a user would (views.py,
status.py, metrics.py and health.py behind real commands and real sockets)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.request

import pytest
from conftest import ZPIPE, wait_until
from prometheus_client.parser import text_string_to_metric_families
from test_launcher import free_ports

STAGES = """
import os, time

def numbers(count):
    yield from range(count)

def paced(count):
    for i in range(count):
        time.sleep(0.001)
        yield i

def slow(x):
    time.sleep(0.002)
    return x

def fast(x):
    return x

def sink(x):
    pass

def gated(items):
    # A sink that holds the run open once it has every item, until the test says.
    n = 0
    for _ in items:
        n += 1
        with open("seen", "w") as f:
            f.write(str(n))
    deadline = time.monotonic() + 60
    while not os.path.exists("release") and time.monotonic() < deadline:
        time.sleep(0.01)
    yield from ()


import zpipe


class SlowSetup(zpipe.Stage):
    def setup(self):
        deadline = time.monotonic() + 60
        while not os.path.exists("set-up") and time.monotonic() < deadline:
            time.sleep(0.01)

    def process(self, x):
        return None
"""


def pipeline(project, name: str, *stages: str) -> None:
    blocks = "\n".join(f"[[stages]]\n{s}\n" for s in stages)
    project.pipeline(f'[pipeline]\nname = "{name}"\n\n{blocks}', STAGES)


def gated_pipeline(project, name: str, count: int, source: str = "numbers") -> None:
    pipeline(project, name,
             f'name = "source"\nrun = "stages:{source}"\nparams = {{ count = {count} }}',
             'name = "relay"\nrun = "stages:fast"\nreplicas = 2',
             'name = "sink"\nrun = "stages:gated"')


def test_a_known_slow_stage_is_named_the_bottleneck(project):
    pipeline(project, "slowpoke",
             'name = "source"\nrun = "stages:numbers"\nparams = { count = 600 }',
             'name = "slow"\nrun = "stages:slow"',
             'name = "sink"\nrun = "stages:sink"')
    result = project.launch("--summary-json", "summary.json")
    assert result.returncode == 0, result.stderr
    assert re.search(r"bottleneck: slow \(busy \d+ %.*\) — try replicas = 2", result.stderr), \
        result.stderr
    summary = json.loads(project.read("summary.json"))
    assert summary["bottleneck"]["stage"] == "slow"
    assert summary["counts"] == {"source": {"received": 0, "sent": 600},
                                 "slow": {"received": 600, "sent": 600},
                                 "sink": {"received": 600, "sent": 0}}
    slow = summary["stages"][1]
    assert slow["busy_pct"] > 70 and slow["item_seconds"]["count"] > 0
    # 2 ms a call: the median time per item says so (buckets are within 20 %)
    assert 0.0015 < slow["p50"] < 0.004
    # The summary table is printed at the end, one row per stage.
    for stage in ("source", "slow", "sink"):
        assert re.search(rf"^ {stage} +1 +[\d,]+ ", result.stderr, re.MULTILINE), result.stderr


def test_quiet_prints_the_summary_and_no_progress(project):
    pipeline(project, "hush",
             'name = "source"\nrun = "stages:numbers"\nparams = { count = 50 }',
             'name = "sink"\nrun = "stages:sink"')
    result = project.launch("-q")
    assert result.returncode == 0, result.stderr
    assert "replicas ready" not in result.stderr and "finished:" not in result.stderr
    assert "bottleneck" in result.stderr or "no bottleneck" in result.stderr


def test_json_logs_carry_zpipe_lines_and_the_stages_own(project):
    pipeline(project, "logs",
             'name = "source"\nrun = "stages:numbers"\nparams = { count = 5 }',
             'name = "sink"\nrun = "stages:shout"')
    project.write("stages.py", STAGES + "\ndef shout(x):\n    print('got', x, flush=True)\n")
    result = project.launch("--log-format", "json")
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in (result.stdout + result.stderr).splitlines()]
    said = [r for r in records if "message" in r]
    assert {"time", "level", "pipeline", "stage", "replica", "message"} <= set(said[0])
    assert any(r["replica"] == "sink-0" and r["message"] == "got 3" for r in said)
    assert any(r["replica"] is None and "ok after" in r["message"] for r in said)
    summary = records[-1]
    assert summary["message"] == "summary"
    assert summary["summary"]["counts"]["sink"] == {"received": 5, "sent": 0}


def test_status_and_metrics_of_a_running_pipeline_agree_with_its_counts(project):
    gated_pipeline(project, "watched", 3000)
    run = project.start("--metrics-port", "0", "--summary-json", "summary.json")
    try:
        run.wait_for_stderr("/metrics")
        url = re.search(r"metrics at (http://\S+/metrics)", run.stderr).group(1)
        wait_until(lambda: project.lines("seen") == ["3000"], what="every item at the sink")

        def scraped() -> dict:
            text = urllib.request.urlopen(url, timeout=5).read().decode()
            return {(s.name, s.labels.get("replica")): s.value
                    for family in text_string_to_metric_families(text) for s in family.samples}

        # Heartbeats bring the counts once a second: wait for the sink's to arrive.
        wait_until(lambda: scraped().get(("zpipe_items_received_total", "sink-0")) == 3000,
                   what="the sink's count in /metrics")
        samples = scraped()
        assert samples[("zpipe_items_sent_total", "source-0")] == 3000
        assert samples[("zpipe_items_received_total", "relay-0")] + \
            samples[("zpipe_items_received_total", "relay-1")] == 3000
        assert samples[("zpipe_replica_up", "sink-0")] == 1
        status = project.run("status", "watched", timeout=30)
        assert status.returncode == 0, status.stderr
        for stage in ("source", "relay", "sink"):
            assert re.search(rf"^ {stage} ", status.stdout, re.MULTILINE), status.stdout
        assert "3,000" in status.stdout
        (project.root / "release").touch()
        code, err = run.finish()
    finally:
        (project.root / "release").touch()
        run.kill()
    assert code == 0, err
    summary = json.loads(project.read("summary.json"))
    assert summary["counts"]["sink"]["received"] == 3000
    # The metrics server ended with the run.
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(url, timeout=5)


def test_top_follows_a_running_pipeline_until_it_ends(project):
    gated_pipeline(project, "followed", 500)
    run = project.start()
    try:
        wait_until(lambda: project.lines("seen") == ["500"], what="every item at the sink")
        top = subprocess.Popen([*ZPIPE, "top", "followed"], cwd=project.root,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        said = top.stderr.readline()  # once the supervisor has answered
        assert "following the supervisor at" in said, said
        (project.root / "release").touch()
        out, err = top.communicate(timeout=60)
        code, launched = run.finish()
    finally:
        (project.root / "release").touch()
        run.kill()
    assert top.returncode == 0, err
    assert code == 0, launched
    # Its last frame: the pipeline as it ended, every stage in it.
    for stage in ("source", "relay", "sink"):
        assert re.search(rf"^ *{stage} +\d/\d", out, re.MULTILINE), out
    assert "pipeline followed" in out


def test_status_of_a_pipeline_with_keys_needs_them(project):
    from zpipe.wire import security
    gated_pipeline(project, "secret", 300)
    security.create_keys(project.root / "keys")
    project.toml.write_text(project.toml.read_text().replace(
        "[pipeline]\n", '[pipeline]\nkeys = "keys"\n'))
    run = project.start()
    try:
        wait_until(lambda: project.lines("seen") == ["300"], what="every item at the sink")
        refused = project.run("status", "secret", timeout=30)
        allowed = project.run("status", "secret", "--keys", "keys", timeout=30)
        (project.root / "release").touch()
        code, err = run.finish()
    finally:
        (project.root / "release").touch()
        run.kill()
    assert code == 0, err
    assert refused.returncode == 1 and "answers only with --keys" in refused.stderr
    assert allowed.returncode == 0, allowed.stderr
    assert re.search(r"^ sink +1/1 ", allowed.stdout, re.MULTILINE), allowed.stdout


def test_status_of_a_pipeline_that_is_not_running_says_so(project):
    result = project.run("status", "no-such-pipeline")
    assert result.returncode == 1
    assert "no pipeline named 'no-such-pipeline' is running on this host" in result.stderr
    control = f"tcp://127.0.0.1:{free_ports(1)[0]}"
    result = project.run("status", "--control", control, timeout=30)
    assert result.returncode == 1 and f"no answer from the supervisor at {control}" in \
        result.stderr


def test_a_replica_is_ready_once_set_up(project):
    """`zpipe stage --health-port`: /readyz 503 while setup() runs, 200 after; /livez 200."""
    control, sink, health = free_ports(3)
    pipeline(project, "probed",
             'name = "source"\nrun = "stages:paced"\nparams = { count = 3000 }',
             f'name = "sink"\nrun = "stages:SlowSetup"\naddress = "tcp://127.0.0.1:{sink}"')
    toml = project.toml.read_text().replace(
        "[pipeline]\n", f'[pipeline]\ncontrol = "tcp://127.0.0.1:{control}"\n')
    project.toml.write_text(toml)
    started = [subprocess.Popen([*ZPIPE, "supervise", str(project.toml)], cwd=project.root,
                                stderr=subprocess.PIPE, text=True)]
    started.append(subprocess.Popen([*ZPIPE, "stage", "--replica", "0", "--health-port",
                                     str(health), "--", str(project.toml), "sink"],
                                    cwd=project.root, stderr=subprocess.PIPE, text=True))
    started.append(subprocess.Popen([*ZPIPE, "stage", "--", str(project.toml), "source"],
                                    cwd=project.root, stderr=subprocess.PIPE, text=True))

    def get(path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{health}{path}", timeout=5) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()
        except OSError:  # not listening yet, or any more
            return 0, ""

    try:
        wait_until(lambda: get("/livez")[0] == 200, what="the replica's /livez")
        assert get("/readyz")[0] == 503  # its setup() waits for the file
        (project.root / "set-up").touch()
        # The source takes 3 s: the replica is at work, and ready, all along.
        wait_until(lambda: get("/readyz")[0] == 200, what="/readyz 200 after set-up")
        codes = [p.wait(60) for p in started]
    finally:
        (project.root / "set-up").touch()
        for p in started:
            p.kill()
    assert codes == [0, 0, 0], [p.stderr.read() for p in started]


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")
def test_on_a_terminal_the_live_view_shows_counts_that_grow(project):
    gated_pipeline(project, "onscreen", 8000, "paced")
    session = f"zpipe-test-{time.monotonic_ns()}"
    command = " ".join([*ZPIPE, "launch", str(project.toml)])
    subprocess.run(["tmux", "new-session", "-d", "-s", session, "-x", "120", "-y", "30",
                    "-c", str(project.root), command], check=True)
    try:
        def screen() -> str:
            return subprocess.run(["tmux", "capture-pane", "-p", "-t", session],
                                  capture_output=True, text=True, check=False).stdout

        def sink_in() -> int | None:
            match = re.search(r"^ *sink +\d/1 +([\d,]+)", screen(), re.MULTILINE)
            return int(match.group(1).replace(",", "")) if match else None

        wait_until(lambda: sink_in() is not None, what="the live view's sink row")
        first = sink_in()
        wait_until(lambda: (sink_in() or 0) > first, what="the sink's count growing on screen")
        assert "pipeline onscreen" in screen()
        for stage in ("source", "relay"):
            assert re.search(rf"^ *{stage} +\d/\d", screen(), re.MULTILINE), screen()
    finally:
        (project.root / "release").touch()
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True, check=False)
        wait_until(lambda: not project.processes(), what="the pipeline ending")
