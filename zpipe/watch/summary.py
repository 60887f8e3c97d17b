"""The end-of-run summary: a per-stage table, and which stage limited throughput.

Pure functions over a snapshot (the dict observe.py defines): ``bottleneck``
names the limiting stage and what to try, ``table`` builds the rich table,
``render`` turns it into plain text for a stderr that is not a terminal, and
``to_json`` is what ``--summary-json FILE`` writes.  Stages are listed in
pipeline order, so the first is the source and a stage's neighbours in the
list are its upstream and downstream.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from typing import Any

from rich import box
from rich.cells import cell_len
from rich.console import Console
from rich.table import Table

from .observe import quantile

BUSY_ADVISE = 70.0    # busy % from which more replicas are worth suggesting
BUSY_TARGET = 60.0    # busy % each replica should come down to with the advice
BUSY_LIMITING = 50.0  # below this (and nothing blocked) no stage limits the run
BLOCKED_SIGNAL = 10.0  # blocked % of a neighbour that counts as evidence


# Light rules and two spaces between columns: twelve columns fit in 100.
TABLE_STYLE: dict[str, Any] = {"box": box.SIMPLE_HEAD, "collapse_padding": True,
                               "show_edge": False, "title_justify": "left",
                               "caption_justify": "left"}


def human_seconds(x: float | None) -> str:
    """``850 µs``, ``12.3 ms``, ``1.25 s``; ``—`` when unknown."""
    if x is None or not math.isfinite(x):
        return "—"
    for scale, unit in ((1e-6, "µs"), (1e-3, "ms"), (1.0, "s")):
        v = x / scale
        # Bump to the next unit once the number would read 1000 or more.
        if unit == "s" or round(v, _decimals(v)) < 1000:
            return f"{v:.{_decimals(v)}f} {unit}"
    raise AssertionError("unreachable")


def human_rate(x: float | None) -> str:
    """``350/s``, ``1.2k/s``, ``2.1M/s``; ``—`` when unknown."""
    if x is None or not math.isfinite(x):
        return "—"
    if x < 1e3 - 0.5:
        return f"{x:.0f}/s" if x >= 10 or x == 0 else f"{x:.1f}/s"
    if x < 1e6 - 50:
        return f"{x / 1e3:.1f}k/s"
    return f"{x / 1e6:.1f}M/s"


def human_duration(x: float | None) -> str:
    """Elapsed wall time as ``h:mm:ss``; ``—`` when unknown."""
    if x is None or not math.isfinite(x) or x < 0:
        return "—"
    s = round(x)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def _decimals(v: float) -> int:
    # Three significant digits reads well without pretending to more precision.
    return 0 if v >= 100 else 1 if v >= 10 else 2


def pcts(stage: dict[str, Any]) -> tuple[float, float, float]:
    """busy, blocked, idle % of a stage (from its pct fields, else its seconds)."""
    if "busy_pct" in stage:
        return (float(stage.get("busy_pct") or 0.0), float(stage.get("blocked_pct") or 0.0),
                float(stage.get("idle_pct") or 0.0))
    secs = [float(stage.get(k) or 0.0) for k in ("busy", "blocked", "idle")]
    total = sum(secs)
    return tuple(100.0 * s / total if total else 0.0 for s in secs)  # type: ignore[return-value]


def _measured(stage: dict[str, Any]) -> bool:
    return sum(float(stage.get(k) or 0.0) for k in ("busy", "blocked", "idle")) > 0


def bottleneck(snapshot: dict[str, Any]) -> dict[str, Any] | None:
    """The stage that limits throughput and what to try: ``{"stage", "text"}``;
    ``"stage": None`` when no stage is the limit; None when nothing was measured."""
    stages = snapshot.get("stages") or []
    measured = [(i, s) for i, s in enumerate(stages) if _measured(s)]
    if not measured:
        return None
    # The busiest stage is the limit: the others wait for it (upstream blocked
    # sending to it, downstream idle waiting for its output).
    i, stage = max(measured, key=lambda m: pcts(m[1])[0])
    busy = pcts(stage)[0]
    name = stage.get("name", "?")
    if busy < BUSY_LIMITING and all(pcts(s)[1] < BLOCKED_SIGNAL for _, s in measured):
        return {"stage": None, "text": f"no bottleneck: every stage idle most of the time "
                                       f"(busiest: {name}, busy {busy:.0f} %)"}
    if i == 0:
        return {"stage": name, "text": f"bottleneck: {name} (the source: busy {busy:.0f} %) "
                                       f"— the stages after it wait for it"}
    evidence = [f"busy {busy:.0f} %"]
    # One confirmation is enough to read; upstream blocked is the stronger one
    # (downstream idle can also mean an uneven source).
    up, down = stages[i - 1], stages[i + 1] if i + 1 < len(stages) else None
    if _measured(up) and pcts(up)[1] >= BLOCKED_SIGNAL:
        evidence.append(f"upstream blocked {pcts(up)[1]:.0f} % of the time")
    elif down is not None and _measured(down) and pcts(down)[2] >= BUSY_LIMITING:
        evidence.append(f"downstream idle {pcts(down)[2]:.0f} % of the time")
    text = f"bottleneck: {name} ({'; '.join(evidence)})"
    if busy >= BUSY_ADVISE:
        replicas = max(1, int(stage.get("replicas") or 1))
        # Enough replicas to bring each down to BUSY_TARGET, and always one more.
        n = max(math.ceil(replicas * busy / BUSY_TARGET), replicas + 1)
        text += f" — try replicas = {n}"
    return {"stage": name, "text": text}


def _p(stage: dict[str, Any], key: str, q: float) -> float | None:
    value = stage.get(key)
    return value if value is not None else quantile(stage.get("item_seconds"), q)


def _rate(snapshot: dict[str, Any], i: int, stage: dict[str, Any]) -> float | None:
    elapsed = float(snapshot.get("elapsed") or 0.0)
    if elapsed <= 0:
        return None
    return int(stage.get("sent" if i == 0 else "received") or 0) / elapsed


def footer_lines(snapshot: dict[str, Any]) -> list[str]:
    """The bottleneck line and, where a sink measured it, the end-to-end latency."""
    lines = []
    found = snapshot.get("bottleneck") or bottleneck(snapshot)
    if found:
        lines.append(found["text"])
    for stage in snapshot.get("stages") or []:
        e2e = stage.get("end_to_end")
        if e2e and e2e.get("count"):
            lines.append(f"end-to-end p50 {human_seconds(quantile(e2e, 0.5))}, "
                         f"p99 {human_seconds(quantile(e2e, 0.99))}"
                         + (f" (at {stage.get('name')})" if len(snapshot["stages"]) > 1 else ""))
    return lines


def build_table(title: str, columns: list[tuple[str, list[str]]], width: int | None,
                drop: Sequence[str], caption: str | None = None) -> Table:
    """A stage table of (header, cells) columns, the first left-aligned; with a
    ``width``, the columns in ``drop`` go first to last until the rest fit
    (rich would otherwise squeeze every cell, the stage names first, to "…")."""
    def natural() -> int:  # two spaces between columns and at the edges (TABLE_STYLE)
        return sum(max(cell_len(c) for c in [h, *cells]) + 2 for h, cells in columns)
    columns = list(columns)
    for header in drop:
        if width is None or natural() <= width:
            break
        columns = [c for c in columns if c[0] != header]
    t = Table(title=title, caption=caption, **TABLE_STYLE)
    for i, (header, _) in enumerate(columns):
        t.add_column(header, justify="left" if i == 0 else "right", no_wrap=i > 0)
    for row in zip(*(cells for _, cells in columns)):
        t.add_row(*row)
    return t


def title(snapshot: dict[str, Any]) -> str:
    return (f"pipeline {snapshot.get('pipeline', '?')} — {snapshot.get('state', '?')}, "
            f"elapsed {human_duration(snapshot.get('elapsed'))}")


def table(snapshot: dict[str, Any], width: int | None = None) -> Table:
    """The per-stage summary table, the bottleneck line as its caption; with a
    ``width``, the least needed columns are left out until it fits."""
    stages = snapshot.get("stages") or []
    p = [pcts(s) for s in stages]
    columns = [
        ("stage", [str(s.get("name", "?")) for s in stages]),
        # At the end every replica has exited: how many there were (the live view says up/total).
        ("replicas", [str(s.get('replicas', 0)) for s in stages]),
        ("in", [f"{int(s.get('received') or 0):,}" for s in stages]),
        ("out", [f"{int(s.get('sent') or 0):,}" for s in stages]),
        ("rate", [human_rate(_rate(snapshot, i, s)) for i, s in enumerate(stages)]),
        ("busy", [f"{x[0]:.0f} %" for x in p]),
        ("blocked", [f"{x[1]:.0f} %" for x in p]),
        ("idle", [f"{x[2]:.0f} %" for x in p]),
        ("p50", [human_seconds(_p(s, "p50", 0.5)) for s in stages]),
        ("p99", [human_seconds(_p(s, "p99", 0.99)) for s in stages]),
        ("errors", [f"{int(s.get('errors') or 0):,}" for s in stages]),
        ("restarts", [f"{int(s.get('restarts') or 0):,}" for s in stages])]
    columns += optional_columns(stages)
    # idle is 100 - busy - blocked, rate is in / elapsed: the first to go.
    return build_table(title(snapshot), columns, width,
                       ("idle", "rate", "replicas", "p99", "restarts", "blocked"),
                       caption="\n".join(footer_lines(snapshot)) or None)


def optional_columns(stages: list[dict[str, Any]]) -> list[tuple[str, list[str]]]:
    """Columns only a pipeline that uses them shows: ``dropped`` (input = "latest")
    and ``batch``, the mean size of a stage's batched calls (batch, set_get_all)."""
    columns = []
    if any(int(s.get("dropped") or 0) for s in stages):
        columns.append(("dropped", [f"{int(s.get('dropped') or 0):,}" for s in stages]))
    if any(s.get("batches") for s in stages):
        columns.append(("batch", [f"{batch_mean(s):.1f}" if batch_mean(s) is not None else "—"
                                  for s in stages]))
    return columns


