"""Config checks that run before any data is loaded: each bad value names its key."""

from __future__ import annotations

import re

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from search import config_checks as cc

from ..conftest import CONF_DIR


def sweep_cfg(*overrides: str):
    """The composed config as the sweeper's process sees it (hydra node included)."""
    cc.register_resolvers()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=True)


# (override, text the error must contain): one row per bad input.
BAD_RUN = [
    ("objective=test_roc_auc", "tuning on the test split"),
    ("objective=val_bogus", "objective='val_bogus' is not a metric"),
    ("evaluation.threshold_rule=foo", "evaluation.threshold_rule='foo'"),
    ("evaluation.min_sensitivity=1.5", "evaluation.min_sensitivity"),
    ("trainer.monitor=val_bogus", "trainer.monitor='val_bogus'"),
    ("trainer.max_epochs=0", "trainer.max_epochs must be an integer >= 1"),
    ("optimizer.learning_rate=-0.01", "optimizer.learning_rate must be > 0"),
    ("trainer.patience=-1", "trainer.patience must be an integer >= 0"),
    ("data.batch_size=0", "data.batch_size must be an integer >= 1"),
    ("registry.metric=foo", "registry.metric='foo' cannot rank models"),
    ("registry.tie_break=val_loss", "registry.tie_break='val_loss' cannot rank models"),
]


@pytest.mark.parametrize(("override", "message"), BAD_RUN)
def test_bad_run_config_is_refused_with_its_key(compose_cfg, override, message):
    with pytest.raises(cc.ConfigError, match=message.replace("(", r"\(")):
        cc.check_run_config(compose_cfg(override))


def test_good_config_passes_and_returns_the_objectives(compose_cfg):
    assert cc.check_run_config(compose_cfg()) == ["val_loss"]
    assert cc.check_run_config(compose_cfg("objective=[val_loss,n_params]")) == [
        "val_loss", "n_params"]
    assert cc.check_run_config(compose_cfg("registry.enabled=false", "registry.metric=foo"))


@pytest.mark.parametrize(("objective", "direction"), [
    ("val_loss", "minimize"), ("val_roc_auc", "maximize"), ("val_sensitivity", "maximize"),
    ("val_accuracy", "maximize"), ("n_params", "minimize"),
])
def test_direction_is_derived_from_the_objective(objective, direction):
    cfg = sweep_cfg(f"objective={objective}")
    assert cfg.hydra.sweeper.direction == direction
    cc.check_sweep_config(cfg)


def test_two_objectives_get_two_directions():
    cfg = sweep_cfg("objective=[val_roc_auc,n_params]")
    assert list(cfg.hydra.sweeper.direction) == ["maximize", "minimize"]
    cc.check_sweep_config(cfg)


@pytest.mark.parametrize(("overrides", "message"), [
    (("objective=val_roc_auc", "hydra.sweeper.direction=minimize"),
     "val_roc_auc should maximize, not minimize"),
    (("objective=[val_loss,n_params]", "hydra.sweeper.direction=minimize"),
     "1 direction\\(s\\) for 2 objective"),
    (("objective=val_specificity",), "no per-epoch value a pruner could watch"),
])
def test_contradicting_sweeps_are_refused(overrides, message):
    with pytest.raises(cc.ConfigError, match=message):
        cc.check_sweep_config(sweep_cfg(*overrides))


def test_pruner_watches_a_value_that_runs_the_objectives_way(compose_cfg):
    assert cc.pruning_metric(compose_cfg()) == "val_loss"
    assert cc.pruning_metric(compose_cfg("objective=val_roc_auc")) == "val_auc"
    assert cc.pruning_metric(compose_cfg("objective=val_sensitivity")) == "val_recall"
    assert cc.pruning_metric(compose_cfg("objective=val_roc_auc",
                                         "trainer.monitor=val_accuracy")) == "val_accuracy"
    assert cc.pruning_metric(compose_cfg("objective=[val_loss,n_params]")) is None
    assert cc.pruning_metric(OmegaConf.create(
        {"objective": "val_specificity", "trainer": {"monitor": "val_loss"}})) is None
    cc.check_sweep_config(sweep_cfg("objective=val_specificity", "hydra/sweeper/pruner=nop"))


# Keys and values that Hydra or the builders refuse (composition or instantiate), by name.
BAD_COMPOSE = [
    ("model.depht=3", "depht"),  # a typo: Hydra's struct mode names the key
    ("model.depth=abc", "model.depth='abc' is not valid"),  # a wrong type
    ("model.depth=0", "model.depth=0 is not valid"),
    ("model.conv_dropout_rate=1.0", "model.conv_dropout_rate=1.0 is not valid"),
    ("model.head_dropout_rate=-0.1", "model.head_dropout_rate=-0.1 is not valid"),
    ("data.image_size=4", "data.image_size must be an integer >= 8"),
]


