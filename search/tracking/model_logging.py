"""The trained model into MLflow: the Keras flavour plus the serving contract
(search/tracking/serving.py as its pyfunc flavour), its signature, example and metadata."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
from types import SimpleNamespace
from typing import Any

import keras
import mlflow
import numpy as np
from omegaconf import DictConfig, OmegaConf

from search.faults import fault_point
from search.tracking import mlflow_runs, serving
from search.tracking import tags as tag_keys

MODEL_PACKAGES = ("tensorflow", "keras", "numpy")


def _save_keras_flavor(path: str, **kwargs: Any) -> None:
    """mlflow.keras.save_model, with its target folder created first.

    MLflow 3.17's Keras flavour writes input_example.json before it creates the model folder,
    so `mlflow.keras.log_model(..., input_example=...)` fails with FileNotFoundError.
    """
    os.makedirs(path, exist_ok=True)
    kwargs.pop("validate_serving_input", None)  # Model.log's switch, not the saver's
    kwargs["model"] = without_training_state(kwargs["model"])
    mlflow.keras.save_model(path=path, **kwargs)
    serving.add_to_saved_model(path, kwargs["mlflow_model"])  # raw pixels in, names out


def without_training_state(model: keras.Model) -> keras.Model:
    """The same network and weights, uncompiled: no optimizer state in the logged file.

    Keras 3 saves a compiled model's optimizer into `.keras` whatever `include_optimizer`
    says; loading that file compiled (`mlflow.keras.load_model`, Keras' default) then warns
    "Skipping variable loading for optimizer ..." for state nobody uses: the logged model is
    for prediction. Resume states (search/training/resume.py) are saved apart and keep theirs.
    """
    if not getattr(model, "compiled", False):
        return model
    copy = type(model).from_config(model.get_config())  # from_config never compiles
    copy.set_weights(model.get_weights())
    return copy


# Stands in for the `mlflow.keras` module in Model.log (same flavour name, same saver).
KERAS_FLAVOR = SimpleNamespace(__name__="mlflow.keras", save_model=_save_keras_flavor)


def config_hash(cfg: DictConfig) -> str:
    """Stable short hash of the resolved task config (what defines the model)."""
    text = OmegaConf.to_yaml(cfg, resolve=True, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def log_keras_model(cfg: DictConfig, model: keras.Model, data: Any, results: dict,
                    extra_metadata: dict[str, Any] | None = None,
                    hashed: str | None = None) -> None:
    """Log the best checkpoint as an MLflow Keras model with signature, example and metadata
    (`extra_metadata` adds or replaces fields, e.g. an ensemble's members; `hashed` is
    `config_hash(cfg)` where the caller has it already)."""
    # The served contract (search/tracking/serving.py): raw 0–255 pixels, named outputs. The example
    # is a val image as a client would send it: uint8, an image's own type (the model takes any
    # integer or float dtype; JSON integers over REST).
    example = np.round(next(iter(data.val.take(1)))[0][:1].numpy() * 255.0).astype(np.uint8)
    signature = serving.serving_signature(int(data.preprocessing["image_size"]),
                                          list(data.class_names))
    metadata = {
        "class_names": list(data.class_names),
        "preprocessing": dict(data.preprocessing),
        "threshold": results.get("val_threshold"),
        "threshold_rule": str(cfg.evaluation.threshold_rule),
        # folded into the output layer's weights (search/evaluation/calibration.py): recorded,
        # not applied
        "calibration": {"method": str(cfg.evaluation.get("calibration", "none")),
                        "temperature": results.get("calibration_temperature"),
                        "shift": results.get("calibration_shift")}
        if "calibration_temperature" in results else None,
        "data_fingerprint": data.fingerprint,
        "config_hash": hashed or config_hash(cfg),
        **(extra_metadata or {}),
    }
    fault_point("model_logging")
    # MLflow validates the input example by predicting in another thread with Keras' default
    # verbosity: two progress bars (ANSI codes) per trial. Keras' switch for that is
    # thread-local, so with trainer.verbose=0 the call's stdout is dropped instead.
    quiet = int(cfg.trainer.verbose) == 0
    with contextlib.redirect_stdout(io.StringIO()) if quiet else contextlib.nullcontext():
        info = _log_model(model, signature, example, metadata)
    mlflow.log_dict(metadata, "model_metadata.json")
    mlflow.set_tag(tag_keys.BEST_MODEL_URI, info.model_uri)


def _log_model(model: keras.Model, signature: Any, example: np.ndarray,
               metadata: dict) -> Any:
    return mlflow.models.Model.log(
        artifact_path=None, name="model", flavor=KERAS_FLAVOR, model=model, signature=signature,
        input_example=example, metadata=metadata,
        # MLflow would load the saved model again and predict the example, only to warn if
        # that fails: tests/search/test_serving.py proves the served contract once, and every
        # trial saves 0.1-0.4 s (benchmarks/trial_overhead.py). The example is still logged.
        validate_serving_input=False,
        # Explicit requirements: inferring them makes MLflow load the model again in a fresh
        # subprocess (TF import included), seconds per trial for the same answer.
        pip_requirements=[f"{name}=={version}" for name, version in
                          mlflow_runs.package_versions().items() if name in MODEL_PACKAGES],
    )
