"""A tiny linear "model" labelling objects by the shape of their box.

Owned by the ML team. The weights are fixed here instead of loaded from a file so
that the example needs no downloads; swapping in a trained matrix of the same
shape is the only change a real model would need.
"""

from __future__ import annotations

import math

import numpy as np

LABELS = ("person", "vehicle", "ball")

# Features per box: [log aspect (w/h), |log aspect|, log area, 1 (bias)].
# One row of weights per label: tall boxes score as people, wide ones as
# vehicles, small roundish ones as balls.
WEIGHTS = np.array([
    [-3.0, 0.0, 0.0, 0.0],                  # person
    [3.0, 0.0, 0.0, 0.0],                   # vehicle
    [0.0, -3.0, -2.0, 2.0 * math.log(100)],  # ball
])


def features(boxes: list[list[int]]) -> np.ndarray:
    """One row of features per box ``[x0, y0, x1, y1]``."""
    sizes = np.array([[x1 - x0, y1 - y0] for x0, y0, x1, y1 in boxes], dtype=float).reshape(-1, 2)
    aspect = np.log(sizes[:, 0] / sizes[:, 1])
    area = np.log(sizes[:, 0] * sizes[:, 1])
    return np.column_stack([aspect, np.abs(aspect), area, np.ones(len(sizes))])


def classify(item: dict, min_score: float = 0.5) -> dict:
    """Add ``label`` and ``score`` to every object of a tracked frame.

    An object whose best score is under ``min_score`` is labelled "unknown"
    rather than guessed, so that storage can tell doubtful labels apart.
    """
    objects = item["objects"]
    if objects:
        logits = features([o["box"] for o in objects]) @ WEIGHTS.T
        # Softmax, shifted by the row maximum so that exp() cannot overflow.
        probs = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs /= probs.sum(axis=1, keepdims=True)
        for obj, row in zip(objects, probs):
            best = int(row.argmax())
            obj["score"] = round(float(row[best]), 3)
            obj["label"] = LABELS[best] if row[best] >= min_score else "unknown"
    return item
