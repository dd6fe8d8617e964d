"""Stratified, seeded bootstrap intervals of held-out metrics, and paired differences.

Each resample draws, within every class, as many images as the class has (with replacement),
so every resample keeps the split's class counts and the AUCs stay defined. The metrics are
computed for all resamples at once (NumPy over a (resamples, images) index matrix): scikit-
learn's one-call-per-resample functions take seconds per split, which a sweep pays per trial.
The vectorised formulas reproduce scikit-learn's values on the unresampled split (tests check
it): ROC AUC by average ranks (Mann-Whitney), average precision by tied-score groups.

`paired_difference` resamples the same images for two models (one index matrix), so a
challenger is judged on how it differs from the champion image by image, not on two
independent intervals.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from scipy.stats import rankdata

DEFAULT_RESAMPLES = 1000
DEFAULT_LEVEL = 0.95
CHUNK = 250  # resamples per vectorised block: bounds memory at CHUNK x n_images per array


@dataclass(frozen=True)
class BootstrapSpec:
    """How intervals are drawn (`evaluation.bootstrap`)."""

    resamples: int = DEFAULT_RESAMPLES
    level: float = DEFAULT_LEVEL
    seed: int = 0

    @classmethod
    def from_config(cls, section: dict | None) -> BootstrapSpec:
        """From `evaluation.bootstrap` ({resamples, level, seed}); missing keys keep defaults."""
        section = dict(section or {})
        unknown = sorted(set(section) - {"resamples", "level", "seed"})
        if unknown:
            raise ValueError(f"unknown evaluation.bootstrap key(s) {unknown}; allowed: "
                             "resamples, level, seed")
        spec = cls(int(section.get("resamples", DEFAULT_RESAMPLES)),
                   float(section.get("level", DEFAULT_LEVEL)), int(section.get("seed", 0)))
        if spec.resamples < 0:
            raise ValueError(f"evaluation.bootstrap.resamples={spec.resamples} must be >= 0 "
                             "(0 = no intervals)")
        if not 0.5 <= spec.level < 1.0:
            raise ValueError(f"evaluation.bootstrap.level={spec.level} must be in [0.5, 1)")
        return spec


def stratified_indices(y: np.ndarray, resamples: int, seed: int) -> np.ndarray:
    """(resamples, n) indices into y; each row keeps every class's count."""
    y = np.asarray(y).astype(int).ravel()
    rng = np.random.default_rng(seed)
    out = np.empty((resamples, len(y)), dtype=np.int64)
    start = 0
    for c in np.unique(y):
        members = np.flatnonzero(y == c)
        out[:, start:start + len(members)] = rng.choice(members, (resamples, len(members)))
        start += len(members)
    return out


def _chunks(idx: np.ndarray) -> Iterator[np.ndarray]:
    for start in range(0, len(idx), CHUNK):
        yield idx[start:start + CHUNK]


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    return np.where(den > 0, num / np.maximum(den, 1), 0.0)


def roc_auc_rows(y: np.ndarray, s: np.ndarray) -> np.ndarray:
    """ROC AUC per row of (rows, n) labels/scores (average ranks: ties count one half)."""
    pos = y.sum(axis=1)
    neg = y.shape[1] - pos
    ranks = rankdata(s, axis=1)
    auc = ((ranks * y).sum(axis=1) - pos * (pos + 1) / 2) / np.maximum(pos * neg, 1)
    return np.where((pos > 0) & (neg > 0), auc, np.nan)


def average_precision_rows(y: np.ndarray, s: np.ndarray) -> np.ndarray:
    """Average precision per row, as scikit-learn: precision at the end of each tied group."""
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
    return np.where(pos > 0, ap, np.nan)


def binary_rows(y: np.ndarray, s: np.ndarray, threshold: float) -> dict[str, np.ndarray]:
    """evaluate_split's binary metrics for each row."""
    pred = s >= threshold
    tp = (pred & (y == 1)).sum(axis=1)
    fp = (pred & (y == 0)).sum(axis=1)
    fn = (~pred & (y == 1)).sum(axis=1)
    tn = (~pred & (y == 0)).sum(axis=1)
    n = y.shape[1]
    sensitivity = _safe_div(tp, tp + fn)
    return {
        "accuracy": (tp + tn) / n,
        "precision": _safe_div(tp, tp + fp),
        "recall": sensitivity,
        "sensitivity": sensitivity,
        "specificity": _safe_div(tn, tn + fp),
        "f1": _safe_div(2 * tp, 2 * tp + fp + fn),
        "roc_auc": roc_auc_rows(y, s),
        "pr_auc": average_precision_rows(y, s),
    }


