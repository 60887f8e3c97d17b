"""Writes one JSON line per frame and prints a summary when the stream ends.

Owned by the storage team. The last stage of the pipeline: a stream function
(its first parameter is an Iterable), so it sees every frame and opens the file
once rather than once per item.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Iterable

# The folder holding pipeline.toml (this file is services/store/jsonl.py). Relative
# output paths are resolved against it, not the current directory, so the result
# lands in the same place whichever folder `zpipe launch` is started from.
PIPELINE_DIR = Path(__file__).resolve().parent.parent


def write(frames: Iterable[dict], path: str = "out/detections.jsonl") -> None:
    """Write every frame to ``path`` (JSON lines), then print frames, tracks and labels."""
    target = Path(path) if Path(path).is_absolute() else PIPELINE_DIR / path
    target.parent.mkdir(parents=True, exist_ok=True)
    seen: Counter[int] = Counter()
    votes: dict[int, Counter[str]] = {}  # track id -> its labels over the frames
    with target.open("w", encoding="utf-8") as out:
        for frame in frames:
            out.write(json.dumps(frame, separators=(",", ":")) + "\n")
            seen[frame["frame"]] += 1
            for obj in frame["objects"]:
                votes.setdefault(obj["track"], Counter())[obj.get("label", "unknown")] += 1
    # A track's label is its most frequent one: single frames can be ambiguous.
    labels = Counter(v.most_common(1)[0][0] for v in votes.values())
    duplicates = sum(n - 1 for n in seen.values())
    missing = (max(seen) + 1 - len(seen)) if seen else 0
    print(f"store: {sum(seen.values())} frames ({duplicates} duplicated, {missing} missing) "
          f"-> {target}", flush=True)
    print(f"store: {len(votes)} tracks: "
          + (", ".join(f"{n} {label}" for label, n in sorted(labels.items())) or "none"),
          flush=True)
