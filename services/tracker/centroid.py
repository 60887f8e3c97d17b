"""Nearest-centroid tracking across frames.

Owned by the tracking team. A stream function: zpipe hands it the whole stream of
detections, so it can keep tracks between frames. It must run as one replica,
since the tracks live in this process.
"""

from __future__ import annotations

import heapq
import itertools
import math
from typing import Iterable, Iterator


def track(detections: Iterable[dict], max_distance: float = 20.0, max_missed: int = 5,
          window: int = 128) -> Iterator[dict]:
    """Yield ``{"frame", "ts", "objects": [{"track", "box"}, ...]}`` for every frame.

    ``max_distance``: the farthest (pixels) an object's centre may move between
    the frames it is seen in. ``max_missed``: frames a track survives unseen.
    ``window``: frames held back, at most, to put the stream in order again; the
    detections are small, so a generous window costs little memory.
    """
    tracker = _Tracker(max_distance, max_missed)
    reorder = _Reorder(window)
    frames = 0
    for item in reorder.sorted(detections):
        frames += 1
        yield tracker.update(item)
    print(f"tracker: {frames} frames, {tracker.next_id - 1} tracks, "
          f"{reorder.late} frame(s) too late to reorder", flush=True)


class _Reorder:
    """Puts frames back in number order with a bounded buffer.

    Several detector replicas work side by side, so frame 41 may overtake frame 40.
    Holding back up to ``window`` frames undoes that; a frame later than the
    window is passed on at once rather than dropped, and counted.
    """

    def __init__(self, window: int):
        self.window = window
        self.late = 0

    def sorted(self, items: Iterable[dict]) -> Iterator[dict]:
        heap: list[tuple[int, int, dict]] = []
        arrival = itertools.count()  # tie-breaker: dicts do not compare
        next_frame = 0  # the camera numbers frames from 0
        for item in items:
            if item["frame"] < next_frame:
                self.late += 1
                yield item
                continue
            heapq.heappush(heap, (item["frame"], next(arrival), item))
            while heap and (heap[0][0] == next_frame or len(heap) > self.window):
                frame, _, ready = heapq.heappop(heap)
                next_frame = frame + 1
                yield ready
        while heap:  # end of stream: nothing else can arrive, flush in order
            yield heapq.heappop(heap)[2]


class _Tracker:
    def __init__(self, max_distance: float, max_missed: int):
        self.max_distance = max_distance
        self.max_missed = max_missed
        self.tracks: dict[int, tuple[float, float, int]] = {}  # id -> (cx, cy, last frame)
        self.next_id = 1

    def update(self, item: dict) -> dict:
        frame, boxes = item["frame"], item["boxes"]
        centres = [((x0 + x1) / 2, (y0 + y1) / 2) for x0, y0, x1, y1 in boxes]
        # Greedy matching, closest pairs first: good enough for a few well
        # separated objects, and far simpler than an optimal assignment.
        pairs = sorted((math.dist(centre, (cx, cy)), track_id, i)
                       for track_id, (cx, cy, _) in self.tracks.items()
                       for i, centre in enumerate(centres))
        assigned: dict[int, int] = {}  # detection index -> track id
        for distance, track_id, i in pairs:
            if distance > self.max_distance:
                break
            if i not in assigned and track_id not in assigned.values():
                assigned[i] = track_id
        objects = []
        for i, (box, (cx, cy)) in enumerate(zip(boxes, centres)):
            if i not in assigned:
                assigned[i] = self.next_id
                self.next_id += 1
            self.tracks[assigned[i]] = (cx, cy, frame)
            objects.append({"track": assigned[i], "box": box})
        # Forget objects unseen for a while, so a newcomer cannot inherit their id.
        self.tracks = {t: s for t, s in self.tracks.items() if frame - s[2] <= self.max_missed}
        return {"frame": frame, "ts": item["ts"], "objects": objects}
