"""The champion as MLflow serves it: raw pixels in; class probabilities by name, the label at
the stored threshold and the threshold out.

MLflow's Keras flavour serves the bare network: it expects pixels already scaled to 0–1 and
answers one float per image, so raw 0–255 pixels (what a decoder or a PACS export gives)
came back as P=1.0 for every image with HTTP 200, and a client cutting at 0.5 disagreed with
the platform's stored threshold. This module is the model's `python_function` flavour
instead (copied into each logged model as `code/serving.py`, so `mlflow models serve`,
`mlflow.pyfunc.load_model` and `mlflow models predict` use it); the Keras flavour and its
files stay as they were.

Self-contained on purpose (numpy, pandas, keras, yaml): it must import where only the model
folder is, without this repository.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

SERVING_FILE = Path(__file__).resolve()
LOADER_MODULE = "serving"  # the name under which MLflow imports the copied file


def output_columns(class_names: list[str]) -> list[str]:
    """`p_<class>` per class in output order, then `label` and `threshold`."""
    return [f"p_{name}" for name in class_names] + ["label", "threshold"]


def serving_signature(image_size: int, channels: int, class_names: list[str]) -> Any:
    """Input: raw 0–255 pixels as float32 (N, size, size, channels); output: named columns;
    param `scaled` (false) for callers who send pixels already scaled to 0–1."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema, TensorSpec

    inputs = Schema([TensorSpec(np.dtype("float32"), (-1, image_size, image_size, channels))])
    outputs = Schema([ColSpec("double", f"p_{n}") for n in class_names]
                     + [ColSpec("string", "label"), ColSpec("double", "threshold")])
    return ModelSignature(inputs=inputs, outputs=outputs,
                          params=ParamSchema([ParamSpec("scaled", "boolean", False)]))


def to_model_input(images: np.ndarray, image_size: int, channels: int,
                   scaled: bool = False) -> np.ndarray:
    """Raw pixels (uint8 or float 0–255; `scaled`: float 0–1) -> the network's float32 input.

    Raises:
        ValueError: wrong size, channels or range, naming what was expected. Pixels that
            look scaled already (float, max <= 1) are refused unless `scaled`, since dividing
            them by 255 again would give a black image and a confident wrong answer.
    """
    x = np.asarray(images)
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or x.shape[1:3] != (image_size, image_size):
        raise ValueError(f"expected images of shape (N, {image_size}, {image_size}, "
                         f"{channels}) (the training size), got {tuple(np.shape(images))}; "
                         "resize first, or use search/predict.py, which resizes files")
    if x.shape[3] not in (1, 3):
        raise ValueError(f"expected 1 (grayscale) or 3 (RGB) channels, got {x.shape[3]}")
    x = x.astype(np.float32)
    if x.size:
        low, high = float(x.min()), float(x.max())
        top = 1.0 if scaled else 255.0
        if low < 0.0 or high > top:
            raise ValueError(f"pixel values must lie in [0, {top:g}]"
                             f"{' (params scaled=true)' if scaled else ''}; got [{low:g}, "
                             f"{high:g}]")
        if not scaled and 0.0 < high <= 1.0 and not np.issubdtype(np.asarray(images).dtype,
                                                                    np.integer):
            raise ValueError("these pixels look scaled to 0–1 already (max "
                             f"{high:g}); send raw 0–255 pixels, or pass params "
                             "{'scaled': true}")
    if not scaled:
        x = x / 255.0
    if x.shape[3] != channels:  # the same adapters as the training pipeline's
        x = x.mean(axis=3, keepdims=True) if channels == 1 else np.repeat(x, 3, axis=3)
    return x


class ServingModel:
    """What `mlflow.pyfunc.load_model` returns for a logged model (via `_load_pyfunc`)."""

    def __init__(self, model: Any, class_names: list[str], threshold: float | None,
                 image_size: int, channels: int) -> None:
        self.model = model
        self.class_names = list(class_names)
        self.threshold = threshold
        self.image_size = image_size
        self.channels = channels

    def probabilities(self, x: np.ndarray) -> np.ndarray:
        # predict_on_batch skips predict()'s per-call dataset and callbacks (~100 ms, most
        # of a small request); large requests go through predict() in batches of 256.
        raw = (self.model.predict_on_batch(x) if len(x) <= 256
               else self.model.predict(x, batch_size=256, verbose=0))
        out = np.asarray(raw, dtype=np.float64)
        if out.ndim == 2 and out.shape[1] == 1:  # a sigmoid unit: [1 - p, p]
            out = np.concatenate([1.0 - out, out], axis=1)
        return out

    def predict(self, model_input: Any, params: dict[str, Any] | None = None) -> Any:
        import pandas as pd

        values = model_input.to_numpy() if hasattr(model_input, "to_numpy") else model_input
        scaled = bool((params or {}).get("scaled", False))
        probs = self.probabilities(to_model_input(values, self.image_size, self.channels,
                                                  scaled))
        if probs.shape[1] == 2 and self.threshold is not None:
            index = (probs[:, 1] >= self.threshold).astype(int)
        else:
            index = probs.argmax(axis=1)
        frame = pd.DataFrame({f"p_{n}": probs[:, i] for i, n in enumerate(self.class_names)})
        frame["label"] = [self.class_names[i] for i in index]
        frame["threshold"] = float("nan") if self.threshold is None else float(self.threshold)
        return frame


def _load_pyfunc(path: str) -> ServingModel:
    """MLflow's pyfunc entry point: the model folder (its MLmodel and Keras file)."""
    import keras
    import yaml

    root = Path(path)
    mlmodel = yaml.safe_load((root / "MLmodel").read_text())
    meta = mlmodel.get("metadata") or {}
    data = root / mlmodel["flavors"]["keras"]["data"]
    keras_file = data / "model.keras" if (data / "model.keras").exists() else Path(
        f"{data}.keras")
    if not keras_file.exists():
        keras_file = next(data.rglob("*.keras"))
    model = keras.models.load_model(keras_file, safe_mode=True, compile=False)
    prep = meta.get("preprocessing") or {}
    return ServingModel(model, meta["class_names"], meta.get("threshold"),
                        int(prep["image_size"]), int(prep["channels"]))


def add_to_saved_model(path: str | os.PathLike, mlflow_model: Any) -> None:
    """After mlflow.keras.save_model: make this module the folder's pyfunc flavour."""
    import shutil

    code = Path(path) / "code"
    code.mkdir(exist_ok=True)
    shutil.copyfile(SERVING_FILE, code / f"{LOADER_MODULE}.py")
    flavor = mlflow_model.flavors["python_function"]
    flavor["loader_module"] = LOADER_MODULE
    flavor["code"] = "code"
    mlflow_model.save(os.path.join(path, "MLmodel"))
