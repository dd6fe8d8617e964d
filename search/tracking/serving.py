"""The champion as MLflow serves it: raw pixels in; class probabilities by name, the label at
the stored threshold and the threshold out.

MLflow's Keras flavour serves the bare network: it expects pixels already scaled to 0–1 and
answers one float per image, so raw 0–255 pixels (what a decoder or a PACS export gives)
came back as P=1.0 for every image with HTTP 200, and a client cutting at 0.5 disagreed with
the platform's stored threshold. This module is the model's `python_function` flavour
instead (copied into each logged model as `code/serving.py`, so `mlflow models serve`,
`mlflow.pyfunc.load_model` and `mlflow models predict` use it); the Keras flavour and its
files stay as they were.

Self-contained on purpose (numpy, pandas, keras, yaml, and mlflow, which loads it): it must
import where only the model folder is, without this repository (there only TF's start-up
lines, which `search.quiet_start` drops where the repository is installed, show).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

SERVING_FILE = Path(__file__).resolve()
LOADER_MODULE = "serving"  # the name under which MLflow imports the copied file



def probability_column(class_name: str) -> str:
    """One class's probability column, the same word in the REST answer, the pyfunc output
    and predict.py's predictions.csv: `p_<class>`."""
    return f"p_{class_name}"

def output_columns(class_names: list[str]) -> list[str]:
    """`p_<class>` per class in output order, then `predicted_label` and `threshold`."""
    return [probability_column(name) for name in class_names] + ["predicted_label", "threshold"]


def serving_signature(image_size: int, class_names: list[str]) -> Any:
    """Input: raw 0–255 pixels (N, size, size, 1 or 3), documented as the network's float32;
    output: named columns; param `scaled` (false) for pixels already scaled to 0–1.

    The model checks its own input (`to_model_input`), so MLflow's schema check is switched
    off for it: that check wants the exact dtype and runs before the model, so it refused a
    uint8 array (an image's own type) and an RGB image before the channel adapter could run,
    and over REST it cast JSON integers to float32, losing what tells raw 0/1 pixels (a dark
    exposure) from scaled ones. `_is_signature_from_type_hint` is MLflow's switch for models
    that validate their own input (saved in MLmodel as `is_signature_from_type_hint`): with
    it, `mlflow.pyfunc` passes the input as given and `mlflow models serve` passes the JSON
    `inputs` as parsed (ints stay ints). The switch is MLflow's private API: should a later
    MLflow drop it, tests/search/test_serving.py (uint8 in process, RGB and 0/1 over REST) fails.
    """
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema, TensorSpec

    inputs = Schema([TensorSpec(np.dtype("float32"), (-1, image_size, image_size, -1))])
    outputs = Schema([ColSpec("double", probability_column(n)) for n in class_names]
                     + [ColSpec("string", "predicted_label"), ColSpec("double", "threshold")])
    signature = ModelSignature(inputs=inputs, outputs=outputs,
                               params=ParamSchema([ParamSpec("scaled", "boolean", False)]))
    signature._is_signature_from_type_hint = True
    return signature


class ServingInputError(MlflowException):
    """A request the model refuses: HTTP 400 (INVALID_PARAMETER_VALUE) whose `message` is the
    reason and its fix.

    MLflow's scoring server rewrites the message of an MlflowException raised in predict to
    "Failed to predict data '<the whole request>'. Error: <reason>": for a batch of images,
    megabytes of pixels before the reason. The reason alone stays the message.
    """

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason, error_code=INVALID_PARAMETER_VALUE)

    @property
    def message(self) -> str:
        return self.reason

    @message.setter
    def message(self, value: str) -> None:
        pass  # see the class docstring: the server's rewrite is dropped


def as_pixel_array(images: Any) -> np.ndarray:
    """Any array-like of numbers (ndarray, nested JSON lists, DataFrame) -> ndarray.

    Raises:
        ValueError: ragged rows, or values that are not numbers (strings, nulls, booleans).
    """
    values = images.to_numpy() if hasattr(images, "to_numpy") else images
    try:
        x = np.asarray(values)
    except ValueError as error:  # numpy refuses ragged nested lists
        raise ValueError("images must be a rectangular array of numbers (N, size, size, "
                         "channels): the images or their rows differ in length "
                         f"({error}); send every image at the training size") from None
    if not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)):
        raise ValueError(f"pixel values must be numbers (got dtype {x.dtype}: strings, "
                         "nulls, booleans or integers too large); send raw 0–255 pixels as "
                         "JSON numbers or a numeric (e.g. uint8) array")
    return x


