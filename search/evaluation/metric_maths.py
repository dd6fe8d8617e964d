"""Metric names and their maths: one vectorised implementation for point values and bootstrap.

Every metric is computed for a batch of rows at once: (rows, n) labels with (rows, n)
positive-class scores (binary) or (rows, n, K) probabilities (K classes). A bootstrap passes
one row per resample; a point value is the same function on one row, the identity resample
(`point_metrics`). So a metric is added in this module only: its name in the tuples below and
its formula in `binary_rows` / `multiclass_rows` (tests check that both paths agree).

The formulas reproduce scikit-learn's values (tests compare them): ROC AUC by average ranks
(Mann-Whitney: ties count one half), average precision by tied-score groups. NumPy only, so
the config checks (and the sweeper's process) can import the names without scikit-learn.
"""

from __future__ import annotations

import re

import numpy as np

# How search.evaluation.metrics picks the decision threshold (evaluation.threshold_rule).
THRESHOLD_RULES = ("max_f1", "youden", "min_sensitivity")
# evaluation.calibration (search/evaluation/calibration.py).
CALIBRATION_METHODS = ("temperature", "platt", "none")
DEFAULT_THRESHOLD = 0.5  # a binary split evaluated without a chosen threshold

# A binary split's metrics, in the order evaluate_split reports them (binary_rows' keys).
BINARY_METRICS = ("accuracy", "precision", "recall", "sensitivity", "specificity", "f1",
                  "roc_auc", "pr_auc")
# The K-class names of the binary metrics (averaged over classes, so the name says so).
MACRO_NAMES = {"precision": "macro_precision", "recall": "macro_recall",
               "sensitivity": "macro_recall", "specificity": "macro_specificity",
               "f1": "macro_f1"}
# Per-class metrics of a K-class split, each as `<metric>_<class key>`.
PER_CLASS_METRICS = ("recall", "precision", "f1")

# Metrics of evaluate_split that can rank model versions (registry.metric, tie_break; all:
# higher is better). A binary name ranks K-class models by its macro_* counterpart and the
# reverse; the decision records the name actually compared.
RANKING_METRICS = ("roc_auc", "pr_auc", "accuracy", "sensitivity", "specificity", "f1",
                   "precision", "recall", *dict.fromkeys(MACRO_NAMES.values()))
# What search/training/trainer.py returns: Keras' loss and evaluate_split's metrics of the
# val split (config_checks adds the model facts).
VAL_METRICS = ("loss", *BINARY_METRICS, *dict.fromkeys(MACRO_NAMES.values()))
# What Keras logs each epoch (compile_model's metrics), which trainer.monitor may watch.
EPOCH_METRICS = ("loss", "accuracy", "precision", "recall", "auc")
# The per-epoch counterpart of an objective metric (what a pruner can watch for it).
EPOCH_COUNTERPART = {"loss": "loss", "accuracy": "accuracy", "precision": "precision",
                     "recall": "recall", "sensitivity": "recall", "roc_auc": "auc"}


def class_key(name: str) -> str:
    """A class name as a metric-name part: `Bacterial pneumonia` -> `bacterial_pneumonia`."""
    return re.sub(r"[^0-9a-z]+", "_", str(name).casefold()).strip("_") or "class"


def class_keys(class_names: list[str]) -> list[str]:
    """`class_key` of every class, made unique (`a b` and `a_b` -> `a_b`, `a_b_2`)."""
    keys: list[str] = []
    for name in class_names:
        key, n = class_key(name), 2
        while key in keys:
            key, n = f"{class_key(name)}_{n}", n + 1
        keys.append(key)
    return keys


def check_metric(metric: str) -> str:
    """Accept `roc_auc` (also `test_roc_auc`/`eval_test_roc_auc`); refuse unrankable names."""
    name = str(metric)
    for prefix in ("eval_test_", "test_"):
        name = name.removeprefix(prefix)
    if name not in RANKING_METRICS:
        raise ValueError(
            f"registry.metric={metric!r} cannot rank models; use one of "
            f"{', '.join(RANKING_METRICS)}"
        )
    return name


