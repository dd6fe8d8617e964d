"""Optimizers and learning-rate schedules, built from conf/optimizer and conf/lr_schedule.

A schedule is either a per-step `LearningRateSchedule` handed to the optimizer, or a float
learning rate plus a callback that changes it between epochs; `ScheduleSpec` carries both
so the trainer treats every kind the same way:

    spec = build_schedule(kind, initial_learning_rate=lr, steps_per_epoch=n, epochs=e, ...)
    optimizer = build_optimizer(name, learning_rate=spec.learning_rate, ...)
    model.fit(..., callbacks=[*spec.callbacks, ...])
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import keras

OPTIMIZERS = ("adam", "rmsprop", "sgd", "adamax")

# Each kind's parameters and defaults (the conf/lr_schedule YAMLs repeat these defaults).
SCHEDULE_PARAMS: dict[str, dict[str, Any]] = {
    "constant": {},
    "exponential": {"decay_steps": 200, "decay_rate": 0.9, "staircase": False},
    "exponential_epoch": {"s": 20},
    "plateau": {"monitor": "val_loss", "factor": 0.5, "patience": 2, "min_lr": 1e-6},
    "cosine": {"warmup_epochs": 1, "alpha": 0.0},
}

LearningRate = float | keras.optimizers.schedules.LearningRateSchedule


@dataclass
class ScheduleSpec:
    """What a schedule gives the trainer: the optimizer's learning rate and fit callbacks."""

    learning_rate: LearningRate
    callbacks: list[keras.callbacks.Callback] = field(default_factory=list)


def _check_range(key: str, value: Any, low: float, high: float, closed_high: bool = False) -> None:
    """Raise unless low <= value < high (or <= high when closed_high)."""
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    ok = ok and low <= value and (value <= high if closed_high else value < high)
    if not ok:
        bracket = "]" if closed_high else ")"
        allowed = f"a number in [{low}, {high}{bracket}"
        raise ValueError(f"{key}={value!r} is not valid; allowed: {allowed}")


