"""Unit tests of zpipe.watch.summary: the end-of-run table, its plain text, its JSON, the bottleneck."""

from __future__ import annotations

import json
from typing import Any

import pytest
from rich.table import Table

from zpipe.watch import summary
from zpipe.watch.observe import Histogram


def hist(*observations: tuple[float, int]) -> dict[str, Any]:
    h = Histogram()
    for seconds, times in observations:
        h.add(seconds, times)
    return h.as_dict()


def stage(name: str, replicas: int, received: int, sent: int, busy: float, blocked: float,
          idle: float, **extra: Any) -> dict[str, Any]:
    """A stage as the snapshot has it; busy/blocked/idle in seconds summed over replicas."""
    total = busy + blocked + idle
    s = {"name": name, "replicas": replicas, "up": replicas, "state": "running",
         "received": received, "sent": sent, "rate_in": received / 60.0,
         "rate_out": sent / 60.0, "queue": 0, "busy": busy, "blocked": blocked, "idle": idle,
         "busy_pct": 100 * busy / total if total else 0.0,
         "blocked_pct": 100 * blocked / total if total else 0.0,
         "idle_pct": 100 * idle / total if total else 0.0,
         "errors": 0, "errors_by_type": {}, "restarts": 0, "redelivered": 0, "dropped": 0,
         "rss": 50_000_000, "cpu": busy, "item_seconds": hist((0.0008, max(received, sent))),
         "p50": None, "p99": None, "end_to_end": None, "replica_figures": []}
    s.update(extra)
    return s


def slow_detector() -> dict[str, Any]:
    """camera -> detector (the slow one: busy 96 %) -> tracker -> writer, 60 s in."""
    return {"pipeline": "cameras", "state": "ok", "elapsed": 60.0, "time": 1.7e9,
            "total": None, "bottleneck": None, "stages": [
                stage("camera", 1, 0, 12000, busy=10.0, blocked=42.6, idle=7.4),
                stage("detector", 1, 12000, 11990, busy=57.6, blocked=0.0, idle=2.4, queue=8,
                      errors=3, errors_by_type={"ValueError": 3},
                      item_seconds=hist((0.009, 11000), (0.04, 1000))),
                stage("tracker", 1, 11990, 11990, busy=12.0, blocked=0.0, idle=48.0,
                      p50=0.00085, p99=0.0123, restarts=1),
                stage("writer", 1, 11990, 0, busy=6.0, blocked=0.0, idle=54.0,
                      end_to_end=hist((0.02, 11000), (0.2, 990)))]}


def test_bottleneck_names_the_busiest_stage_confirmed_by_its_blocked_upstream() -> None:
    found = summary.bottleneck(slow_detector())
    assert found == {"stage": "detector", "text": "bottleneck: detector (busy 96 %; upstream "
                     "blocked 71 % of the time) — try replicas = 2"}


@pytest.mark.parametrize("replicas, busy, advice", [
    (1, 96.0, "try replicas = 2"),   # ceil(1.6)
    (2, 96.0, "try replicas = 4"),   # ceil(3.2)
    (4, 75.0, "try replicas = 5"),   # ceil(5.0)
    (3, 70.0, "try replicas = 4"),   # ceil(3.5): at least one more
    (1, 65.0, None),                 # not busy enough to advise
])
def test_replicas_advice(replicas: int, busy: float, advice: str | None) -> None:
    snap = slow_detector()
    det = snap["stages"][1]
    det.update(replicas=replicas, up=replicas, busy_pct=busy, idle_pct=100 - busy)
    text = summary.bottleneck(snap)["text"]
    assert text.startswith("bottleneck: detector (busy")
    if advice:
        assert text.endswith(" — " + advice)
    else:
        assert "try replicas" not in text


def test_downstream_idle_confirms_when_upstream_is_not_blocked() -> None:
    snap = slow_detector()
    snap["stages"][0].update(blocked_pct=0.0, idle_pct=83.0)
    assert summary.bottleneck(snap)["text"] == ("bottleneck: detector (busy 96 %; downstream "
                                                "idle 80 % of the time) — try replicas = 2")


def test_no_bottleneck_when_every_stage_idles() -> None:
    snap = slow_detector()
    snap["stages"] = [stage("camera", 1, 0, 100, 1, 0, 59), stage("resize", 2, 100, 100, 24, 0, 96),
                      stage("writer", 1, 100, 0, 3, 0, 57)]
    assert summary.bottleneck(snap) == {"stage": None, "text": "no bottleneck: every stage idle "
                                        "most of the time (busiest: resize, busy 20 %)"}


def test_the_source_as_bottleneck() -> None:
    snap = slow_detector()
    snap["stages"] = [stage("camera", 1, 0, 100, 54, 0, 6), stage("resize", 1, 100, 100, 12, 0, 48),
                      stage("writer", 1, 100, 0, 3, 0, 57)]
    assert summary.bottleneck(snap) == {"stage": "camera", "text": "bottleneck: camera (the "
                                        "source: busy 90 %) — the stages after it wait for it"}