def task_metric(name: str, n_classes: int) -> str:
    """A ranking metric's name for a task: `sensitivity` is `macro_recall` for K classes."""
    return MACRO_NAMES.get(name, name) if n_classes > 2 else name


def safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den, 0 where den is 0 (scikit-learn's zero_division=0)."""
    return np.where(den > 0, num / np.maximum(den, 1), 0.0)


def average_ranks(s: np.ndarray) -> np.ndarray:
    """1-based ranks along each row, ties sharing their mean rank (scipy's rankdata).

    The ranks are half-integers, exact in float64, so they equal scipy's bit for bit.
    """
    order = np.argsort(s, axis=1, kind="stable")
    ordered = np.take_along_axis(s, order, axis=1)
    n = s.shape[1]
    position = np.arange(n)
    starts = np.ones_like(ordered, dtype=bool)
    starts[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    ends = np.ones_like(starts)
    ends[:, :-1] = starts[:, 1:]
    first = np.maximum.accumulate(np.where(starts, position, 0), axis=1)
    last = np.minimum.accumulate(np.where(ends, position, n)[:, ::-1], axis=1)[:, ::-1]
    ranks = np.empty(s.shape, dtype=np.float64)
    np.put_along_axis(ranks, order, (first + last) / 2 + 1, axis=1)
    return ranks


def roc_auc_rows(y: np.ndarray, s: np.ndarray) -> np.ndarray:
    """ROC AUC per row of (rows, n) labels/scores; NaN unless the row has both classes."""
    pos = y.sum(axis=1)
    neg = y.shape[1] - pos
    ranks = average_ranks(s)
    auc = ((ranks * y).sum(axis=1) - pos * (pos + 1) / 2) / np.maximum(pos * neg, 1)
    return np.where((pos > 0) & (neg > 0), auc, np.nan)


def average_precision_rows(y: np.ndarray, s: np.ndarray) -> np.ndarray:
    """Average precision per row, as scikit-learn: precision at the end of each tied group.

    NaN unless the row has both classes (as ROC AUC: an all-positive split ranks nothing).
    """
    order = np.argsort(-s, axis=1, kind="stable")
    ys = np.take_along_axis(y, order, axis=1)
    ss = np.take_along_axis(s, order, axis=1)
    n = y.shape[1]
    precision = np.cumsum(ys, axis=1) / np.arange(1, n + 1)
    end = np.ones_like(ss, dtype=bool)
    end[:, :-1] = ss[:, :-1] != ss[:, 1:]
    end_at = np.where(end, np.arange(n), n)
    next_end = np.minimum.accumulate(end_at[:, ::-1], axis=1)[:, ::-1]
    pos = ys.sum(axis=1)
    ap = (ys * np.take_along_axis(precision, next_end, axis=1)).sum(axis=1) / np.maximum(pos, 1)
    return np.where((pos > 0) & (pos < n), ap, np.nan)


def confusion_rows(y: np.ndarray, pred: np.ndarray, k: int) -> np.ndarray:
    """(rows, k, k) confusion counts: true class down, predicted class across."""
    rows = y.shape[0]
    flat = (np.arange(rows)[:, None] * k * k + y * k + pred).ravel()
    return np.bincount(flat, minlength=rows * k * k).reshape(rows, k, k)


def predicted_classes(scores: np.ndarray, threshold: float | None) -> np.ndarray:
    """The decision: positive where a binary score reaches ``threshold``; with no threshold,
    the most probable class (K-class probabilities on the last axis)."""
    if threshold is None:
        return scores.argmax(axis=-1)
    return (scores >= threshold).astype(np.int64)


def binary_rows(y: np.ndarray, s: np.ndarray, threshold: float) -> dict[str, np.ndarray]:
    """BINARY_METRICS of each row: positive when the score reaches ``threshold``."""
    cm = confusion_rows(y, predicted_classes(s, threshold), 2)
    tn, fp, fn, tp = cm[:, 0, 0], cm[:, 0, 1], cm[:, 1, 0], cm[:, 1, 1]
    sensitivity = safe_div(tp, tp + fn)
    return {
        "accuracy": (tp + tn) / y.shape[1],
        "precision": safe_div(tp, tp + fp),
        "recall": sensitivity,
        "sensitivity": sensitivity,
        "specificity": safe_div(tn, tn + fp),
        "f1": safe_div(2 * tp, 2 * tp + fp + fn),
        "roc_auc": roc_auc_rows(y, s),
        "pr_auc": average_precision_rows(y, s),
    }


def multiclass_rows(y: np.ndarray, s: np.ndarray, keys: list[str]) -> dict[str, np.ndarray]:
    """K-class metrics of each row of (rows, n) labels and (rows, n, K) probabilities.

    The decision is the most probable class. Averages say so (`macro_recall`, not
    `sensitivity`); `roc_auc` / `pr_auc` are one-vs-rest, macro-averaged; every class has
    `recall_<key>`, `precision_<key>` and `f1_<key>`. A class missing from a row makes its
    recall, the macro recall and the AUCs NaN (named by the caller, never dropped silently).
    """
    k = len(keys)
    cm = confusion_rows(y, predicted_classes(s, None), k)
    diag = np.diagonal(cm, axis1=1, axis2=2)
    true, predicted = cm.sum(axis=2), cm.sum(axis=1)
    recall = np.where(true > 0, diag / np.maximum(true, 1), np.nan)
    precision = safe_div(diag, predicted)
    f1 = safe_div(2 * diag, true + predicted)
    fp = predicted - diag
    tn = y.shape[1] - true - fp
    out = {
        "accuracy": diag.sum(axis=1) / y.shape[1],
        MACRO_NAMES["precision"]: precision.mean(axis=1),
        MACRO_NAMES["recall"]: recall.mean(axis=1),
        MACRO_NAMES["specificity"]: safe_div(tn, tn + fp).mean(axis=1),
        MACRO_NAMES["f1"]: f1.mean(axis=1),
        "roc_auc": np.mean([roc_auc_rows((y == c).astype(int), s[:, :, c])
                            for c in range(k)], axis=0),
        "pr_auc": np.mean([average_precision_rows((y == c).astype(int), s[:, :, c])
                           for c in range(k)], axis=0),
    }
    per_class = {"recall": recall, "precision": precision, "f1": f1}
    for i, key in enumerate(keys):
        for metric in PER_CLASS_METRICS:
            out[f"{metric}_{key}"] = per_class[metric][:, i]
    return out


def metric_rows(y: np.ndarray, scores: np.ndarray, idx: np.ndarray, class_names: list[str],
                threshold: float | None) -> dict[str, np.ndarray]:
    """Every metric for each row of ``idx``, a (rows, n) matrix of indices into the split.

    Binary for (n,) scores (at ``threshold``, 0.5 when None), K-class for (n, K).
    """
    y = np.asarray(y).astype(int).ravel()
    scores = np.asarray(scores)
    if not np.issubdtype(scores.dtype, np.floating):
        scores = scores.astype(np.float64)
    if scores.ndim == 1:
        return binary_rows(y[idx], scores[idx],
                           DEFAULT_THRESHOLD if threshold is None else threshold)
    return multiclass_rows(y[idx], scores[idx], class_keys(class_names))


def identity_index(n: int) -> np.ndarray:
    """The one resample that is the split itself: (1, n) indices 0..n-1."""
    return np.arange(n)[None, :]


def point_metrics(y: np.ndarray, scores: np.ndarray, class_names: list[str],
                  threshold: float | None) -> dict[str, float]:
    """Every metric of the split itself: `metric_rows` on the identity resample."""
    rows = metric_rows(y, scores, identity_index(len(np.ravel(y))), class_names, threshold)
    return {name: float(values[0]) for name, values in rows.items()}
