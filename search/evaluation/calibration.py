"""Probability calibration fitted on val, folded into the model's output layer.

`evaluation.calibration`:

- ``temperature`` (default): p' = σ(z / T) (softmax(z / T) for K classes), one parameter
  fitted by minimising the val negative log-likelihood;
- ``platt`` (binary only): p' = σ(a·z + b), a logistic regression on the val logit;
- ``none``: the probabilities the network trained to.

z is the output layer's pre-activation. Both maps are affine in z, so they fold exactly into
the ``output`` Dense layer's kernel and bias: the logged Keras model *is* the calibrated
model, loads in safe mode with no custom layer, and pull, predict, serving, Grad-CAM and
ensembles all see calibrated probabilities without knowing about calibration. Both maps are
increasing, so the ranking (ROC/PR AUC) and the decisions at a threshold chosen on val after
calibration are unchanged; what changes is what a probability means (val-calibrated, i.e.
at val's prevalence).

Why by hand: scikit-learn's ``CalibratedClassifierCV`` wraps an sklearn estimator and keeps its
maps private; here the map must become Keras weights. Platt's fit still is scikit-learn's
``LogisticRegression``, the temperature a bounded 1-D SciPy minimisation, the scores
``log_loss``'s NLL (computed directly, see ``nll``) and scikit-learn's ``brier_score_loss`` /
``CalibrationDisplay``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from scipy.optimize import minimize_scalar  # noqa: E402
from sklearn.calibration import CalibrationDisplay  # noqa: E402
from sklearn.linear_model import LogisticRegression  # noqa: E402
from sklearn.metrics import brier_score_loss  # noqa: E402

from search.evaluation.metric_maths import CALIBRATION_METHODS as METHODS  # noqa: E402

EPS = 1e-7  # float32 sigmoid/softmax saturate: logits beyond ±16 carry no information
ECE_BINS = 15


@dataclass(frozen=True)
class Calibration:
    """An affine map of the output logit: z' = scale·z + shift (shift only for Platt)."""

    method: str
    scale: float = 1.0
    shift: float = 0.0

    @property
    def temperature(self) -> float:
        return 1.0 / self.scale

    def apply(self, probs: np.ndarray) -> np.ndarray:
        """Calibrated probabilities from uncalibrated ones (N,) binary or (N, K)."""
        return _from_logits(self.scale * _logits(probs) + self.shift, probs.ndim)

    def invert(self, probs: np.ndarray) -> np.ndarray:
        """Uncalibrated probabilities from calibrated ones (to score 'before' on test)."""
        return _from_logits((_logits(probs) - self.shift) / self.scale, probs.ndim)

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Calibration:
        """From the model metadata's ``calibration`` entry (method, temperature, shift)."""
        return cls(str(record["method"]), 1.0 / float(record["temperature"]),
                   float(record.get("shift") or 0.0))

    def as_dict(self) -> dict[str, Any]:
        return {"method": self.method, "temperature": self.temperature, "scale": self.scale,
                "shift": self.shift}


def _logits(probs: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(probs, dtype=np.float64), EPS, 1 - EPS)
    if p.ndim == 1:
        return np.log(p) - np.log1p(-p)
    return np.log(p)  # softmax(log p) = p: log-probabilities are logits up to a constant


def _from_logits(z: np.ndarray, ndim: int) -> np.ndarray:
    if ndim == 1:
        return 1.0 / (1.0 + np.exp(-z))
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def nll(y: np.ndarray, probs: np.ndarray) -> float:
    """Mean negative log-likelihood of the true labels (binary: p of class 1).

    scikit-learn's ``log_loss`` computed directly (the same clipping: binary at EPS, then
    both at float64's eps): the temperature fit calls it ~30 times per trial, and
    ``log_loss``'s input validation was most of its cost."""
    y = np.asarray(y).astype(int).ravel()
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim == 1:
        p = np.clip(probs, EPS, 1 - EPS)
        truth = np.where(y == 1, p, 1.0 - p)
    else:
        truth = probs[np.arange(len(y)), y]
    eps = np.finfo(np.float64).eps
    return float(np.mean(-np.log(np.clip(truth, eps, 1 - eps))))


