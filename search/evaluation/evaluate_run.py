"""Evaluating a trained model and logging it: val, test and external sets.

The threshold is chosen on val (`evaluation.threshold_rule`, optionally re-weighted to
`evaluation.deployment_prevalence`); test and every `evaluation.external` set are scored at
it, with stratified bootstrap intervals; metrics, confusion matrices, reports, ROC/PR curves
and the intervals (a JSON artifact per held-out split, not metric series) go to the active
MLflow run. `search.training.trainer` calls it for every
finished trial,
`search.sweep.top_k_ensemble` for an ensemble.
"""

from __future__ import annotations

import functools
import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import keras
import matplotlib.pyplot as plt
import mlflow
import numpy as np
import tensorflow as tf
from omegaconf import DictConfig, OmegaConf

from search.evaluation import calibration as cal
from search.evaluation import metrics as ev
from search.evaluation.external import ExternalSets, external_specs, score_sets
from search.evaluation.intervals import INTERVALS_ARTIFACT, BootstrapSpec, metric_prefix
from search.tracking import tags as tag_keys

# its lines read as the trainer's, as before the split
log = logging.getLogger("search.training.trainer")

# evaluate_split's values that already have a metric of their own, so one quantity has one
# name: recall is `sensitivity`; the threshold is `threshold` (chosen once, on val); the best
# checkpoint's loss is the minimum of Keras' `val_loss` series (and `objective` by default).
NOT_LOGGED = ("recall", "threshold", "loss")


def log_figure(figure: plt.Figure, path: str) -> None:
    """Log a figure to the active run, then close it: pyplot keeps every open figure, and a
    worker process runs many trials."""
    try:
        mlflow.log_figure(figure, path)
    finally:
        plt.close(figure)


@dataclass
class Figures:
    """The figures an evaluation would log, drawn only when `render` is called: a sweep
    trial decides after its metrics whether anyone will look at them (best_model)."""

    pending: list[tuple[Callable[[], plt.Figure], str]] = field(default_factory=list)

    def add(self, draw: Callable[[], plt.Figure], path: str) -> None:
        """Keep `draw` (no matplotlib work yet) for the artifact `path`."""
        self.pending.append((draw, path))

    def render(self) -> list[str]:
        """Draw and log every pending figure; the artifact paths logged."""
        paths = [path for _, path in self.pending]
        for draw, path in self.pending:
            log_figure(draw(), path)
        self.pending.clear()
        return paths


# The compiled losses whose value `model.evaluate` would return, computed here from the
# predictions instead (no second pass over the split); any other loss is evaluated by Keras.
PREDICTION_LOSSES = ("binary_crossentropy", "sparse_categorical_crossentropy")
# Below this true-class probability a float32 output no longer pins the loss Keras computes
# from the logits (1 - p is quantised near p = 1): such a split is evaluated by Keras.
TRUSTED_PROBABILITY = 1e-4


def heldout_loss(model: keras.Model, dataset: tf.data.Dataset, y: np.ndarray,
                 scores: np.ndarray) -> float:
    """`model.evaluate(dataset)["loss"]` from the split's predictions `scores`.

    The same quantity: the unweighted mean cross-entropy of the labels (evaluate applies no
    class weights, and the compiled loss has no label smoothing: trainer.label_smoothing
    smooths train batches only) plus the model's regularisation penalties (`model.losses`:
    Keras adds them to every batch's loss). Keras reads the logits behind the sigmoid or
    softmax; from probabilities the value agrees to float precision unless a prediction is
    confidently wrong beyond `TRUSTED_PROBABILITY`, and then Keras evaluates."""
    loss = model.loss if isinstance(model.loss, str) else None
    if loss in PREDICTION_LOSSES and len(y):
        labels = np.asarray(y).astype(np.int64).ravel()
        probs = np.asarray(scores, dtype=np.float64)
        truth = (np.where(labels == 1, probs, 1.0 - probs) if probs.ndim == 1
                 else probs[np.arange(len(labels)), labels])
        if truth.min() >= TRUSTED_PROBABILITY:
            penalty = sum(float(keras.ops.convert_to_numpy(p)) for p in model.losses)
            return float(np.mean(-np.log(truth)) + penalty)
    return float(model.evaluate(dataset, verbose=0, return_dict=True)["loss"])


