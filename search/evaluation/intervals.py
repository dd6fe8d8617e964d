"""Stratified, seeded bootstrap intervals of held-out metrics, and paired differences.

Each resample draws, within every class, as many images as the class has (with replacement),
so every resample keeps the split's class counts and the AUCs stay defined. The metrics are
computed for all resamples at once by `metric_maths.metric_rows` (NumPy over a (resamples,
images) index matrix), the same function that gives the point values on the identity
resample: scikit-learn's one-call-per-resample functions take seconds per split, which a
sweep pays per trial.

`paired_difference` resamples the same images for two models (one index matrix), so a
challenger is judged on how it differs from the champion image by image, not on two
independent intervals.

A run keeps its intervals in `evaluation/<split>_intervals.json` (`INTERVALS_ARTIFACT`), not
as metric series; `flat_intervals` gives them the `<metric>_ci_low/_ci_high` keys that the run
description, model_info.json and the model card read.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from search.evaluation.evaluation_settings import DEFAULTS
from search.evaluation.metric_maths import identity_index, metric_rows

DEFAULT_RESAMPLES = DEFAULTS.bootstrap.resamples
DEFAULT_LEVEL = DEFAULTS.bootstrap.level
CHUNK = 250  # resamples per vectorised block: bounds memory at CHUNK x n_images per array


@dataclass(frozen=True)
class BootstrapSpec:
    """How intervals are drawn (`evaluation.bootstrap`)."""

    resamples: int = DEFAULT_RESAMPLES
    level: float = DEFAULT_LEVEL
    seed: int = DEFAULTS.bootstrap.seed

    @classmethod
    def from_config(cls, section: dict | None) -> BootstrapSpec:
        """From `evaluation.bootstrap` ({resamples, level, seed}); missing keys keep defaults."""
        section = dict(section or {})
        unknown = sorted(set(section) - {"resamples", "level", "seed"})
        if unknown:
            raise ValueError(f"unknown evaluation.bootstrap key(s) {unknown}; allowed: "
                             "resamples, level, seed")
        spec = cls(int(section.get("resamples", DEFAULT_RESAMPLES)),
                   float(section.get("level", DEFAULT_LEVEL)),
                   int(section.get("seed", DEFAULTS.bootstrap.seed)))
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
    whole = identity_index(len(y))
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


# ---------------------------------------------------------------------------------------------
# Where a run keeps its intervals: one JSON artifact per held-out split, not metric series
# (two extra series per metric buried a trial's ~29 series under 14 more, issue 28).

INTERVALS_ARTIFACT = "evaluation/{split}_intervals.json"  # {metric: [low, high]}
_ARTIFACT = re.compile(r"^evaluation/(?P<split>[A-Za-z0-9_]+)_intervals\.json$")


def metric_prefix(split: str) -> str:
    """The run-metric prefix of a split's values: `eval_test_` (Keras' per-epoch series own
    `val_*`), `ext_<name>_` for an external set (whose split is `ext_<name>`)."""
    return f"{split}_" if split.startswith("ext_") else f"eval_{split}_"


def artifact_split(path: str) -> str | None:
    """The split an `evaluation/<split>_intervals.json` artifact path holds, else None."""
    found = _ARTIFACT.match(path)
    return found["split"] if found else None


def flat_intervals(found: Mapping[str, Sequence[float | None] | None],
                   prefix: str) -> dict[str, float]:
    """`{prefix}{metric}_ci_low/_ci_high` for every finite interval: the keys the run
    description, model_info.json and the model card read."""
    out = {}
    for name, pair in found.items():
        low, high = (list(pair or []) + [None, None])[:2]
        if low is not None and high is not None and np.isfinite(low) and np.isfinite(high):
            out[f"{prefix}{name}_ci_low"], out[f"{prefix}{name}_ci_high"] = (float(low),
                                                                            float(high))
    return out
