"""Evaluation on full predictions: threshold choice, metrics, confusion matrices and figures.

The metrics' maths is search.evaluation.metric_maths (one implementation for the point values
and the bootstrap). ROC/PR AUC are exact on the full predictions: Keras' 200-threshold AUC
metric underestimates when scores bunch near 1, so the Keras metric is only a per-epoch
indicator.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: figures go to MLflow, never to a window
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import (  # noqa: E402
    ConfusionMatrixDisplay,
    PrecisionRecallDisplay,
    RocCurveDisplay,
    classification_report,
    precision_recall_curve,
    roc_curve,
)

from search.evaluation.intervals import BootstrapSpec, flat_intervals  # noqa: E402
from search.evaluation.intervals import intervals as bootstrap_intervals  # noqa: E402
from search.evaluation.metric_maths import (  # noqa: E402
    DEFAULT_THRESHOLD,
    THRESHOLD_RULES,
    confusion_rows,
    point_metrics,
    predicted_classes,
    task_metric,  # noqa: F401 - re-exported: the metric names' helpers read as ev.task_metric
)
from search.tracking.descriptions import headline  # noqa: E402,F401 - re-exported as ev.headline


@dataclass
class SplitEvaluation:
    """Metrics of one split at one decision threshold."""

    split: str
    metrics: dict[str, float]
    confusion: np.ndarray
    report: dict
    class_names: list[str]
    threshold: float | None = None
    extra: dict = field(default_factory=dict)
    intervals: dict[str, tuple[float, float]] = field(default_factory=dict)  # metric: (low, high)

    def interval_metrics(self, prefix: str) -> dict[str, float]:
        """`{prefix}{metric}_ci_low/_ci_high` for every finite interval: in-memory results for
        the run description (a run logs its intervals as a JSON artifact, not as metrics)."""
        return flat_intervals(self.intervals, prefix)


def json_ready(value: Any) -> Any:
    """NaN/inf -> None, recursively, so metric dicts are strict JSON."""
    if isinstance(value, float) and not np.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_ready(v) for v in value]
    return value


def positive_scores(probabilities: np.ndarray) -> np.ndarray:
    """Model output as (n,) positive-class scores (binary) or (n, C) probabilities."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    if probabilities.ndim == 2 and probabilities.shape[1] == 1:
        return probabilities[:, 0]
    return probabilities


def prevalence_weights(y_true: np.ndarray, prevalence: float | None) -> np.ndarray | None:
    """Sample weights that make val's positive share `prevalence` (None: as it is)."""
    if prevalence is None:
        return None
    prevalence = float(prevalence)
    if not 0.0 < prevalence < 1.0:
        raise ValueError(f"evaluation.deployment_prevalence={prevalence} must be in (0, 1): the "
                         "expected share of positives (the last class) where the model is used")
    y_true = np.asarray(y_true).astype(int).ravel()
    share = y_true.mean()
    return np.where(y_true == 1, prevalence / share, (1 - prevalence) / (1 - share))


def choose_threshold(
    y_true: np.ndarray, scores: np.ndarray, rule: str = "max_f1", min_sensitivity: float = 0.95,
    prevalence: float | None = None,
) -> float:
    """Pick the decision threshold on validation predictions (binary tasks).

    Args:
        y_true: 0/1 labels.
        scores: positive-class scores.
        rule: ``max_f1``; ``youden`` (max sensitivity + specificity - 1); or ``min_sensitivity``
            (the highest threshold whose sensitivity reaches ``min_sensitivity``: in diagnosis a
            missed pneumonia costs most, so recall is the constraint and the rest is maximised).
        min_sensitivity: target for ``min_sensitivity``.
        prevalence: ``evaluation.deployment_prevalence``: val is re-weighted to this positive
            share before the rule is applied. Only ``max_f1`` depends on it (precision does);
            Youden's J and a sensitivity target are the same at any prevalence.
    """
    y_true = np.asarray(y_true).astype(int).ravel()
    if rule not in THRESHOLD_RULES:
        raise ValueError(
            f"evaluation.threshold_rule={rule!r} is not one of {', '.join(THRESHOLD_RULES)}"
        )
    if len(np.unique(y_true)) < 2:
        raise ValueError("cannot choose a threshold: the validation split holds only one class")
    weights = prevalence_weights(y_true, prevalence)
    if rule == "max_f1":
        precision, recall, thresholds = precision_recall_curve(y_true, scores,
                                                               sample_weight=weights)
        f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
        return float(thresholds[int(np.argmax(f1[:-1]))])
    # Keep every threshold: dropped "intermediate" points can be the exact answer.
    fpr, tpr, thresholds = roc_curve(y_true, scores, drop_intermediate=False)
    finite = np.isfinite(thresholds)
    if rule == "youden":
        j = np.where(finite, tpr - fpr, -np.inf)
        return float(thresholds[int(np.argmax(j))])
    if not 0.0 < min_sensitivity <= 1.0:
        raise ValueError(f"evaluation.min_sensitivity={min_sensitivity} must be in (0, 1]")
    # roc_curve's thresholds fall as tpr rises: the first hit is the highest threshold.
    hits = np.flatnonzero((tpr >= min_sensitivity) & finite)
    return float(thresholds[hits[0]])


