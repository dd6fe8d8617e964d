"""Test-time augmentation: a prediction averaged over flipped and shifted copies.

Off by default (`predict.py --tta`): each image costs `len(views)` forward passes, and the
stored threshold was chosen on single-view val predictions. `benchmarks/threshold_rules.py`
measures what it changes on held-out images.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

SHIFT = 0.04  # of the image size: a few pixels, like the augmentation's small translations


def shift(images: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """Move a (N, H, W, C) batch by (dy, dx) pixels, repeating the edge (no wrap-around)."""
    h, w = images.shape[1:3]
    pad = max(abs(dy), abs(dx))
    padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="edge")
    return padded[:, pad - dy:pad - dy + h, pad - dx:pad - dx + w, :]


def views(images: np.ndarray) -> list[np.ndarray]:
    """The batch, its left-right mirror, and four small shifts."""
    step = max(1, round(SHIFT * images.shape[1]))
    return [images, images[:, :, ::-1, :], shift(images, step, 0), shift(images, -step, 0),
            shift(images, 0, step), shift(images, 0, -step)]


def tta_predict(predict: Callable[[np.ndarray], np.ndarray], images: np.ndarray) -> np.ndarray:
    """Mean model output over `views(images)` (probabilities average like an ensemble's)."""
    images = np.asarray(images, dtype=np.float32)
    stacked = np.concatenate(views(images))
    outputs = np.asarray(predict(stacked))
    return outputs.reshape(len(views(images[:1])), len(images), *outputs.shape[1:]).mean(axis=0)
