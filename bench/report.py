"""Rows of the results table, their verdicts, the machine, and the two renderings
(plain text for the terminal, Markdown for BENCHMARKS.md)."""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

COLUMNS = ("Scenario", "zpipe", "Reference (same run)", "Ratio", "Target", "Result")


class Best(float):
    """The best of several runs, which it keeps (they go into --json)."""

    def __new__(cls, value: float, runs: list[float]) -> "Best":
        best = super().__new__(cls, value)
        best.runs = runs
        return best


@dataclass
class Row:
    scenario: str
    zpipe: str
    reference: str = "-"
    ratio: str = "-"
    target: str = "info"
    result: str = "info"
    data: dict = field(default_factory=dict)  # the numbers, for --json

    def cells(self) -> tuple[str, ...]:
        return (self.scenario, self.zpipe, self.reference, self.ratio, self.target, self.result)


def rate(v: float) -> str:
    return f"{v:,.0f} items/s"


def gbps(v: float) -> str:
    return f"{v:.2f} GB/s"


def micros(v: float) -> str:
    return f"{v:,.0f} µs"


def micros2(v: float) -> str:
    return f"{v:.2f} µs"


def seconds(v: float) -> str:
    return f"{v:.2f} s"


def megabytes(v: float) -> str:
    return f"{v:.1f} MB"


def _verdict(value: float, op: str | None, limit: float | None) -> str:
    if op is None:
        return "info"
    ok = value >= limit if op == ">=" else value <= limit
    return "PASS" if ok else "FAIL"


def versus(scenario: str, zpipe: float, reference: float, fmt, label: str,
           op: str | None = None, limit: float | None = None) -> Row:
    """zpipe against a reference measured in the same run; the target is on the ratio."""
    ratio = zpipe / reference
    data = {"zpipe": zpipe, "reference": reference, "ratio": ratio}
    for key, value in (("zpipe_runs", zpipe), ("reference_runs", reference)):
        if isinstance(value, Best):
            data[key] = value.runs
    verdict = _verdict(ratio, op, limit)
    return Row(scenario, fmt(zpipe), f"{fmt(reference)} {label}", ratio_text(ratio, verdict, limit),
               f"{op} {limit:g}x" if op else "info", verdict, data)


def ratio_text(ratio: float, verdict: str, limit: float | None) -> str:
    """"1.23x"; with a third decimal where two would show a failing ratio as its target."""
    text = f"{ratio:.2f}x"
    return f"{ratio:.3f}x" if verdict == "FAIL" and text == f"{limit:.2f}x" else text


def bounded(scenario: str, zpipe: float, fmt, op: str, limit: float) -> Row:
    """zpipe against an absolute target."""
    return Row(scenario, fmt(zpipe), target=f"{op} {fmt(limit)}",
               result=_verdict(zpipe, op, limit), data={"zpipe": zpipe, "limit": limit})


def failed(scenario: str, exc: BaseException) -> Row:
    first = (str(exc).strip().splitlines() or [""])[0][:60]
    return Row(scenario, f"{type(exc).__name__}: {first}", target="-", result="ERROR",
               data={"error": f"{type(exc).__name__}: {exc}"})


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def machine() -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import zmq

    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=root,
                                capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        commit = ""
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "zpipe": f"{_version('zpipe')} ({commit or 'no git'})",
        "pyzmq": zmq.__version__,
        "libzmq": zmq.zmq_version(),
        "msgpack": _version("msgpack"),
        "msgpack-numpy": _version("msgpack-numpy"),
        "numpy": _version("numpy"),
        "pipeline-lib": _version("pipeline-lib"),
        "ray": _version("ray"),
    }


def text_table(rows: list[Row]) -> str:
    grid = [COLUMNS] + [row.cells() for row in rows]
    widths = [max(len(line[i]) for line in grid) for i in range(len(COLUMNS))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in grid]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown(rows: list[Row], info: dict, command: str) -> str:
    versions = ", ".join(f"{k} {info[k]}" for k in ("python", "zpipe", "pyzmq", "libzmq",
                                                    "msgpack", "msgpack-numpy", "numpy",
                                                    "pipeline-lib", "ray"))
    lines = [f"Command: `{command}` (from the repository root)",
             "",
             f"- Date: {info['date']}",
             f"- Machine: {info['nproc']} cores ({info['cpu']}), Linux {info['kernel']}",
             f"- Versions: {versions}",
             "",
             "| " + " | ".join(COLUMNS) + " |",
             "|" + "---|" * len(COLUMNS)]
    for row in rows:
        cells = [c.replace("|", "\\|") for c in row.cells()]
        if row.result in ("PASS", "FAIL", "ERROR"):
            cells[-1] = f"**{cells[-1]}**"
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
