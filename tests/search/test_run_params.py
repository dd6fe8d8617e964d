"""Which config values become a run's MLflow params (composed with real Hydra)."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir

from search.tracking.run_params import override_keys, run_params

CONF = Path(__file__).resolve().parents[2] / "conf"
TRIAL = ["model.depth=4", "optimizer=adamax", "optimizer.learning_rate=0.0033",
         "lr_schedule=cosine", "data.subset_fraction=0.1", "tracking.experiment=x",
         "trainer.verbose=0", "+model.extra=1"]


def composed(overrides: list[str]):
    with initialize_config_dir(str(CONF), version_base=None):
        return compose("config", overrides=overrides, return_hydra_config=True)


def test_override_keys_strip_prefixes_and_packages():
    assert override_keys(["+a=1", "++b.c=2", "~d", "e@pkg=f", "a=3"]) == ["a", "b.c", "d", "e"]


def test_a_trials_params_are_its_overrides_plus_key_values_under_their_own_names():
    cfg = composed(TRIAL)
    choices = dict(cfg.hydra.runtime.choices)
    params = run_params(cfg, TRIAL, choices)
    assert params["optimizer"] == "adamax" and params["lr_schedule"] == "cosine"
    assert params["model.depth"] == 4 and params["optimizer.learning_rate"] == 0.0033
    assert params["model.extra"] == 1 and params["data.subset_fraction"] == 0.1
    assert params["model"] == "cnn" and params["data"] == "pneumoniamnist"
    assert params["seed"] == 42 and params["objective"] == "val_loss"
    # how a run is operated is no param; neither are Hydra's internals
    assert not [k for k in params if k.startswith(("tracking.", "hydra.", "trainer.verbose"))]
    assert not [k for k in params if "_target_" in k or "_convert_" in k]
    assert len(params) < 25


# One concrete value per parameter of conf/search_space/default.yaml, conditional ones
# included (sgd has momentum, exponential has decay_rate; lr_schedule.s only exists for
# exponential_epoch, so no trial has both): its largest trial.
LARGEST = {
    "model.depth": 3, "model.base_filters": 16, "model.filter_hierarchy": "constant",
    "model.kernel_size": 3, "model.conv_dropout": "last", "model.conv_dropout_rate": 0.2,
    "model.batch_norm": "none", "model.head": "gap", "model.dense_layers": 2,
    "model.dense_units": 64, "model.dense_hierarchy": "constant", "model.head_dropout_rate": 0.3,
    "optimizer": "sgd", "optimizer.learning_rate": 0.001, "optimizer.momentum": 0.9,
    "optimizer.weight_decay": 0.005,
    "lr_schedule": "exponential", "lr_schedule.decay_rate": 0.9, "lr_schedule.s": 10,
    "data.batch_size": 32, "data.augment.rotation": 0.03, "data.augment.zoom": 0.1,
    "data.augment.translation": 0.05, "data.augment.brightness": 0.1,
    "data.class_weight": "none",
    "trainer.max_epochs": 10, "trainer.patience": 3, "trainer.verbose": 0,
}


def test_the_default_sweeps_largest_trial_stays_under_forty_params():
    space = composed([]).hydra.sweeper.params
    assert set(space) == set(LARGEST)  # a new swept key: add it here, the count must hold
    overrides = [f"{k}={v}" for k, v in LARGEST.items() if k != "lr_schedule.s"]
    cfg = composed(overrides)
    params = run_params(cfg, overrides, dict(cfg.hydra.runtime.choices))
    assert set(LARGEST) - {"trainer.verbose", "lr_schedule.s"} <= set(params)
    # plus the six facts train.py adds (fingerprint, three split sizes, n_params, hash)
    assert len(params) + 6 < 40, sorted(params)
