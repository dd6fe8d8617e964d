"""Bootstrap intervals and paired differences: vectorised metrics agree with scikit-learn."""

from __future__ import annotations

import numpy as np
import pytest

from search.evaluation import intervals as iv
from search.evaluation import metrics as ev

RNG = np.random.default_rng(7)
Y = (RNG.random(400) < 0.7).astype(int)
# rounded scores: many ties, which ROC AUC and average precision must handle as scikit-learn
S = np.round(np.clip(0.35 * Y + 0.65 * RNG.random(400), 0, 1), 2)
NAMES = ["normal", "pneumonia"]


def test_vectorised_binary_metrics_equal_scikit_learn_on_the_split_itself():
    rows = iv.metric_rows(Y, S, np.arange(len(Y))[None, :], NAMES, 0.5)
    expected = ev.evaluate_split("test", Y, S, NAMES, 0.5).metrics
    for name, values in rows.items():
        assert values[0] == pytest.approx(expected[name], abs=1e-12), name


def test_vectorised_multiclass_metrics_equal_scikit_learn():
    y = RNG.integers(0, 3, 300)
    s = RNG.dirichlet([1, 1, 1], 300)
    s[np.arange(300), y] += 0.4
    s = s / s.sum(axis=1, keepdims=True)
    names = ["bacteria", "normal", "virus"]
    rows = iv.metric_rows(y, s, np.arange(300)[None, :], names, None)
    expected = ev.evaluate_split("test", y, s, names).metrics
    assert set(rows) <= set(expected)
    for name, values in rows.items():
        assert values[0] == pytest.approx(expected[name], abs=1e-12), name


def test_resamples_keep_class_counts_and_the_seed_repeats():
    idx = iv.stratified_indices(Y, 50, seed=3)
    assert (Y[idx].sum(axis=1) == Y.sum()).all()
    assert (idx == iv.stratified_indices(Y, 50, seed=3)).all()
    assert not (idx == iv.stratified_indices(Y, 50, seed=4)).all()


def test_intervals_contain_the_point_value_and_shrink_with_more_images():
    point = ev.evaluate_split("test", Y, S, NAMES, 0.5).metrics
    found = iv.intervals(Y, S, NAMES, 0.5)
    assert set(found) >= {"accuracy", "sensitivity", "specificity", "roc_auc", "pr_auc", "f1"}
    for name, (low, high) in found.items():
        assert low <= point[name] <= high and low < high, name
    small = iv.intervals(Y[:60], S[:60], NAMES, 0.5)
    width = {k: found[k][1] - found[k][0] for k in found}
    assert all(small[k][1] - small[k][0] > width[k] for k in ("accuracy", "roc_auc"))
    assert iv.intervals(Y, S, NAMES, 0.5, iv.BootstrapSpec(resamples=0)) == {}


def test_paired_difference_decides_only_beyond_noise():
    better = np.clip(S + 0.25 * (Y - 0.5), 0, 1)  # pushes every image the right way
    diff = iv.paired_difference(Y, better, 0.5, S, 0.5, "roc_auc", NAMES)
    assert diff.decided and diff.low > 0 and diff.low <= diff.difference <= diff.high
    noisy = np.clip(S + RNG.normal(0, 0.01, len(S)), 0, 1)  # the same model, jittered
    same = iv.paired_difference(Y, noisy, 0.5, S, 0.5, "roc_auc", NAMES)
    assert not same.decided and same.low < 0 < same.high
    assert "paired bootstrap interval" in same.text() and "400 images" in same.text()


@pytest.mark.parametrize(("section", "message"), [
    ({"resamples": -1}, "resamples=-1"), ({"level": 1.0}, "level=1.0"),
    ({"n": 10}, "unknown evaluation.bootstrap key"),
])
def test_bootstrap_config_is_checked(section, message):
    with pytest.raises(ValueError, match=message):
        iv.BootstrapSpec.from_config(section)


def test_a_bare_number_for_bootstrap_names_the_key(compose_cfg):
    from search.evaluation.evaluate_run import bootstrap_spec

    with pytest.raises(ValueError, match=r"evaluation.bootstrap=0 must be a mapping.*resamples=0"):
        bootstrap_spec(compose_cfg("evaluation.bootstrap=0"))
    assert bootstrap_spec(compose_cfg("evaluation.bootstrap.resamples=0")).resamples == 0