def ece(y: np.ndarray, probs: np.ndarray, bins: int = ECE_BINS) -> float:
    """Expected calibration error: top-label confidence against accuracy in equal-width bins.

    By hand: scikit-learn has the reliability curve but no ECE."""
    if probs.ndim == 1:
        confidence = np.where(probs >= 0.5, probs, 1 - probs)
        correct = (probs >= 0.5).astype(int) == y
    else:
        confidence = probs.max(axis=1)
        correct = probs.argmax(axis=1) == y
    index = np.minimum((confidence * bins).astype(int), bins - 1)
    gap = 0.0
    for b in np.unique(index):
        inside = index == b
        gap += inside.mean() * abs(correct[inside].mean() - confidence[inside].mean())
    return float(gap)


def brier(y: np.ndarray, probs: np.ndarray) -> float:
    """Brier score (binary: of class 1; K classes: mean over one-hot columns)."""
    if probs.ndim == 1:
        return float(brier_score_loss(y, probs))
    onehot = np.eye(probs.shape[1])[y]
    return float(np.mean(np.sum((probs - onehot) ** 2, axis=1)))


def fit_calibration(y: np.ndarray, probs: np.ndarray, method: str) -> Calibration:
    """Fit ``method`` on val labels and probabilities ((N,) binary, (N, K) otherwise)."""
    if method not in METHODS:
        raise ValueError(f"evaluation.calibration={method!r} is not one of {', '.join(METHODS)}")
    y = np.asarray(y).astype(int)
    if method == "none":
        return Calibration("none")
    if len(np.unique(y)) < 2:
        raise ValueError("cannot calibrate: the validation split holds only one class")
    z = _logits(probs)
    if method == "platt":
        if probs.ndim != 1:
            raise ValueError("evaluation.calibration=platt needs two classes; use temperature")
        fit = LogisticRegression(C=np.inf).fit(z.reshape(-1, 1), y)
        scale, shift = float(fit.coef_[0, 0]), float(fit.intercept_[0])
        if scale <= 0:  # a decreasing map would flip the model's ranking: keep it as trained
            return Calibration("none")
        return Calibration("platt", scale, shift)

    def loss(log_t: float) -> float:
        return nll(y, _from_logits(z / np.exp(log_t), probs.ndim))

    best = minimize_scalar(loss, bounds=(np.log(0.05), np.log(20.0)), method="bounded")
    return Calibration("temperature", float(np.exp(-best.x)))


def quality(y: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """NLL, Brier score and ECE of one set of probabilities."""
    return {"nll": nll(y, probs), "brier": brier(y, probs), "ece": ece(y, probs)}


def fold_into_output(model: Any, calibration: Calibration) -> bool:
    """Fold the map into the Dense layer named ``output`` (in place). False when the model
    has none (an ensemble: its members were calibrated one by one)."""
    import keras

    try:
        layer = model.get_layer("output")
    except ValueError:
        return False
    if not isinstance(layer, keras.layers.Dense):
        return False
    activation = keras.activations.serialize(layer.activation)
    if activation not in ("sigmoid", "softmax"):
        raise ValueError(f"cannot calibrate: the output layer's activation is {activation!r}, "
                         "not sigmoid or softmax")
    kernel, bias = layer.get_weights()
    layer.set_weights([kernel * calibration.scale, bias * calibration.scale + calibration.shift])
    return True


def reliability_figure(y: np.ndarray, before: np.ndarray, after: np.ndarray,
                       calibration: Calibration, class_names: list[str]) -> plt.Figure:
    """Reliability curves on val before and after calibration (top-label for K classes)."""
    fig, ax = plt.subplots(figsize=(5, 5))
    for probs, name in ((before, "as trained"), (after, f"{calibration.method} "
                                                        f"(T={calibration.temperature:.2f})")):
        if probs.ndim == 1:
            hit, confidence = y, probs
        else:
            hit, confidence = (probs.argmax(axis=1) == y).astype(int), probs.max(axis=1)
        CalibrationDisplay.from_predictions(hit, confidence, n_bins=10, ax=ax,
                                            name=f"{name}, ECE {ece(y, probs):.3f}")
    if before.ndim == 1:
        ax.set(title="val reliability", xlabel=f"mean predicted P({class_names[-1]})",
               ylabel=f"fraction {class_names[-1]}")
    else:
        ax.set(title="val reliability (top label)", xlabel="mean confidence of the top class",
               ylabel="fraction correct")
    fig.tight_layout()
    return fig
