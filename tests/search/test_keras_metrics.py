"""The per-epoch K-class metrics equal scikit-learn's on the same predictions."""

import keras
import numpy as np
import pytest
from sklearn.metrics import recall_score, roc_auc_score

from search.evaluation.keras_metrics import (
    SparseClassRecall,
    SparseMacroAUC,
    multiclass_metrics,
)
from search.evaluation.metric_maths import class_keys


def test_per_epoch_macro_auc_and_class_recall_match_scikit_learn():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 300)
    p = rng.dirichlet([1, 1, 1, 1], 300)
    p[np.arange(300), y] += 0.4
    p /= p.sum(axis=1, keepdims=True)
    metrics = multiclass_metrics(["a", "b", "c", "d"])
    assert [m.name for m in metrics] == ["accuracy", "auc", "recall_a", "recall_b", "recall_c",
                                         "recall_d"]
    for m in metrics:
        m.update_state(y[:, None].astype("int32"), p.astype("float32"))
    got = {m.name: float(m.result()) for m in metrics}
    # Keras' AUC interpolates over 200 thresholds: close to the exact value, not equal
    assert got["auc"] == pytest.approx(roc_auc_score(y, p, multi_class="ovr"), abs=2e-3)
    expected = recall_score(y, p.argmax(axis=1), average=None)
    for key, value in zip("abcd", expected, strict=True):
        assert got[f"recall_{key}"] == pytest.approx(value, abs=1e-6)
    assert got["accuracy"] == pytest.approx(np.mean(p.argmax(axis=1) == y))


def test_metrics_survive_a_safe_mode_round_trip(tmp_path):
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(inputs))
    model.compile(loss="sparse_categorical_crossentropy",
                  metrics=multiclass_metrics(["normal", "bacteria", "virus"]))
    x, y = np.random.default_rng(1).normal(size=(32, 4)), np.arange(32) % 3
    model.fit(x, y, epochs=1, verbose=0)
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras", safe_mode=True)
    before = model.evaluate(x, y, return_dict=True, verbose=0)
    after = loaded.evaluate(x, y, return_dict=True, verbose=0)
    assert set(after) == {"loss", "accuracy", "auc", "recall_normal", "recall_bacteria",
                          "recall_virus"}
    assert after == pytest.approx(before)
    assert isinstance(SparseMacroAUC.from_config(SparseMacroAUC(3).get_config()), SparseMacroAUC)
    assert SparseClassRecall.from_config(SparseClassRecall(2, 3).get_config()).class_id == 2


def test_class_keys_are_metric_safe_and_unique():
    assert class_keys(["NORMAL", "Viral pneumonia", "viral-pneumonia", "???"]) == [
        "normal", "viral_pneumonia", "viral_pneumonia_2", "class"]