def check_scores(y_true: np.ndarray, scores: np.ndarray, n_classes: int) -> None:
    """Refuse the scores scikit-learn's AUCs refused (where the AUCs are defined).

    Non-finite scores; K-class rows that are not probabilities (they must sum to 1).
    """
    if len(np.unique(y_true)) < (2 if scores.ndim == 1 else n_classes):
        return  # the AUCs are NaN: the scores were never checked
    if np.isnan(scores).any():
        raise ValueError("Input contains NaN.")
    if not np.isfinite(scores).all():
        raise ValueError(f"Input contains infinity or a value too large for {scores.dtype!r}.")
    if scores.ndim == 2 and not np.allclose(1, scores.sum(axis=1)):
        raise ValueError("Target scores need to be probabilities for multiclass roc_auc, i.e. "
                         "they should sum up to 1.0 over classes")


def evaluate_split(
    split: str,
    y_true: np.ndarray,
    scores: np.ndarray,
    class_names: list[str],
    threshold: float | None = None,
    loss: float | None = None,
    bootstrap: BootstrapSpec | None = None,
) -> SplitEvaluation:
    """All metrics of a split: binary at ``threshold``, multi-class by argmax (macro averages).

    The values are `metric_maths.point_metrics`, the bootstrap's own maths on the split
    itself. With ``bootstrap``, every metric also gets a stratified bootstrap interval at the
    same (fixed) threshold, in ``intervals``.
    """
    y_true = np.asarray(y_true).astype(int).ravel()
    labels = list(range(len(class_names)))
    binary = scores.ndim == 1
    if binary:
        threshold = DEFAULT_THRESHOLD if threshold is None else threshold
    check_scores(y_true, scores, len(class_names))
    metrics = point_metrics(y_true, scores, class_names, threshold)
    if binary:
        metrics["threshold"] = threshold
    y_pred = predicted_classes(scores, threshold if binary else None)
    if loss is not None:
        metrics["loss"] = loss
    report = classification_report(
        y_true, y_pred, labels=labels, target_names=class_names, output_dict=True, zero_division=0
    )
    return SplitEvaluation(
        split=split,
        metrics={k: float(v) for k, v in metrics.items()},
        confusion=confusion_rows(y_true[None, :], y_pred[None, :], len(labels))[0],
        report=report,
        class_names=list(class_names),
        threshold=threshold,
        intervals=bootstrap_intervals(y_true, scores, list(class_names), threshold, bootstrap)
        if bootstrap is not None and bootstrap.resamples else {},
    )


def confusion_figure(evaluation: SplitEvaluation) -> plt.Figure:
    """Confusion matrix (counts) with scikit-learn's display."""
    fig, ax = plt.subplots(figsize=(4.5, 4))
    ConfusionMatrixDisplay(evaluation.confusion, display_labels=evaluation.class_names).plot(
        ax=ax, colorbar=False, cmap="Blues", values_format="d"
    )
    title = f"{evaluation.split} confusion"
    if evaluation.threshold is not None:
        title += f" @ {evaluation.threshold:.3f}"
    ax.set_title(title)
    fig.tight_layout()
    return fig


def roc_pr_figure(
    split: str, y_true: np.ndarray, scores: np.ndarray, class_names: list[str]
) -> plt.Figure:
    """ROC and precision-recall curves side by side (one curve per class when multi-class)."""
    fig, (ax_roc, ax_pr) = plt.subplots(1, 2, figsize=(10, 4.2))
    y_true = np.asarray(y_true).astype(int).ravel()
    if scores.ndim == 1:
        curves = [(class_names[-1], y_true, scores)]
    else:
        curves = [(name, (y_true == i).astype(int), scores[:, i]) for i, name in
                  enumerate(class_names)]
    for name, y, s in curves:
        RocCurveDisplay.from_predictions(y, s, name=name, ax=ax_roc)
        PrecisionRecallDisplay.from_predictions(y, s, name=name, ax=ax_pr)
    ax_roc.plot([0, 1], [0, 1], "k--", lw=0.8)
    # scikit-learn's labels say "(Positive label: 1)", which names no class: each curve is
    # its class (against the rest when there are more than two), as the legend says.
    versus = " (each class vs the rest)" if scores.ndim == 2 else f" ({class_names[-1]})"
    ax_roc.set_xlabel("false positive rate")
    ax_roc.set_ylabel("true positive rate" + versus)
    ax_pr.set_xlabel("recall" + versus)
    ax_pr.set_ylabel("precision")
    ax_roc.set_title(f"{split} ROC")
    ax_pr.set_title(f"{split} precision-recall")
    fig.tight_layout()
    return fig


def history_figure(history: dict[str, list[float]]) -> plt.Figure:
    """Loss and accuracy curves per epoch, train against validation."""
    panels = [("loss", "loss"), ("accuracy", "accuracy"), ("auc", "AUC (Keras, indicative)")]
    panels = [p for p in panels if p[0] in history]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.8), squeeze=False)
    for ax, (key, label) in zip(axes[0], panels, strict=True):
        epochs = range(1, len(history[key]) + 1)
        ax.plot(epochs, history[key], "o-", label="train")
        if f"val_{key}" in history:
            ax.plot(epochs, history[f"val_{key}"], "o-", label="val")
        ax.set_xlabel("epoch")
        ax.set_title(label)
        ax.legend()
    fig.tight_layout()
    return fig
