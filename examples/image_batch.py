"""pipeline-lib's image-batch example, declared with zpipe.Task and run with zpipe.run.

The tasks are pipeline-lib's, unchanged in shape: generator functions, the first
called as f(**params), the others as f(iterable, **params). Only the outside
world is replaced by local stand-ins, so nothing is downloaded: images are
synthesised from their names, and the "model" is a small numpy detector.

Run: python examples/image_batch.py [process|thread]
"""

from __future__ import annotations

import sys
import zlib
from collections import Counter
from typing import Callable, Dict, Iterable, List, Tuple

import numpy as np

import zpipe


def load_images(imgs: List[str]) -> Iterable[np.ndarray]:
    """Stand-in for downloading and decoding JPEGs: one 720x1280 RGB image per name."""
    for img in imgs:
        rng = np.random.default_rng(zlib.crc32(img.encode()))
        tint = rng.integers(0, 128, size=3, dtype=np.uint8)  # each picture has its colour
        yield rng.integers(0, 128, size=(720, 1280, 3), dtype=np.uint8) + tint


def load_model(model_source: str, model_name: str) -> Callable[[np.ndarray], np.ndarray]:
    """Stand-in for torch.hub.load: a fixed random linear detector over an 8x8 grid.

    Returns rows [x0, y0, x1, y1, confidence, class] like yolov5's ``xyxy``.
    """
    rng = np.random.default_rng(zlib.crc32(f"{model_source}/{model_name}".encode()))
    weights = rng.normal(scale=8.0, size=(3, 2)).astype(np.float32)

    def model(img: np.ndarray) -> np.ndarray:
        h, w, _ = img.shape
        cells = img.reshape(8, h // 8, 8, w // 8, 3).mean(axis=(1, 3)) / 255.0 - 0.5  # 8x8x3
        logits = cells.reshape(64, 3) @ weights                                  # 64x2
        scores = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
        rows = []
        for cell, (score, cls) in enumerate(zip(scores.max(axis=1), scores.argmax(axis=1))):
            y, x = divmod(cell, 8)
            rows.append([x * w / 8, y * h / 8, (x + 1) * w / 8, (y + 1) * h / 8, score, cls])
        return np.array(rows, dtype=np.float32)

    return model


def run_model(
    img_data: Iterable[np.ndarray], model_source: str, model_name: str
) -> Iterable[np.ndarray]:
    """Run a model on every input from the img_data generator"""
    model = load_model(model_source, model_name)
    for img in img_data:
        yield model(img)


def remap_results(
    model_results: Iterable[np.ndarray], classmap: Dict[int, str]
) -> Iterable[Tuple[str, float]]:
    """Chooses the highest-confidence box of each image and names its class."""
    for result in model_results:
        best_row = result[np.argmax(result[:, 4])]
        result_class = classmap[int(best_row[5]) % (1 + max(classmap))]
        yield (result_class, float(best_row[4]))


def aggregate_results(classes: Iterable[Tuple[str, float]]) -> None:
    results = list(classes)
    class_stats = Counter(name for name, conf in results)
    print(class_stats)


def main(mode: str = "process") -> None:
    imgs = [f"image-{i:02d}.jpg" for i in range(24)]
    zpipe.run(
        tasks=[
            zpipe.Task(load_images, params={"imgs": imgs}, hwm=2),
            zpipe.Task(run_model, params={"model_name": "tiny", "model_source": "local"},
                       hwm=4, replicas=2),
            zpipe.Task(remap_results, params={"classmap": {0: "cat", 1: "dog"}}),
            zpipe.Task(aggregate_results),
        ],
        mode=mode,
    )


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "process")