def multiclass_rows(y: np.ndarray, s: np.ndarray, class_names: list[str]
                    ) -> dict[str, np.ndarray]:
    """evaluate.multiclass_metrics for each row of (rows, n) labels and (rows, n, K) scores."""
    from search.config_checks import MACRO_NAMES
    from search.evaluation.keras_metrics import (
        class_keys,  # imports Keras: not at config-check time
    )

    k = len(class_names)
    rows = y.shape[0]
    pred = s.argmax(axis=2)
    flat = (np.arange(rows)[:, None] * k * k + y * k + pred).ravel()
    cm = np.bincount(flat, minlength=rows * k * k).reshape(rows, k, k)
    diag = np.diagonal(cm, axis1=1, axis2=2)
    true, predicted = cm.sum(axis=2), cm.sum(axis=1)
    recall = _safe_div(diag, true)
    precision = _safe_div(diag, predicted)
    f1 = _safe_div(2 * diag, true + predicted)
    fp = predicted - diag
    tn = y.shape[1] - true - fp
    out = {
        "accuracy": diag.sum(axis=1) / y.shape[1],
        MACRO_NAMES["precision"]: precision.mean(axis=1),
        MACRO_NAMES["recall"]: recall.mean(axis=1),
        MACRO_NAMES["specificity"]: _safe_div(tn, tn + fp).mean(axis=1),
        MACRO_NAMES["f1"]: f1.mean(axis=1),
        "roc_auc": np.mean([roc_auc_rows((y == c).astype(int), s[:, :, c])
                            for c in range(k)], axis=0),
        "pr_auc": np.mean([average_precision_rows((y == c).astype(int), s[:, :, c])
                           for c in range(k)], axis=0),
    }
    for i, key in enumerate(class_keys(class_names)):
        out[f"recall_{key}"] = recall[:, i]
        out[f"precision_{key}"] = precision[:, i]
        out[f"f1_{key}"] = f1[:, i]
    return out


def metric_rows(y: np.ndarray, scores: np.ndarray, idx: np.ndarray, class_names: list[str],
                threshold: float | None) -> dict[str, np.ndarray]:
    """Every metric for each resample (row of idx)."""
    y = np.asarray(y).astype(int).ravel()
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim == 1:
        return binary_rows(y[idx], scores[idx], 0.5 if threshold is None else float(threshold))
    return multiclass_rows(y[idx], scores[idx], class_names)


def _percentiles(samples: np.ndarray, level: float) -> tuple[float, float]:
    finite = samples[np.isfinite(samples)]
    if len(finite) < 0.9 * len(samples):  # mostly undefined: no honest interval
        return float("nan"), float("nan")
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(finite, [tail, 100 - tail])
    return float(low), float(high)


def intervals(y: np.ndarray, scores: np.ndarray, class_names: list[str],
              threshold: float | None, spec: BootstrapSpec = BootstrapSpec()
              ) -> dict[str, tuple[float, float]]:
    """{metric: (low, high)}: percentile intervals over stratified resamples of one split.

    The threshold stays fixed (it was chosen on val, not on the resampled split), so the
    intervals describe this model at its stored operating point.
    """
    if spec.resamples == 0 or len(np.unique(np.asarray(y).astype(int))) < 1:
        return {}
    idx = stratified_indices(y, spec.resamples, spec.seed)
    parts: dict[str, list[np.ndarray]] = {}
    for block in _chunks(idx):
        for name, values in metric_rows(y, scores, block, class_names, threshold).items():
            parts.setdefault(name, []).append(values)
    return {name: _percentiles(np.concatenate(v), spec.level) for name, v in parts.items()}


@dataclass
class PairedDifference:
    """new - champion on the same resampled images, for one metric."""

    metric: str
    difference: float  # on the split itself
    low: float
    high: float
    level: float
    n: int
    resamples: int

    @property
    def decided(self) -> bool:
        """Whether the interval excludes zero (the models differ beyond noise)."""
        return bool(np.isfinite(self.low) and (self.low > 0 or self.high < 0))

    def text(self) -> str:
        return (f"{self.metric} difference {self.difference:+.4f}, {self.level:.0%} paired "
                f"bootstrap interval [{self.low:+.4f}, {self.high:+.4f}] on {self.n} images")


def paired_difference(y: np.ndarray, new: np.ndarray, new_threshold: float | None,
                      champion: np.ndarray, champion_threshold: float | None, metric: str,
                      class_names: list[str], spec: BootstrapSpec = BootstrapSpec()
                      ) -> PairedDifference:
    """Interval of metric(new) - metric(champion), both at their own stored thresholds."""
    y = np.asarray(y).astype(int).ravel()
    resamples = max(spec.resamples, 1)
    whole = np.arange(len(y))[None, :]
    point = (metric_rows(y, new, whole, class_names, new_threshold)[metric]
             - metric_rows(y, champion, whole, class_names, champion_threshold)[metric])[0]
    idx = stratified_indices(y, resamples, spec.seed)
    diffs = np.concatenate([
        metric_rows(y, new, block, class_names, new_threshold)[metric]
        - metric_rows(y, champion, block, class_names, champion_threshold)[metric]
        for block in _chunks(idx)
    ])
    low, high = _percentiles(diffs, spec.level)
    return PairedDifference(metric, float(point), low, high, spec.level, len(y), resamples)