def batch_mean(stage: dict[str, Any]) -> float | None:
    """The mean number of items per batched call of a stage; None without any."""
    batches = int(stage.get("batches") or 0)
    return int(stage.get("batch_items") or 0) / batches if batches else None


def render(snapshot: dict[str, Any], width: int = 100) -> str:
    """The summary as plain text (no ANSI codes), for a stderr that is not a terminal."""
    out = io.StringIO()
    console = Console(file=out, width=width, force_terminal=False, color_system=None)
    t = table(snapshot, width)
    t.caption = None  # printed below unwrapped: a log line should stay one line
    console.print(t)
    for line in footer_lines(snapshot):
        console.print(line, markup=False, highlight=False, soft_wrap=True)
    # rich pads every line to the width; trailing blanks are noise in a log.
    return "\n".join(line.rstrip() for line in out.getvalue().splitlines()) + "\n"


def _plain(value: Any) -> Any:
    # JSON has no tuples, sets, non-string keys or NaN; say them in what it has.
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_plain(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if hasattr(value, "item"):  # numpy scalars
        return _plain(value.item())
    return str(value)


def to_json(snapshot: dict[str, Any]) -> dict[str, Any]:
    """What ``--summary-json FILE`` writes: the snapshot, its bottleneck and counts."""
    result = _plain(snapshot)
    result["bottleneck"] = _plain(snapshot.get("bottleneck") or bottleneck(snapshot))
    result["counts"] = {str(s.get("name")): {"received": int(s.get("received") or 0),
                                             "sent": int(s.get("sent") or 0)}
                        for s in snapshot.get("stages") or []}
    return result