def predict_split(model: keras.Model, dataset: tf.data.Dataset) -> np.ndarray:
    """Full predictions of a split (binary: positive-class scores)."""
    return ev.positive_scores(model.predict(dataset, verbose=0))


def bootstrap_spec(cfg: DictConfig) -> BootstrapSpec:
    """`evaluation.bootstrap`, checked (train calls it before any data is loaded)."""
    section = OmegaConf.select(cfg, "evaluation.bootstrap")
    if section is not None and not OmegaConf.is_dict(section):
        raise ValueError(f"evaluation.bootstrap={section!r} must be a mapping of resamples, "
                         "level, seed; to turn intervals off set evaluation.bootstrap.resamples=0")
    return BootstrapSpec.from_config(
        OmegaConf.to_container(section) if section is not None else None)


def evaluate_and_log(cfg: DictConfig, model: keras.Model, data: Any, binary: bool,
                     figures: Figures | None = None) -> dict:
    """Evaluate val, test and the external sets at a threshold chosen on val; log metrics,
    matrices, curves and bootstrap intervals. The returned results hold the intervals as
    `<split>_<metric>_ci_low/_ci_high` for the run description; the run has them as JSON;
    the PNGs to `figures`, for the caller to render or not (none given: rendered here)."""
    results: dict[str, float] = {}
    figures, render_here = figures if figures is not None else Figures(), figures is None
    bootstrap = bootstrap_spec(cfg)
    prevalence = OmegaConf.select(cfg, "evaluation.deployment_prevalence")
    val_before = val_scores = predict_split(model, data.val)
    val_loss = heldout_loss(model, data.val, data.y_val, val_scores)
    calibration = calibrate(cfg, model, data.y_val, val_scores)
    if calibration is not None:  # the folded model's own val scores choose the threshold
        val_scores = predict_split(model, data.val)
        results["calibration_temperature"] = calibration.temperature
        results["calibration_shift"] = calibration.shift
    threshold = None
    if binary:
        threshold = ev.choose_threshold(
            data.y_val, val_scores, cfg.evaluation.threshold_rule,
            float(cfg.evaluation.min_sensitivity), prevalence=prevalence,
        )
        mlflow.log_metric("threshold", threshold)
    splits = [("val", data.y_val, val_scores, val_loss)]
    if data.n_test:
        scores = predict_split(model, data.test)
        splits.append(("test", data.y_test, scores, heldout_loss(model, data.test,
                                                                 data.y_test, scores)))
    for split, y, scores, loss in splits:
        # Intervals for held-out splits only: val chose the checkpoint and the threshold.
        result = ev.evaluate_split(split, y, scores, data.class_names, threshold, loss,
                                   bootstrap=None if split == "val" else bootstrap)
        results.update({f"{split}_{k}": v for k, v in result.metrics.items()})
        results.update(result.interval_metrics(f"{split}_"))
        log_split(result, y, scores, figures)
        log.info("%s: loss %.4f  %s", split, result.metrics["loss"], ev.headline(result.metrics))
    if calibration is not None:
        log_calibration(calibration, data.y_val, val_before, val_scores, splits,
                        list(data.class_names), figures)
    sets = external_sets(cfg, list(data.class_names))
    if sets:
        prep = data.preprocessing
        for name, result in score_sets(model, sets.at(prep["image_size"], prep["channels"]),
                                       list(data.class_names), threshold, bootstrap).items():
            results.update({f"ext_{name}_{k}": v for k, v in result.metrics.items()})
            results.update(result.interval_metrics(f"ext_{name}_"))
            log_split(result, result.extra["y"], result.extra["scores"], figures)
            log.info("external %s (%d images, never used for selection): %s", name,
                     result.extra["n"], ev.headline(result.metrics))
    if threshold is not None:
        mlflow.log_dict(
            {"threshold": threshold, "rule": str(cfg.evaluation.threshold_rule),
             "min_sensitivity": float(cfg.evaluation.min_sensitivity), "chosen_on": "val",
             "deployment_prevalence": prevalence},
            "evaluation/threshold.json",
        )
    if render_here:
        figures.render()
    return results


