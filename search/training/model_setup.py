"""The model a run trains: built from `cfg.model`, compiled with its schedule and optimizer."""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Any

import keras
import tensorflow as tf
from hydra.utils import instantiate
from omegaconf import DictConfig

from models.fused_batch_norm import fuse_batch_norm
from models.precision import dtype_policy, resolve_precision
from search.evaluation.keras_metrics import multiclass_metrics
from search.training.run_plan import RunPlan

# train()'s own logger: its lines keep the name the terminal and the sweep's console show.
log = logging.getLogger("search.training.trainer")


@dataclass(frozen=True)
class BuiltModel:
    """The compiled model and what the fit needs of its build.

    Attributes:
        model: The compiled Keras model (initial weights, or `trainer.init_weights`').
        schedule: The learning-rate schedule (its `callbacks` join the fit's).
        precision: The resolved dtype policy the train step runs in.
        smoothing: `trainer.label_smoothing`, checked.
        n_classes: Classes of the output head (2: a binary head).
    """

    model: keras.Model
    schedule: Any
    precision: str
    smoothing: float
    n_classes: int

    @property
    def binary(self) -> bool:
        return self.n_classes == 2


def compile_model(model: keras.Model, optimizer: keras.optimizers.Optimizer | str, binary: bool,
                  class_names: list[str] | None = None) -> None:
    """Loss and per-epoch indicator metrics matching the output head.

    K classes: accuracy, `auc` (one-vs-rest, macro) and `recall_<class>` for every class,
    as the binary head has precision/recall/auc.
    """
    if binary:
        loss = "binary_crossentropy"
        metrics = [
            keras.metrics.BinaryAccuracy(name="accuracy"),
            keras.metrics.Precision(name="precision"),
            keras.metrics.Recall(name="recall"),
            keras.metrics.AUC(name="auc"),
        ]
    else:
        loss = "sparse_categorical_crossentropy"
        k = int(model.output_shape[-1])
        metrics = multiclass_metrics(list(class_names or [f"class_{i}" for i in range(k)]))
    model.compile(optimizer=optimizer, loss=loss, metrics=metrics)


def check_label_smoothing(value: Any, n_classes: int) -> float:
    """`trainer.label_smoothing` as a float in [0, 1); K classes refuse a non-zero value."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value < 1.0:
        raise ValueError(f"trainer.label_smoothing={value!r} is not valid; allowed: "
                         "a number in [0, 1) (0 = off)")
    if value and n_classes > 2:
        # K-class labels are class indices for sparse_categorical_crossentropy, which has no
        # label smoothing in Keras (only the one-hot CategoricalCrossentropy has).
        raise ValueError(
            f"trainer.label_smoothing={value} works with two classes only: the "
            f"{n_classes}-class sparse_categorical_crossentropy has no label smoothing in "
            "Keras; set trainer.label_smoothing=0")
    return float(value)


def build_model(cfg: DictConfig, data: Any, plan: RunPlan) -> BuiltModel:
    """Build, compile and (with `trainer.init_weights`) initialise the model for `data`."""
    n_classes = len(data.class_names)
    keras.backend.clear_session()  # a sweep worker may train several models in one process
    # Re-seed after data building so weight init does not depend on how much RNG it used.
    keras.utils.set_random_seed(plan.train_seed)
    build = functools.partial(instantiate, cfg.model, input_shape=tuple(data.input_shape),
                              num_classes=n_classes)
    has_gpu = bool(tf.config.list_logical_devices("GPU"))
    precision = resolve_precision(str(cfg.trainer.get("precision") or "float32"), has_gpu,
                                  int(data.input_shape[0]))
    with dtype_policy(precision):
        model = build()
    fuse_batch_norm(model)  # the same maths in one kernel: models/fused_batch_norm.py
    schedule = instantiate(
        cfg.lr_schedule,
        initial_learning_rate=float(cfg.optimizer.learning_rate),
        steps_per_epoch=int(data.steps_per_epoch),
        epochs=int(cfg.trainer.get("schedule_epochs") or plan.max_epochs),
    )
    optimizer = instantiate(cfg.optimizer, learning_rate=schedule.learning_rate)
    compile_model(model, optimizer, n_classes == 2, list(data.class_names))
    smoothing = check_label_smoothing(cfg.trainer.get("label_smoothing") or 0.0, n_classes)
    init_weights = cfg.trainer.get("init_weights")
    if init_weights:  # weights only, as keras-tuner continues a model: a fresh optimizer
        model.set_weights(keras.models.load_model(
            str(init_weights), safe_mode=True, compile=False).get_weights())
        log.info("Starting from %s at epoch %d", init_weights, plan.initial_epoch)
    return BuiltModel(model, schedule, precision, smoothing, n_classes)