@pytest.mark.parametrize(("override", "message"), BAD_COMPOSE)
def test_bad_keys_and_values_are_named_by_hydra_or_the_builders(compose_cfg, override, message):
    from hydra.utils import instantiate

    with pytest.raises(Exception, match=message):  # noqa: B017 - any named error
        cfg = compose_cfg(override)
        instantiate(cfg.data if override.startswith("data.") else cfg.model,
                    **({} if override.startswith("data.") else
                       {"input_shape": (28, 28, 1), "num_classes": 2}))


def test_an_image_smaller_than_the_networks_downsampling_is_refused(compose_cfg):
    from hydra.utils import instantiate

    cfg = compose_cfg("model.depth=4")
    with pytest.raises(Exception, match="model.depth=4 pools a 8x8 image below 1x1"):
        instantiate(cfg.model, input_shape=(8, 8, 1), num_classes=2)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [  # a cosine warm-up that a one-epoch sweep cannot fit, swept or fixed
        (("trainer.max_epochs=1",), "search without it: 'lr_schedule=choice(constant,"),
        (("trainer.max_epochs=1", "lr_schedule=cosine"), "set lr_schedule.warmup_epochs=0"),
        # ImageNet weights of the transfer space, air-gapped: said once, before any trial
        (("search_space=transfer", "model.allow_download=false"), "checked once, before any"),
    ],
)
def test_sweep_preflight_names_what_every_such_trial_would_fail_on(overrides, message,
                                                                    tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))  # an empty Keras cache
    with pytest.raises(cc.ConfigError, match=re.escape(message)):
        cc.check_sweep_config(sweep_cfg(*overrides))


@pytest.mark.parametrize(
    "overrides",
    [("trainer.max_epochs=2",), ("trainer.max_epochs=1", "lr_schedule=constant"),
     ("trainer.max_epochs=1", "lr_schedule=cosine", "lr_schedule.warmup_epochs=0"),
     ("search_space=transfer", "model.weights=none")],
)
def test_sweep_preflight_passes_sweeps_that_fit(overrides, tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    cc.check_sweep_config(sweep_cfg(*overrides))
    assert not (tmp_path / "models").exists() or not any((tmp_path / "models").iterdir())


def test_threshold_rules_other_than_the_default_are_refused_for_k_classes():
    from search.config_checks import ConfigError, check_threshold_rule

    cfg = OmegaConf.create({"evaluation": {"threshold_rule": "youden"}})
    check_threshold_rule(cfg, ["normal", "pneumonia"])  # two classes: it applies
    with pytest.raises(ConfigError, match=r"threshold_rule=youden needs two classes; "
                       r"this data has 3 \(normal, bacteria, virus\)"):
        check_threshold_rule(cfg, ["normal", "bacteria", "virus"])
    check_threshold_rule(OmegaConf.create({"evaluation": {"threshold_rule": "min_sensitivity"}}),
                         ["a", "b", "c"])  # the default stands for "argmax" with K classes


def test_objective_and_monitor_must_name_this_tasks_metrics():
    from search.config_checks import ConfigError, check_task_metrics

    three = ["normal", "bacteria", "virus"]

    def cfg(objective: str, monitor: str = "val_loss"):
        return OmegaConf.create({"objective": objective, "trainer": {"monitor": monitor}})

    with pytest.raises(ConfigError, match=r"objective=val_sensitivity: with 3 classes.*"
                                          r"val_macro_recall"):
        check_task_metrics(cfg("val_sensitivity"), three)
    with pytest.raises(ConfigError, match=r"objective=val_macro_f1 is a K-class.*val_f1"):
        check_task_metrics(cfg("val_macro_f1"), ["normal", "pneumonia"])
    with pytest.raises(ConfigError, match=r"trainer.monitor=val_recall .*val_auc"):
        check_task_metrics(cfg("val_loss", "val_recall"), three)
    for objective in ("val_macro_recall", "val_roc_auc", "val_loss", "val_accuracy"):
        check_task_metrics(cfg(objective, "val_auc"), three)
    check_task_metrics(cfg("val_sensitivity", "val_recall"), ["normal", "pneumonia"])


# --- small val splits: what evaluation fits on val (threshold, calibration) needs images ---


@pytest.fixture(scope="module")
def small_npz(tmp_path_factory):
    """Real npz files: 60 train images of 2 classes; the same plus a given val of 1 + 1;
    90 images of 3 classes."""
    rng = np.random.default_rng(0)
    folder = tmp_path_factory.mktemp("small")

    def pixels(n):
        return rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)

    paths = {name: folder / f"{name}.npz" for name in ("train_only", "given_val", "three")}
    np.savez(paths["train_only"], train_images=pixels(60), train_labels=np.arange(60) % 2)
    np.savez(paths["given_val"], train_images=pixels(60), train_labels=np.arange(60) % 2,
             val_images=pixels(2), val_labels=np.array([0, 1]))
    np.savez(paths["three"], train_images=pixels(90), train_labels=np.arange(90) % 3)
    return paths