def _check_int(key: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{key}={value!r} is not valid; allowed: an int >= {minimum}")


def _check_positive(key: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise ValueError(f"{key}={value!r} is not valid; allowed: a number > 0")


def build_optimizer(
    name: str = "adam",
    learning_rate: LearningRate = 1e-3,
    momentum: float = 0.9,
    nesterov: bool = False,
    rho: float = 0.9,
    beta_1: float = 0.9,
    beta_2: float = 0.999,
    weight_decay: float | None = None,
    clipnorm: float | None = None,
) -> keras.optimizers.Optimizer:
    """Build a Keras optimizer; each reads only its own knobs.

    adam, adamax: beta_1, beta_2. rmsprop: rho, momentum. sgd: momentum, nesterov.
    All: learning_rate, weight_decay (decoupled, as Keras applies it), clipnorm.

    Args:
        name: adam | rmsprop | sgd | adamax.
        learning_rate: A float > 0 or a `LearningRateSchedule` (see `build_schedule`).
        momentum: Momentum in [0, 1) for sgd and rmsprop.
        nesterov: Nesterov momentum (sgd).
        rho: Discount of the squared-gradient average in (0, 1) (rmsprop).
        beta_1: First-moment decay in [0, 1) (adam, adamax).
        beta_2: Second-moment decay in [0, 1) (adam, adamax).
        weight_decay: Decoupled weight decay >= 0, or None.
        clipnorm: Clip each gradient to this norm (> 0), or None.

    Returns:
        An unbuilt `keras.optimizers.Optimizer`.
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer.name={name!r} is not valid; allowed: {list(OPTIMIZERS)}")
    if not isinstance(learning_rate, keras.optimizers.schedules.LearningRateSchedule):
        _check_positive("optimizer.learning_rate", learning_rate)
        learning_rate = float(learning_rate)
    if weight_decay is not None:
        _check_range("optimizer.weight_decay", weight_decay, 0.0, 1.0)
    if clipnorm is not None:
        _check_positive("optimizer.clipnorm", clipnorm)
    common = {"learning_rate": learning_rate, "weight_decay": weight_decay, "clipnorm": clipnorm}
    if name in ("adam", "adamax"):
        _check_range("optimizer.beta_1", beta_1, 0.0, 1.0)
        _check_range("optimizer.beta_2", beta_2, 0.0, 1.0)
        cls = keras.optimizers.Adam if name == "adam" else keras.optimizers.Adamax
        return cls(beta_1=float(beta_1), beta_2=float(beta_2), **common)
    _check_range("optimizer.momentum", momentum, 0.0, 1.0)
    if name == "rmsprop":
        if not 0.0 < rho < 1.0:
            raise ValueError(f"optimizer.rho={rho!r} is not valid; allowed: a number in (0, 1)")
        return keras.optimizers.RMSprop(rho=float(rho), momentum=float(momentum), **common)
    if not isinstance(nesterov, bool):
        raise ValueError(f"optimizer.nesterov={nesterov!r} is not valid; allowed: true or false")
    return keras.optimizers.SGD(momentum=float(momentum), nesterov=nesterov, **common)


class ExponentialEpochDecay:
    """Per-epoch decay lr0 * 0.1 ** (epoch / s): the rate drops tenfold every `s` epochs.

    Keras has only per-step decays; this is the function a `LearningRateScheduler` calls.
    """

    def __init__(self, initial_learning_rate: float, s: float) -> None:
        self.initial_learning_rate = float(initial_learning_rate)
        self.s = float(s)

    def __call__(self, epoch: int, lr: float | None = None) -> float:
        return self.initial_learning_rate * 0.1 ** (epoch / self.s)


def build_schedule(
    kind: str = "constant",
    initial_learning_rate: float = 1e-3,
    steps_per_epoch: int = 1,
    epochs: int = 1,
    **params: Any,
) -> ScheduleSpec:
    """Build a learning-rate schedule and the callbacks that drive it.

    Kinds and params (defaults in `SCHEDULE_PARAMS`):
        constant: none.
        exponential: per step, lr0 * decay_rate ** (step / decay_steps) (keras
            ExponentialDecay; staircase floors the exponent).
        exponential_epoch: per epoch, lr0 * 0.1 ** (epoch / s) (LearningRateScheduler).
        plateau: multiply by `factor` after `patience` epochs without `monitor` improving,
            down to `min_lr` (ReduceLROnPlateau).
        cosine: linear warmup from 0 to lr0 over warmup_epochs * steps_per_epoch steps, then
            cosine decay to alpha * lr0 over the remaining steps (keras CosineDecay).

    Args:
        kind: constant | exponential | exponential_epoch | plateau | cosine.
        initial_learning_rate: lr0, the optimizer's base learning rate.
        steps_per_epoch: Optimizer steps per epoch (cosine converts epochs to steps).
        epochs: Planned (maximum) epochs; cosine decays over all of them.
        **params: The kind's own parameters.

    Returns:
        A `ScheduleSpec`: give `learning_rate` to the optimizer, `callbacks` to `fit`.
    """
    if kind not in SCHEDULE_PARAMS:
        allowed = list(SCHEDULE_PARAMS)
        raise ValueError(f"lr_schedule.kind={kind!r} is not valid; allowed: {allowed}")
    unknown = sorted(set(params) - set(SCHEDULE_PARAMS[kind]))
    if unknown:
        raise ValueError(
            f"lr_schedule.kind={kind} does not take {unknown}; "
            f"allowed params: {sorted(SCHEDULE_PARAMS[kind]) or 'none'}"
        )
    _check_positive("lr_schedule.initial_learning_rate", initial_learning_rate)
    _check_int("steps_per_epoch", steps_per_epoch, 1)
    _check_int("epochs", epochs, 1)
    p = {**SCHEDULE_PARAMS[kind], **params}
    lr0 = float(initial_learning_rate)

    if kind == "constant":
        return ScheduleSpec(lr0)
    if kind == "exponential":
        _check_positive("lr_schedule.decay_steps", p["decay_steps"])
        _check_range("lr_schedule.decay_rate", p["decay_rate"], 0.0, 1.0, closed_high=True)
        schedule = keras.optimizers.schedules.ExponentialDecay(
            lr0, p["decay_steps"], float(p["decay_rate"]), staircase=bool(p["staircase"])
        )
        return ScheduleSpec(schedule)
    if kind == "exponential_epoch":
        _check_positive("lr_schedule.s", p["s"])
        decay = ExponentialEpochDecay(lr0, p["s"])
        return ScheduleSpec(lr0, [keras.callbacks.LearningRateScheduler(decay)])
    if kind == "plateau":
        _check_range("lr_schedule.factor", p["factor"], 0.0, 1.0)
        if p["factor"] == 0:
            raise ValueError("lr_schedule.factor=0 is not valid; allowed: a number in (0, 1)")
        _check_int("lr_schedule.patience", p["patience"], 0)
        _check_range("lr_schedule.min_lr", p["min_lr"], 0.0, lr0, closed_high=True)
        callback = keras.callbacks.ReduceLROnPlateau(
            monitor=str(p["monitor"]),
            factor=float(p["factor"]),
            patience=p["patience"],
            min_lr=float(p["min_lr"]),
        )
        return ScheduleSpec(lr0, [callback])
    # cosine
    warmup_epochs = p["warmup_epochs"]
    _check_int("lr_schedule.warmup_epochs", warmup_epochs, 0)
    _check_range("lr_schedule.alpha", p["alpha"], 0.0, 1.0, closed_high=True)
    warmup_steps = warmup_epochs * steps_per_epoch
    decay_steps = epochs * steps_per_epoch - warmup_steps
    if decay_steps < 1:
        raise ValueError(
            f"lr_schedule.warmup_epochs={warmup_epochs} leaves no steps to decay over in "
            f"epochs={epochs}; allowed: warmup_epochs < epochs"
        )
    if warmup_steps == 0:
        schedule = keras.optimizers.schedules.CosineDecay(lr0, decay_steps, alpha=float(p["alpha"]))
    else:
        schedule = keras.optimizers.schedules.CosineDecay(
            0.0,
            decay_steps,
            alpha=float(p["alpha"]),
            warmup_target=lr0,
            warmup_steps=warmup_steps,
        )
    return ScheduleSpec(schedule)
