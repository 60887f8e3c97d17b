"""A synthetic grayscale camera: dark noisy background, a few bright moving blobs.

Owned by the capture team. It stands in for a real camera so that the pipeline
runs anywhere with no downloads; downstream teams only rely on the item shape
``{"frame": int, "ts": float, "image": uint8[height, width]}``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterator

import numpy as np

# Blob kinds as (half-width, half-height). They are picked so that the ML team's
# classifier has something to tell apart: tall, wide and small-round objects.
KINDS: dict[str, tuple[float, float]] = {
    "person": (4.0, 10.0),
    "vehicle": (12.0, 5.0),
    "ball": (3.5, 3.5),
}


@dataclass
class Blob:
    kind: str
    x: float
    lane_y: float
    vx: float
    phase: float


def _make_blobs(count: int, width: int, height: int, rng: np.random.Generator) -> list[Blob]:
    # Each blob drives along its own horizontal lane, so blobs never merge into one
    # bright region: the scene stays easy to check by eye in the output file.
    kinds = list(KINDS)
    lane = height / count
    blobs = []
    for k in range(count):
        kind = kinds[k % len(kinds)]
        speed = rng.uniform(1.0, 3.0) * rng.choice([-1.0, 1.0])
        x = rng.uniform(KINDS[kind][0] + 1, width - KINDS[kind][0] - 1)
        blobs.append(Blob(kind, x, (k + 0.5) * lane, speed, rng.uniform(0, 2 * np.pi)))
    return blobs


def frames(count: int = 300, width: int = 160, height: int = 120, blobs: int = 4,
           fps: float = 30.0, seed: int = 0, realtime: bool = False) -> Iterator[dict]:
    """Yield ``count`` frames; the same ``seed`` always gives the same video.

    ``realtime``: at ``fps``, as a real camera would (live.toml); otherwise as
    fast as the pipeline takes them."""
    if blobs < 1 or height / blobs < 2 * max(h for _, h in KINDS.values()) + 8:
        raise ValueError(f"{blobs} blob lanes do not fit in a frame {height} pixels high")
    rng = np.random.default_rng(seed)
    scene = _make_blobs(blobs, width, height, rng)
    ys, xs = np.mgrid[0:height, 0:width]
    started = time.monotonic()
    for i in range(count):
        if realtime:
            time.sleep(max(0.0, started + i / fps - time.monotonic()))
        # Sensor noise around a dark level, well under any sensible detection threshold.
        image = rng.normal(30.0, 8.0, size=(height, width))
        for blob in scene:
            half_w, half_h = KINDS[blob.kind]
            cy = blob.lane_y + 3.0 * np.sin(blob.phase + i / 15.0)  # a gentle bob
            inside = ((xs - blob.x) / half_w) ** 2 + ((ys - cy) / half_h) ** 2 <= 1.0
            image[inside] = rng.uniform(200, 250)
            # Bounce off the frame edges so every object stays fully visible.
            blob.x += blob.vx
            if not half_w <= blob.x <= width - 1 - half_w:
                blob.vx = -blob.vx
                blob.x = float(np.clip(blob.x, half_w, width - 1 - half_w))
        # ts is the capture time on the video's own clock, which keeps runs reproducible.
        yield {"frame": i, "ts": i / fps, "image": np.clip(image, 0, 255).astype(np.uint8)}