def calibrate(cfg: DictConfig, model: keras.Model, y_val: np.ndarray,
              val_scores: np.ndarray) -> cal.Calibration | None:
    """Fit `evaluation.calibration` on val and fold it into ``model``'s output layer.

    None when off, or for a model without its own output layer (an ensemble averages
    members that were calibrated one by one)."""
    method = str(OmegaConf.select(cfg, "evaluation.calibration", default="none"))
    if method == "none":
        return None
    calibration = cal.fit_calibration(y_val, val_scores, method)
    if calibration.method == "none" or not cal.fold_into_output(model, calibration):
        return None
    return calibration


def log_calibration(calibration: cal.Calibration, y_val: np.ndarray, before: np.ndarray,
                    after: np.ndarray, splits: list, class_names: list[str],
                    figures: Figures) -> None:
    """The map, val (fitted there) and test (held out) NLL/Brier/ECE before and after, and
    the val reliability curves."""
    # A tag, not a metric: the run's metrics stay one per evaluated quantity (the map's
    # numbers and the before/after scores are in evaluation/calibration.json)
    mlflow.set_tag(tag_keys.CALIBRATION, f"{calibration.method} T={calibration.temperature:.4f}"
                   + (f" shift={calibration.shift:+.4f}" if calibration.shift else ""))
    record: dict[str, Any] = {**calibration.as_dict(), "fitted_on": "val",
                              "val": {"before": cal.quality(y_val, before),
                                      "after": cal.quality(y_val, after)}}
    for split, y, scores, _ in splits[1:]:  # held out: an honest before/after
        record[split] = {"before": cal.quality(y, calibration.invert(scores)),
                         "after": cal.quality(y, scores)}
    mlflow.log_dict(ev.json_ready(record), "evaluation/calibration.json")
    figures.add(lambda: cal.reliability_figure(y_val, before, after, calibration, class_names),
                "evaluation/calibration.png")
    log.info("calibration (%s, T=%.3f): val ECE %.4f -> %.4f", calibration.method,
             calibration.temperature, record["val"]["before"]["ece"],
             record["val"]["after"]["ece"])


@functools.cache
def _external_sets(items: str, class_names: tuple[str, ...]) -> ExternalSets:
    return ExternalSets(external_specs(json.loads(items)), list(class_names))


def external_sets(cfg: DictConfig, class_names: list[str]) -> ExternalSets:
    """`evaluation.external`, loaded once per worker process and input size."""
    section = OmegaConf.select(cfg, "evaluation.external")
    items = OmegaConf.to_container(section, resolve=True) if section is not None else []
    return _external_sets(json.dumps(items, sort_keys=True), tuple(class_names))


def log_split(result: ev.SplitEvaluation, y: np.ndarray, scores: np.ndarray,
              figures: Figures) -> None:
    """Metrics (`eval_<split>_*`, `ext_<name>_*`), confusion matrix, report, curves and the
    intervals of a split.

    The intervals go to `evaluation/<split>_intervals.json` only: as `_ci_low`/`_ci_high`
    series they were two more per metric, 43 series on a trial instead of 29 (issue 28)."""
    split = result.split
    prefix = metric_prefix(split)  # eval_: val_loss/val_accuracy name Keras' epoch series
    mlflow.log_metrics({f"{prefix}{k}": v for k, v in result.metrics.items()
                        if k not in NOT_LOGGED and math.isfinite(v)})
    undefined = sorted(k for k, v in result.metrics.items()
                       if k not in NOT_LOGGED and not math.isfinite(v))
    if undefined:  # never dropped silently
        log.warning("%s: %s undefined (NaN: a class is missing from the %s split), not "
                    "logged", split, ", ".join(undefined), split)
    figures.add(lambda: ev.confusion_figure(result), f"evaluation/{split}_confusion.png")
    mlflow.log_dict(
        {"labels": result.class_names, "matrix": result.confusion.tolist(),
         "threshold": result.threshold, "rows": "true", "columns": "predicted"},
        f"evaluation/{split}_confusion.json",
    )
    mlflow.log_dict(result.report, f"evaluation/{split}_classification_report.json")
    if result.intervals:
        mlflow.log_dict(ev.json_ready({k: list(v) for k, v in result.intervals.items()}),
                        INTERVALS_ARTIFACT.format(split=split))
    figures.add(lambda: ev.roc_pr_figure(split, y, scores, result.class_names),
                f"evaluation/{split}_roc_pr.png")