def check_shape(x: np.ndarray, image_size: int, channels: int) -> np.ndarray:
    """(N, size, size) or (N, size, size, 1 | 3) -> 4-D; anything else refused, naming it."""
    shape = tuple(x.shape)
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or x.shape[1:3] != (image_size, image_size):
        single = shape[:2] == (image_size, image_size) and len(shape) in (2, 3)
        hint = (f"; a single image must still be a batch: [image], shape (1, {image_size}, "
                f"{image_size}, {channels})" if single else "")
        raise ValueError(f"expected images of shape (N, {image_size}, {image_size}, "
                         f"{channels}) (the training size), got {shape}{hint}; resize "
                         "first, or use search/predict.py, which resizes files")
    if x.shape[3] not in (1, 3):
        raise ValueError(f"expected 1 (grayscale) or 3 (RGB) channels, got {x.shape[3]} "
                         f"(shape {shape}); drop an alpha channel, send (N, {image_size}, "
                         f"{image_size}, {channels})")
    if not len(x):
        raise ValueError(f"the request holds no images; send at least one, shape (N, "
                         f"{image_size}, {image_size}, {channels})")
    return x


def check_values(x: np.ndarray, scaled: bool) -> None:
    """Refuse NaN or infinite values, values out of range, and raw-looking scaled pixels.

    Whole numbers are raw pixels whatever the dtype (JSON integers, uint8, a float32 copy):
    0/1 is a dark exposure, not "scaled already". Only floats with fractions, all <= 1,
    look scaled; dividing them by 255 again would give a black image and a confident
    wrong answer.
    """
    floating = np.issubdtype(x.dtype, np.floating)
    if floating and not np.isfinite(x).all():  # NaN compares false with any bound
        bad = ~np.isfinite(x)
        first = int(np.argwhere(bad)[0][0])
        raise ValueError(f"{int(bad.sum())} pixel value(s) are NaN or infinite (the first "
                         f"in image {first}); send finite raw 0–255 pixels (a NaN often "
                         "means a failed decode or a division by zero before the request)")
    low, high = float(x.min()), float(x.max())
    top = 1.0 if scaled else 255.0
    if low < 0.0 or high > top:
        fix = ("send pixels scaled to 0–1, or raw 0–255 pixels without scaled" if scaled
               else "send raw 8-bit pixels: rescale other bit depths (e.g. 16-bit, "
               "Hounsfield units) to 0–255 first")
        raise ValueError(f"pixel values must lie in [0, {top:g}]"
                         f"{' (params scaled=true)' if scaled else ''}; got [{low:g}, "
                         f"{high:g}]; {fix}")
    if (not scaled and floating and 0.0 < high <= 1.0
            and bool(np.any(x != np.floor(x)))):
        raise ValueError("these pixels look scaled to 0–1 already (max "
                         f"{high:g}, with fractions); send raw 0–255 pixels, or pass "
                         "params {'scaled': true}")


def adapt_channels(x: np.ndarray, channels: int, scaled: bool) -> np.ndarray:
    """RGB to a grayscale model or grayscale to an RGB one, as training's decoder does
    (data/pipeline.resize_to_uint8: tf.image.rgb_to_grayscale's weights, rounded to 8 bits;
    grayscale copied to 3 channels)."""
    if x.shape[3] == channels:
        return x
    if channels == 3:
        return np.repeat(x, 3, axis=3)
    top = 1.0 if scaled else 255.0  # training rounds 0–255 values: do it on that scale
    gray = np.tensordot(x * (255.0 / top), np.float32([0.2989, 0.5870, 0.1140]), axes=1)
    gray = np.clip(np.round(gray), 0.0, 255.0) * (top / 255.0)
    return gray[..., None].astype(np.float32)


def to_model_input(images: Any, image_size: int, channels: int,
                   scaled: bool = False) -> np.ndarray:
    """Raw pixels (any integer or float dtype, 0–255; `scaled`: 0–1) -> the network's float32
    input, (N, size, size, channels).

    Raises:
        ValueError: wrong size, channels, dtype or range, NaN or infinite values, or pixels
            that look scaled already (see `check_values`), naming what was expected.
    """
    x = check_shape(as_pixel_array(images), image_size, channels)
    check_values(x, scaled)
    x = adapt_channels(x.astype(np.float32), channels, scaled)
    return x if scaled else x / 255.0


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

        scaled = bool((params or {}).get("scaled", False))
        try:
            x = to_model_input(model_input, self.image_size, self.channels, scaled)
        except ValueError as error:  # a 400 naming the problem, not MLflow's generic 400
            raise ServingInputError(str(error)) from None
        probs = self.probabilities(x)
        if probs.shape[1] == 2 and self.threshold is not None:
            index = (probs[:, 1] >= self.threshold).astype(int)
        else:
            index = probs.argmax(axis=1)
        frame = pd.DataFrame({probability_column(n): probs[:, i]
                              for i, n in enumerate(self.class_names)})
        frame["predicted_label"] = [self.class_names[i] for i in index]
        frame["threshold"] = float("nan") if self.threshold is None else float(self.threshold)
        return frame


def _load_pyfunc(path: str) -> ServingModel:
    """MLflow's pyfunc entry point: the model folder (its MLmodel and Keras file)."""
    try:  # the model server's TF start-up lines off (XRAY_STARTUP_LOGS=1 shows them)
        from search.quiet_start import start_tensorflow
    except ImportError:  # served where this repository is not installed: they show
        pass
    else:
        start_tensorflow()
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
