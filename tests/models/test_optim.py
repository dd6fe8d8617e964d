"""Optimizers and learning-rate schedules against their formulas."""

from __future__ import annotations

import math
from pathlib import Path

import keras
import numpy as np
import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

import models
from models.optim import SCHEDULE_PARAMS, ScheduleSpec, build_optimizer, build_schedule

LR0 = 1e-2


def lr_at(schedule: keras.optimizers.schedules.LearningRateSchedule, step: int) -> float:
    return float(keras.ops.convert_to_numpy(schedule(step)))


def test_adam_and_its_moments() -> None:
    optimizer = build_optimizer("adam", learning_rate=3e-4, beta_1=0.8, beta_2=0.99)
    assert isinstance(optimizer, keras.optimizers.Adam)
    assert optimizer.learning_rate.numpy() == pytest.approx(3e-4)
    assert (optimizer.beta_1, optimizer.beta_2) == (0.8, 0.99)


def test_adamax_and_its_moments() -> None:
    optimizer = build_optimizer("adamax", learning_rate=2e-3, beta_1=0.85, beta_2=0.95)
    assert isinstance(optimizer, keras.optimizers.Adamax)
    assert (optimizer.beta_1, optimizer.beta_2) == (0.85, 0.95)


def test_rmsprop_reads_rho_and_momentum() -> None:
    optimizer = build_optimizer("rmsprop", learning_rate=1e-3, rho=0.95, momentum=0.0)
    assert isinstance(optimizer, keras.optimizers.RMSprop)
    assert (optimizer.rho, optimizer.momentum) == (0.95, 0.0)


def test_sgd_with_nesterov_momentum_weight_decay_and_clipping() -> None:
    optimizer = build_optimizer(
        "sgd", learning_rate=1e-2, momentum=0.9, nesterov=True, weight_decay=1e-4, clipnorm=1.0
    )
    assert isinstance(optimizer, keras.optimizers.SGD)
    assert (optimizer.momentum, optimizer.nesterov) == (0.9, True)
    assert (optimizer.weight_decay, optimizer.clipnorm) == (1e-4, 1.0)
    assert optimizer.learning_rate.numpy() == pytest.approx(1e-2)


def test_sgd_step_follows_the_momentum_rule() -> None:
    # One plain SGD step with momentum: v = -lr * g; w += v (Keras' formulation).
    optimizer = build_optimizer("sgd", learning_rate=0.1, momentum=0.9)
    variable = keras.Variable([1.0, 2.0])
    optimizer.apply_gradients([(keras.ops.convert_to_tensor([0.5, -1.0]), variable)])
    np.testing.assert_allclose(variable.numpy(), [0.95, 2.1], rtol=1e-6)