def built(compose_cfg, *overrides):
    from hydra.utils import instantiate

    cfg = compose_cfg(*overrides)
    return cfg, instantiate(cfg.data, seed=0, _convert_="all")


@pytest.mark.parametrize(("npz", "overrides", "names"), [
    ("train_only", ["data.val_fraction=0.04"], "set by data.val_fraction=0.04 (carved from train)"),
    ("given_val", [], "set by the val_images/val_labels of data.path="),
    ("train_only", ["data.resplit=true", "data.val_fraction=0.04",
                    "evaluation.calibration=none"],
     "set by data.val_fraction=0.04 (of all images, data.resplit=true)"),
])
def test_a_val_split_too_small_to_fit_on_is_refused_naming_its_key(compose_cfg, small_npz, npz,
                                                                    overrides, names):
    cfg, data = built(compose_cfg, f"data.path={small_npz[npz]}", *overrides)
    with pytest.raises(cc.ConfigError) as caught:
        cc.check_val_split(cfg, data)
    message = str(caught.value)
    assert "the val split (2 images, per class {'normal': 1, 'pneumonia': 1})" in message
    assert names in message and "refused before training" in message, message
    assert "the decision threshold (evaluation.threshold_rule=min_sensitivity)" in message
    assert ("the calibration (evaluation.calibration=temperature)" in message) == (
        "evaluation.calibration=none" not in overrides)


def test_a_small_val_split_that_can_still_be_fitted_on_is_warned(compose_cfg, small_npz,
                                                                  caplog):
    cfg, data = built(compose_cfg, f"data.path={small_npz['train_only']}",
                      "data.val_fraction=0.1", "data.subset_fraction=0.9")
    with caplog.at_level("WARNING", logger="search.config_checks"):
        (warning,) = cc.check_val_split(cfg, data)
    assert warning in caplog.text
    assert "set by data.val_fraction=0.1 (carved from train), then data.subset_fraction=0.9" \
        in warning and "registry.min_per_class=10" in warning, warning
    counts = data.source_info["counts"]["val"]
    assert f"per class {counts}" in warning and min(counts.values()) >= 2
    cfg, data = built(compose_cfg, f"data.path={small_npz['train_only']}",
                      "data.val_fraction=0.1", "registry.min_per_class=2")
    assert cc.check_val_split(cfg, data) == []  # the registry's own bar is the warning's


def test_only_what_is_fitted_counts_for_k_classes(compose_cfg, small_npz, caplog):
    three = [f"data.path={small_npz['three']}", "data.label_mode=multiclass",
             "data.val_fraction=0.034"]  # one val image of each class
    cfg, data = built(compose_cfg, *three, "evaluation.calibration=none")
    assert cc.check_val_split(cfg, data) == []  # argmax: nothing is fitted on val
    cfg, data = built(compose_cfg, *three)
    # one temperature over every val image: warned, not refused, and no threshold is named
    (warning,) = cc.check_val_split(cfg, data)
    assert "per class {'class_0': 1, 'class_1': 1, 'class_2': 1}" in warning, warning
    assert "fits the calibration (evaluation.calibration=temperature) on it" in warning
    assert "threshold" not in warning and "or set evaluation.calibration=none" in warning


def test_the_sweeps_dry_run_refuses_the_small_split_before_building_a_model(compose_cfg,
                                                                           small_npz):
    from search.training.preflight import check_trial

    cfg = compose_cfg(f"data.path={small_npz['train_only']}", "data.val_fraction=0.04")
    with pytest.raises(cc.ConfigError, match=r"data.val_fraction=0.04 .*refused before"):
        check_trial(cfg)


@pytest.mark.parametrize(("overrides", "message"), [
    # the oracle sets every trial's schedule span: a cosine warm-up of 1 cannot fit 1 epoch
    (("hydra.sweeper.keras_tuner.max_epochs=1",),
     "nothing to decay over in hydra.sweeper.keras_tuner.max_epochs=1"),
    (("hydra.sweeper.keras_tuner.algorithm=random", "hydra.sweeper.keras_tuner.max_epochs=1",
      "lr_schedule=cosine"), "Raise hydra.sweeper.keras_tuner.max_epochs above 1"),
])
def test_keras_tuner_epochs_are_checked_before_any_trial(overrides, message):
    with pytest.raises(cc.ConfigError, match=re.escape(message)):
        cc.check_sweep_config(sweep_cfg("hydra.sweeper.engine=keras_tuner", *overrides))


def test_keras_tuner_epochs_that_fit_pass():
    cc.check_sweep_config(sweep_cfg("hydra.sweeper.engine=keras_tuner",
                                    "hydra.sweeper.keras_tuner.max_epochs=2"))
    # trainer.max_epochs=1 does not matter when the oracle gives every trial 4 epochs
    cc.check_sweep_config(sweep_cfg("hydra.sweeper.engine=keras_tuner", "trainer.max_epochs=1",
                                    "hydra.sweeper.keras_tuner.max_epochs=4"))
