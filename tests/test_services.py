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


def test_the_detector_takes_the_frames_waiting_as_one_batch(tmp_path):
    """pipeline.toml's `batch`: one numpy pass over several frames, the same detections."""
    import numpy as np

    from zpipe import load
    from zpipe.replica.shapes import import_target

    spec = load(SERVICES / "pipeline.toml")
    stage = spec.stage("detector")
    assert stage.batch is not None and stage.batch.max_items > 1
    camera = import_target(spec.stage("camera").run, SERVICES, "camera")
    frames = list(camera(count=6, seed=3))
    detector_class = import_target(stage.run, SERVICES, "detector")
    one, many = detector_class(**stage.params), detector_class(**stage.params)
    one.setup()
    many.setup()
    assert many.process(frames) == [one.process(frame) for frame in frames]
    assert all(isinstance(f["image"], np.ndarray) for f in frames)


def test_the_live_variant_works_on_the_newest_frames_and_counts_the_rest(tmp_path):
    toml = SERVICES / "live.toml"
    out = SERVICES / "out" / "live.jsonl"
    out.unlink(missing_ok=True)
    summary = tmp_path / "summary.json"
    result = subprocess.run([*ZPIPE, "launch", "-q", "--summary-json", str(summary), str(toml)],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    stages = {s["name"]: s for s in json.loads(summary.read_text())["stages"]}
    detector = stages["detector"]
    # Every frame either detected or dropped, and counted: nothing else.
    assert detector["received"] == stages["camera"]["sent"] == 120
    stored = [json.loads(line)["frame"] for line in out.read_text().splitlines()]
    assert len(stored) == detector["sent"] == 120 - detector["dropped"]
    assert stored == sorted(set(stored))  # newest first each time: never back in time
    assert not processes_mentioning(str(toml))
