"""The example in services/ runs out of the box, as the README's first command runs it."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from conftest import ZPIPE, processes_mentioning

SERVICES = Path(__file__).resolve().parent.parent / "services"


def test_example_pipeline_runs_and_writes_every_frame_once(tmp_path):
    toml = SERVICES / "pipeline.toml"
    out = SERVICES / "out" / "detections.jsonl"
    out.unlink(missing_ok=True)
    result = subprocess.run([*ZPIPE, "launch", str(toml)], cwd=tmp_path, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    frames = [json.loads(line) for line in out.read_text().splitlines()]
    assert [f["frame"] for f in frames] == list(range(300))
    labels = {o["label"] for f in frames for o in f["objects"]}
    assert labels and labels <= {"person", "vehicle", "ball", "unknown"}
    assert "store-0" in result.stdout and "300 frames (0 duplicated, 0 missing)" in result.stdout
    assert not processes_mentioning(str(toml))
