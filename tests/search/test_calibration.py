"""Calibration fitted on val: the maps recover known distortions, fold exactly into a real
Keras output layer (safe-mode round trip included) and never change the ranking."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from search.config_checks import ConfigError, check_threshold_rule
from search.evaluation import calibration as cal


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-z))


def drawn(n: int = 20000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """True logits and labels drawn from them."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0.5, 2.0, n)
    return z, (rng.random(n) < sigmoid(z)).astype(int)


def test_temperature_recovers_an_over_confident_models_factor_and_keeps_the_ranking():
    z, y = drawn()
    over = sigmoid(3.0 * z)  # three times too confident
    fitted = cal.fit_calibration(y, over, "temperature")
    assert fitted.temperature == pytest.approx(3.0, rel=0.08)
    after = fitted.apply(over)
    assert cal.nll(y, after) < cal.nll(y, over) - 0.05
    assert cal.ece(y, after) < cal.ece(y, over) / 2
    assert roc_auc_score(y, after) == pytest.approx(roc_auc_score(y, over), abs=1e-12)
    np.testing.assert_allclose(fitted.invert(after), over, atol=1e-6)


def test_platt_recovers_slope_and_shift():
    z, y = drawn(seed=1)
    model = sigmoid((z + 1.0) / 0.5)  # true logit = 0.5 * model logit - 1
    fitted = cal.fit_calibration(y, model, "platt")
    assert (fitted.scale, fitted.shift) == (pytest.approx(0.5, rel=0.08),
                                            pytest.approx(-1.0, abs=0.1))


def test_k_class_temperature_and_platt_refused():
    rng = np.random.default_rng(2)
    logits = rng.normal(0, 1.5, (6000, 3))
    true = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    y = np.array([rng.choice(3, p=p) for p in true])
    over = np.exp(2.5 * logits) / np.exp(2.5 * logits).sum(axis=1, keepdims=True)
    fitted = cal.fit_calibration(y, over, "temperature")
    assert fitted.temperature == pytest.approx(2.5, rel=0.1)
    np.testing.assert_allclose(fitted.apply(over), true, atol=0.03)
    with pytest.raises(ValueError, match="platt needs two classes"):
        cal.fit_calibration(y, over, "platt")
    with pytest.raises(ValueError, match="evaluation.calibration='isotonic'"):
        cal.fit_calibration(y, over, "isotonic")


def test_ece_by_hand():
    # Two bins: confidence 0.9 (3 right of 4 -> gap 0.15) and 0.6 (1 of 2 -> gap 0.1),
    # weighted 4/6 and 2/6: 0.1 + 0.0333 = 0.1333.
    probs = np.array([0.9, 0.9, 0.1, 0.1, 0.6, 0.4])
    y = np.array([1, 1, 0, 1, 1, 1])
    assert cal.ece(y, probs) == pytest.approx(0.15 * 4 / 6 + 0.1 * 2 / 6)


@pytest.mark.parametrize("classes", [2, 3])
def test_folding_into_a_real_output_layer_is_exact_and_survives_safe_mode(tmp_path, classes):
    from models.cnn import output_layer

    keras.utils.set_random_seed(0)
    inputs = keras.Input((8,))
    hidden = keras.layers.Dense(16, activation="relu")(inputs)
    model = keras.Model(inputs, output_layer(classes)(hidden))
    x = np.random.default_rng(3).normal(0, 1, (200, 8)).astype("float32")  # unsaturated
    before = model.predict(x, verbose=0)
    before = before[:, 0] if classes == 2 else before
    calibration = cal.Calibration("platt", 0.4, 0.3) if classes == 2 else cal.Calibration(
        "temperature", 0.4)
    assert cal.fold_into_output(model, calibration)
    after = model.predict(x, verbose=0)
    after = after[:, 0] if classes == 2 else after
    np.testing.assert_allclose(after, calibration.apply(before), atol=1e-5)
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras", safe_mode=True, compile=False)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0),
                               atol=1e-7)


def test_a_model_without_its_own_output_layer_is_left_alone():
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(1, activation="sigmoid", name="head")(inputs))
    assert not cal.fold_into_output(model, cal.Calibration("temperature", 0.5))


def test_platt_for_k_classes_is_refused_before_training():
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"evaluation": {"threshold_rule": "min_sensitivity",
                                           "calibration": "platt"}})
    check_threshold_rule(cfg, ["a", "b"])  # two classes: fine
    with pytest.raises(ConfigError, match="evaluation.calibration=platt needs two classes"):
        check_threshold_rule(cfg, ["a", "b", "c"])