def test_stages_without_time_are_ignored() -> None:
    snap = slow_detector()
    # A stage that never reported time (busy_pct even claims 100) must not be named.
    snap["stages"].append(stage("late", 1, 0, 0, 0, 0, 0, busy_pct=100.0))
    assert summary.bottleneck(snap)["stage"] == "detector"
    snap["stages"] = [stage("a", 1, 0, 0, 0, 0, 0), stage("b", 1, 0, 0, 0, 0, 0)]
    assert summary.bottleneck(snap) is None


@pytest.mark.parametrize("seconds, text", [
    (None, "—"), (0.00085, "850 µs"), (0.0000042, "4.20 µs"), (0.0123, "12.3 ms"),
    (1.25, "1.25 s"), (0.9999, "1.00 s"), (250.0, "250 s"), (0.0, "0.00 µs")])
def test_human_seconds(seconds: float | None, text: str) -> None:
    assert summary.human_seconds(seconds) == text


@pytest.mark.parametrize("rate, text", [
    (None, "—"), (0, "0/s"), (2.5, "2.5/s"), (350, "350/s"), (1200, "1.2k/s"),
    (2_100_000, "2.1M/s"), (999.9, "1.0k/s")])
def test_human_rate(rate: float | None, text: str) -> None:
    assert summary.human_rate(rate) == text


def test_table_is_a_rich_table_with_the_bottleneck_as_caption() -> None:
    t = summary.table(slow_detector())
    assert isinstance(t, Table)
    assert len(t.rows) == 4
    assert "bottleneck: detector" in str(t.caption)
    assert "end-to-end p50" in str(t.caption)


def test_render_is_plain_text_with_every_figure() -> None:
    text = summary.render(slow_detector())
    assert "\x1b" not in text
    for name in ("camera", "detector", "tracker", "writer"):
        assert name in text
    for count in ("12,000", "11,990"):
        assert count in text
    # detector: from item_seconds via quantile; tracker: its own p50/p99 fields.
    assert "8.64 ms" in text and "47.6 ms" in text
    assert "850 µs" in text and "12.3 ms" in text
    assert "200/s" in text  # camera's sent / elapsed (a source receives nothing)
    assert "bottleneck: detector (busy 96 %; upstream blocked 71 % of the time) — try " \
           "replicas = 2\n" in text
    assert "end-to-end p50 17.7 ms, p99 194 ms" in text
    assert all(len(line) <= 100 for line in text.splitlines()[:-2])


def test_render_of_a_run_that_never_started() -> None:
    text = summary.render({"pipeline": "p", "state": "failed", "elapsed": 0.0, "stages": []})
    assert "pipeline p — failed" in text and "\x1b" not in text


def test_to_json_is_serialisable_with_bottleneck_and_counts() -> None:
    snap = slow_detector()
    snap["stages"][1]["replica_figures"] = [{"name": "detector", "replica": 0, "up": True,
                                             "host": ("10.0.0.1", 5555), "busy": float("nan")}]
    result = summary.to_json(snap)
    decoded = json.loads(json.dumps(result, allow_nan=False))
    assert decoded["bottleneck"]["stage"] == "detector"
    assert decoded["counts"] == {"camera": {"received": 0, "sent": 12000},
                                 "detector": {"received": 12000, "sent": 11990},
                                 "tracker": {"received": 11990, "sent": 11990},
                                 "writer": {"received": 11990, "sent": 0}}
    assert decoded["stages"][1]["replica_figures"][0]["host"] == ["10.0.0.1", 5555]
    assert decoded["stages"][1]["item_seconds"]["count"] == 12000
    assert snap["bottleneck"] is None  # the snapshot itself is left as it was


@pytest.mark.parametrize("width", [60, 80, 120])
def test_render_leaves_columns_out_rather_than_squeeze_names(width: int) -> None:
    text = summary.render(slow_detector(), width=width)
    table_lines = text.splitlines()[:-2]
    assert all(len(line) <= width for line in table_lines)
    for name in ("camera", "detector", "tracker", "writer"):
        assert f" {name} " in text
    assert "…" not in text
    header = table_lines[1].split()
    assert header[:2] == ["stage", "replicas" if width >= 100 else "in"]
    assert ("idle" in header) == (width >= 100)


def test_the_batch_and_dropped_columns_appear_only_where_a_stage_has_them() -> None:
    snapshot = slow_detector()
    plain = summary.render(snapshot)
    assert " batch" not in plain and "dropped" not in plain
    snapshot["stages"][1].update(batches=4000, batch_items=12000, batch_size_mean=3.0)
    snapshot["stages"][2].update(dropped=25)
    text = summary.render(snapshot, width=200)
    header = next(line for line in text.splitlines() if line.lstrip().startswith("stage"))
    assert header.split()[-2:] == ["dropped", "batch"]
    detector = next(line for line in text.splitlines() if line.lstrip().startswith("detector"))
    tracker = next(line for line in text.splitlines() if line.lstrip().startswith("tracker"))
    assert detector.split()[-2:] == ["0", "3.0"] and tracker.split()[-2:] == ["25", "—"]
    assert summary.batch_mean(snapshot["stages"][1]) == 3.0
    assert summary.batch_mean(snapshot["stages"][0]) is None
