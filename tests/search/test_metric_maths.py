"""One implementation of every metric: the point values are the bootstrap's maths on the split."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from scipy.stats import rankdata

from search import config_checks as cc
from search.evaluation import intervals as iv
from search.evaluation import metric_maths as mm
from search.evaluation import metrics as ev

RNG = np.random.default_rng(3)


def _binary(n: int, positives: float = 0.6) -> tuple[np.ndarray, np.ndarray]:
    y = (RNG.random(n) < positives).astype(int)
    return y, np.round(np.clip(0.3 * y + 0.7 * RNG.random(n), 0, 1), 2)  # rounded: ties


def _multiclass(n: int, k: int, classes: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    y = RNG.integers(0, classes or k, n)
    p = RNG.dirichlet([1] * k, n)
    p[np.arange(n), y] += 0.3
    p[: n // 4] = p[0]  # tied rows
    return y, p / p.sum(axis=1, keepdims=True)


CASES = {
    "binary": (*_binary(300), ["normal", "pneumonia"], 0.45),
    "binary no threshold": (*_binary(41), ["normal", "pneumonia"], None),
    "binary all positive": (np.ones(20, int), RNG.random(20), ["normal", "pneumonia"], 0.5),
    "three classes": (*_multiclass(200, 3), ["Normal", "Viral pneumonia", "viral-pneumonia"],
                      None),
    "four classes": (*_multiclass(90, 4), ["a", "b", "c", "d"], None),
    "a class missing": (*_multiclass(30, 3, classes=2), ["a", "b", "c"], None),
}


def _same(a: float, b: float) -> bool:
    return a == b or (np.isnan(a) and np.isnan(b))


@pytest.mark.parametrize("case", CASES)
def test_point_value_is_the_bootstrap_function_on_the_identity_resample(case):
    y, scores, names, threshold = CASES[case]
    rows = iv.metric_rows(y, scores, mm.identity_index(len(y)), names, threshold)
    metrics = ev.evaluate_split("test", y, scores, names, threshold, loss=0.1).metrics
    assert set(metrics) - set(rows) == ({"loss", "threshold"} if scores.ndim == 1 else {"loss"})
    for name, values in rows.items():
        assert values.shape == (1,)
        assert _same(metrics[name], float(values[0])), name  # exactly, NaN included


@pytest.mark.parametrize("case", CASES)
def test_resamples_are_computed_by_the_same_function_row_by_row(case):
    y, scores, names, threshold = CASES[case]
    idx = iv.stratified_indices(y, 7, seed=1)
    batch = iv.metric_rows(y, scores, idx, names, threshold)
    for r in range(len(idx)):
        one = mm.point_metrics(y[idx[r]], scores[idx[r]], names, threshold)
        for name, values in batch.items():
            assert _same(one[name], float(values[r])), (name, r)


def test_every_named_metric_is_computed():
    y, s, names, threshold = CASES["binary"]
    binary = iv.metric_rows(y, s, mm.identity_index(len(y)), names, threshold)
    assert tuple(binary) == mm.BINARY_METRICS
    y, p, names, _ = CASES["four classes"]
    multi = iv.metric_rows(y, p, mm.identity_index(len(y)), names, None)
    for metric in mm.PER_CLASS_METRICS:
        assert {f"{metric}_{key}" for key in "abcd"} <= set(multi)
    assert set(mm.MACRO_NAMES.values()) <= set(multi)
    for name in (*mm.RANKING_METRICS, *mm.VAL_METRICS):
        assert name == "loss" or name in binary or name in multi, name


def test_average_ranks_equal_scipy_bit_for_bit():
    for decimals in (0, 1, 2, 6):
        s = np.round(RNG.random((5, 97)), decimals)
        for values in (s, s.astype(np.float32)):
            assert (mm.average_ranks(values) == rankdata(values, axis=1)).all()


def test_config_checks_reexport_the_owners_names_and_stay_light():
    for name in ("MACRO_NAMES", "RANKING_METRICS", "VAL_METRICS", "THRESHOLD_RULES",
                 "CALIBRATION_METHODS", "EPOCH_METRICS", "EPOCH_COUNTERPART"):
        assert getattr(cc, name) is getattr(mm, name), name
    loaded = subprocess.run(
        [sys.executable, "-c", "import sys, search.config_checks; print(sorted("
         "m for m in ('sklearn', 'scipy', 'keras', 'tensorflow') if m in sys.modules))"],
        capture_output=True, text=True, check=True)
    assert loaded.stdout.strip() == "[]"