def test_optimizer_accepts_a_schedule() -> None:
    schedule = build_schedule("exponential", initial_learning_rate=LR0).learning_rate
    optimizer = build_optimizer("adam", learning_rate=schedule)
    # The schedule itself is kept (and evaluated per step), not a float snapshot.
    assert optimizer.get_config()["learning_rate"]["class_name"] == "ExponentialDecay"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "adagrad"}, r"optimizer\.name='adagrad'.*'adam', 'rmsprop', 'sgd', 'adamax'"),
        ({"learning_rate": 0.0}, r"optimizer\.learning_rate=0\.0.*> 0"),
        ({"learning_rate": "fast"}, r"optimizer\.learning_rate='fast'"),
        ({"name": "sgd", "momentum": 1.0}, r"optimizer\.momentum=1\.0.*\[0\.0, 1\.0\)"),
        ({"name": "adam", "beta_2": 1.2}, r"optimizer\.beta_2=1\.2"),
        ({"name": "rmsprop", "rho": 0.0}, r"optimizer\.rho=0\.0.*\(0, 1\)"),
        ({"clipnorm": -1.0}, r"optimizer\.clipnorm=-1\.0"),
        ({"weight_decay": -0.1}, r"optimizer\.weight_decay=-0\.1"),
    ],
)
def test_bad_optimizer_values_raise(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_optimizer(**kwargs)


def test_constant_schedule_is_the_float_and_no_callbacks() -> None:
    assert build_schedule("constant", initial_learning_rate=LR0) == ScheduleSpec(LR0, [])


def test_exponential_decays_per_step() -> None:
    spec = build_schedule("exponential", initial_learning_rate=LR0, decay_steps=100, decay_rate=0.5)
    assert spec.callbacks == []
    for step in (0, 50, 100, 300):
        assert lr_at(spec.learning_rate, step) == pytest.approx(LR0 * 0.5 ** (step / 100))


def test_exponential_staircase_floors_the_exponent() -> None:
    schedule = build_schedule(
        "exponential", initial_learning_rate=LR0, decay_steps=100, decay_rate=0.5, staircase=True
    ).learning_rate
    assert lr_at(schedule, 99) == pytest.approx(LR0)
    assert lr_at(schedule, 150) == pytest.approx(LR0 * 0.5)


def test_exponential_epoch_drops_tenfold_every_s_epochs() -> None:
    spec = build_schedule("exponential_epoch", initial_learning_rate=LR0, s=20)
    assert spec.learning_rate == LR0
    (callback,) = spec.callbacks
    assert isinstance(callback, keras.callbacks.LearningRateScheduler)
    for epoch, expected in ((0, LR0), (10, LR0 * 0.1**0.5), (20, LR0 * 0.1), (40, LR0 * 0.01)):
        assert callback.schedule(epoch, None) == pytest.approx(expected)


def test_exponential_epoch_callback_sets_the_optimizer_rate_during_fit() -> None:
    spec = build_schedule("exponential_epoch", initial_learning_rate=LR0, s=1)
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(optimizer=build_optimizer("sgd", learning_rate=spec.learning_rate), loss="mse")
    seen: list[float] = []
    record = keras.callbacks.LambdaCallback(
        on_epoch_begin=lambda epoch, logs: seen.append(float(model.optimizer.learning_rate))
    )
    x = np.zeros((4, 2), dtype="float32")
    model.fit(x, x[:, :1], epochs=3, verbose=0, callbacks=[*spec.callbacks, record])
    np.testing.assert_allclose(seen, [LR0, LR0 * 0.1, LR0 * 0.01], rtol=1e-5)


def test_plateau_returns_a_configured_callback() -> None:
    spec = build_schedule("plateau", initial_learning_rate=LR0, factor=0.2, patience=3)
    assert spec.learning_rate == LR0
    (callback,) = spec.callbacks
    assert isinstance(callback, keras.callbacks.ReduceLROnPlateau)
    assert (callback.monitor, callback.factor, callback.patience, callback.min_lr) == (
        "val_loss",
        0.2,
        3,
        1e-6,
    )


def test_cosine_warms_up_then_decays_to_alpha() -> None:
    steps, epochs, alpha = 10, 5, 0.1
    schedule = build_schedule(
        "cosine",
        initial_learning_rate=LR0,
        steps_per_epoch=steps,
        epochs=epochs,
        warmup_epochs=1,
        alpha=alpha,
    ).learning_rate
    warmup, decay = steps, steps * (epochs - 1)
    # Linear ramp 0 -> lr0 over the first epoch.
    assert lr_at(schedule, 0) == pytest.approx(0.0)
    assert lr_at(schedule, 5) == pytest.approx(LR0 * 5 / warmup)
    assert lr_at(schedule, warmup) == pytest.approx(LR0)
    # Then cosine from lr0 to alpha * lr0 over the remaining steps.
    for step in (15, 30, warmup + decay):
        fraction = (step - warmup) / decay
        expected = LR0 * ((1 - alpha) * 0.5 * (1 + math.cos(math.pi * fraction)) + alpha)
        assert lr_at(schedule, step) == pytest.approx(expected, rel=1e-5)
    rates = [lr_at(schedule, s) for s in range(warmup + decay + 1)]
    assert rates.index(max(rates)) == warmup
    assert all(b <= a + 1e-12 for a, b in zip(rates[warmup:], rates[warmup + 1 :], strict=False))


def test_cosine_without_warmup_starts_at_lr0() -> None:
    schedule = build_schedule(
        "cosine", initial_learning_rate=LR0, steps_per_epoch=4, epochs=2, warmup_epochs=0
    ).learning_rate
    assert lr_at(schedule, 0) == pytest.approx(LR0)
    assert lr_at(schedule, 8) == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"kind": "linear"}, r"lr_schedule\.kind='linear'.*'constant', 'exponential'"),
        ({"kind": "constant", "decay_rate": 0.5}, r"kind=constant does not take \['decay_rate'\]"),
        ({"kind": "plateau", "s": 3, "x": 1}, r"does not take \['s', 'x'\].*'factor'"),
        ({"kind": "exponential", "decay_rate": 1.5}, r"lr_schedule\.decay_rate=1\.5"),
        ({"kind": "exponential_epoch", "s": 0}, r"lr_schedule\.s=0"),
        ({"kind": "plateau", "factor": 1.0}, r"lr_schedule\.factor=1\.0"),
        ({"kind": "cosine", "warmup_epochs": 3, "epochs": 3}, r"warmup_epochs=3.*epochs=3"),
        ({"kind": "constant", "initial_learning_rate": -1.0}, r"initial_learning_rate=-1\.0"),
        ({"kind": "constant", "steps_per_epoch": 0}, r"steps_per_epoch=0"),
    ],
)
def test_bad_schedule_values_raise(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_schedule(**kwargs)


CONF = Path(models.__file__).resolve().parents[1] / "conf"


@pytest.mark.parametrize("name", ["adam", "rmsprop", "sgd", "adamax"])
def test_optimizer_yaml_instantiates_its_optimizer(name: str) -> None:
    path = CONF / "optimizer" / f"{name}.yaml"
    assert path.read_text().startswith("# ")  # one-line usage comment first
    optimizer = instantiate(OmegaConf.load(path))
    assert type(optimizer).__name__.lower() == name
    expected_lr = {"sgd": 1e-2, "adamax": 2e-3}.get(name, 1e-3)
    assert float(optimizer.learning_rate) == pytest.approx(expected_lr)


@pytest.mark.parametrize("kind", sorted(SCHEDULE_PARAMS))
def test_schedule_yaml_repeats_the_documented_defaults(kind: str) -> None:
    path = CONF / "lr_schedule" / f"{kind}.yaml"
    assert path.read_text().startswith("# ")
    cfg = OmegaConf.load(path)
    params = {k: v for k, v in OmegaConf.to_container(cfg).items() if k not in ("_target_", "kind")}
    assert cfg.kind == kind
    assert params == SCHEDULE_PARAMS[kind]
    spec = instantiate(cfg, initial_learning_rate=LR0, steps_per_epoch=10, epochs=5)
    assert isinstance(spec, ScheduleSpec)
