"""Bright-blob detection: smooth, threshold, label connected regions, box them.

Owned by the vision team. Runs with several replicas, so it keeps no state
between frames: every frame is detected on its own and carries its number on.
"""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

import zpipe


class BlobDetector(zpipe.Stage):
    """Turns ``{"frame", "ts", "image"}`` into ``{"frame", "ts", "boxes"}``.

    A box is ``[x0, y0, x1, y1]`` in pixels, ``x1``/``y1`` exclusive, so the
    width is ``x1 - x0``. The image itself is not passed on: nothing downstream
    needs it and it is by far the largest part of the item.
    """

    def __init__(self, threshold: int = 128, min_area: int = 12, smooth: int = 3,
                 slow_ms: float = 0.0):
        self.threshold = threshold
        self.min_area = min_area
        self.smooth = smooth
        # Extra time per call, standing in for a heavy model (live.toml): a
        # detector slower than its camera.
        self.slow = slow_ms / 1000.0
        self.frames = 0

    def setup(self) -> None:
        # Built once per replica process rather than per frame: a normalised box
        # kernel that evens out single hot pixels before thresholding.
        self.kernel = np.full((self.smooth, self.smooth), 1.0 / self.smooth**2)

    def process(self, item: Any) -> Any:  # a frame dict, or with `batch` a list of them
        # With `batch` in pipeline.toml a call gets the frames waiting, as a
        # list, and smooths them in one numpy pass (a GPU model would take them
        # as one tensor); without it, one frame. See services/README.md.
        if self.slow:
            time.sleep(self.slow)
        if isinstance(item, list):
            return self._detect_many(item)
        self.frames += 1
        mask = self._smoothed(item["image"]) > self.threshold
        return {"frame": item["frame"], "ts": item["ts"], "boxes": self._boxes(mask)}

    def _detect_many(self, items: list[dict]) -> list[dict]:
        self.frames += len(items)
        self.calls = getattr(self, "calls", 0) + 1
        shapes = {item["image"].shape for item in items}
        if len(shapes) > 1:  # frames of several sizes: one by one
            masks = [self._smoothed(item["image"]) > self.threshold for item in items]
        else:
            masks = list(self._smoothed(np.stack([item["image"] for item in items]))
                         > self.threshold)
        return [{"frame": item["frame"], "ts": item["ts"], "boxes": self._boxes(mask)}
                for item, mask in zip(items, masks)]

    def teardown(self) -> None:
        # Goes to the launcher's terminal: shows how the frames were spread over replicas.
        calls = getattr(self, "calls", 0)
        batches = f" in {calls} batches" if calls else ""
        print(f"detector pid {os.getpid()}: {self.frames} frames{batches}", flush=True)

    def _smoothed(self, images: np.ndarray) -> np.ndarray:
        """One image (height, width) or a stack of them (n, height, width)."""
        pad = self.smooth // 2
        widths = [(0, 0)] * (images.ndim - 2) + [(pad, pad), (pad, pad)]
        padded = np.pad(images.astype(np.float32), widths, mode="edge")
        windows = sliding_window_view(padded, self.kernel.shape, axis=(-2, -1))
        return np.einsum("...ijkl,kl->...ij", windows, self.kernel)

    def _boxes(self, mask: np.ndarray) -> list[list[int]]:
        labels = _label(mask)
        boxes = []
        for region in np.unique(labels[labels > 0]):
            ys, xs = np.nonzero(labels == region)
            if ys.size >= self.min_area:
                # Plain ints: the box is JSON-ready for the storage team.
                boxes.append([int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1])
        boxes.sort()  # deterministic order, whatever the labelling produced
        return boxes


def _label(mask: np.ndarray) -> np.ndarray:
    """4-connected component labels (0 = background) by repeated min-propagation.

    Every foreground pixel starts with its own id and takes the smallest id of its
    neighbours until nothing changes; the loop runs about as many times as the
    widest blob is long, which is a handful for small objects and needs only numpy.
    """
    height, width = mask.shape
    background = height * width + 1
    labels = np.where(mask, np.arange(1, height * width + 1).reshape(height, width), background)
    while True:
        padded = np.pad(labels, 1, constant_values=background)
        smallest = np.minimum.reduce([labels, padded[:-2, 1:-1], padded[2:, 1:-1],
                                      padded[1:-1, :-2], padded[1:-1, 2:]])
        smallest = np.where(mask, smallest, background)
        if np.array_equal(smallest, labels):
            return np.where(mask, labels, 0)
        labels = smallest
