"""A trial that reached its last epoch completes: the pruner is asked only where more epochs
follow (issue 29, item 1). Real Keras fits, a real SQLite study, a pruner that always prunes."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import optuna
import pytest

from search.sweep_context import SweepTrial
from search.training.keras_callbacks import ReportToPruner

REPO = Path(__file__).resolve().parents[2]
SWEEP_CONF = REPO / "tests" / "search" / "sweep_conf"


def always_pruning_trial(tmp_path: Path, warmup: int = 0) -> tuple[optuna.Study, SweepTrial]:
    """A trial of a SQLite study whose pruner prunes at every step past `warmup` (any
    val_loss is above 0)."""
    study = optuna.create_study(
        storage=f"sqlite:///{tmp_path / 'optuna.db'}",
        pruner=optuna.pruners.ThresholdPruner(upper=0.0, n_warmup_steps=warmup))
    trial = study.ask()
    return study, SweepTrial(trial=trial, number=trial.number, study=study.study_name,
                             sampler="RandomSampler", pruner="ThresholdPruner")


def fit(trial: SweepTrial, epochs: int, *callbacks: keras.callbacks.Callback) -> int:
    """A tiny real fit with the pruning callback last (as search/training/fit.py orders it);
    returns the epochs trained."""
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(64, 4)).astype("float32"), rng.integers(0, 2, 64).astype("float32")
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1, activation="sigmoid")])
    model.compile("adam", "binary_crossentropy")
    history = model.fit(x, y, validation_data=(x, y), epochs=epochs, verbose=0,
                        callbacks=[*callbacks, ReportToPruner(trial, "val_loss")])
    return len(history.history["loss"])


def test_pruned_where_more_epochs_follow(tmp_path):
    study, trial = always_pruning_trial(tmp_path)
    with pytest.raises(optuna.TrialPruned):
        fit(trial, 2)
    assert list(study.trials[0].intermediate_values) == [0]  # pruned after epoch 1 of 2


def test_the_last_epoch_is_reported_but_never_pruned(tmp_path):
    study, trial = always_pruning_trial(tmp_path)
    assert fit(trial, 1) == 1
    stored = study.trials[0]
    assert stored.state == optuna.trial.TrialState.RUNNING  # not PRUNED: the task returns
    assert list(stored.intermediate_values) == [0]  # reported for other trials' pruners


def early_stopping() -> keras.callbacks.EarlyStopping:
    """min_delta 10: no epoch improves on the first, so patience 0 stops after the second."""
    return keras.callbacks.EarlyStopping(monitor="val_loss", patience=0, min_delta=10.0)


def test_an_early_stopped_epoch_is_never_pruned(tmp_path):
    study, trial = always_pruning_trial(tmp_path, warmup=1)  # would prune at step 1
    # EarlyStopping before the pruning callback, as in fit.py: it ends training after the
    # 2nd of 5 epochs, so no epoch follows and the pruner is not asked
    assert fit(trial, 5, early_stopping()) == 2
    stored = study.trials[0]
    assert stored.state == optuna.trial.TrialState.RUNNING
    assert sorted(stored.intermediate_values) == [0, 1]


def test_without_the_early_stop_the_same_epoch_is_pruned(tmp_path):
    study, trial = always_pruning_trial(tmp_path, warmup=1)
    with pytest.raises(optuna.TrialPruned):
        fit(trial, 5)
    assert sorted(study.trials[0].intermediate_values) == [0, 1]


def run_sweep(tmp_path: Path, name: str, *overrides: str) -> subprocess.CompletedProcess:
    import os

    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
           "TF_CPP_MIN_LOG_LEVEL": "3"}
    cmd = [sys.executable, str(REPO / "search" / "run.py"), "-m",
           f"hydra.sweep.dir={tmp_path / name}",
           f"hydra.sweeper.storage=sqlite:///{tmp_path / 'optuna.db'}",
           "tracking.artifact_root=" + (tmp_path / "artifacts").as_uri(),
           "data.subset_fraction=0.1", "hydra.sweeper.n_jobs=1", "hydra.sweeper.n_trials=1",
           "tracking.experiment=sweeps", f"hydra.sweeper.study_name={name}",
           f"hydra.searchpath=[file://{SWEEP_CONF}]", "hydra/sweeper/pruner=always_prune",
           "registry.enabled=false", *overrides]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


@pytest.mark.slow
@pytest.mark.parametrize(("overrides", "epochs"), [
    (("trainer.max_epochs=2",), 2),  # the pruner's first decision falls on the last epoch
    # early stopping after the 2nd of 4 epochs: no epoch follows either
    (("trainer.max_epochs=4", "trainer.patience=0", "trainer.min_delta=10"), 2),
])
def test_a_sweep_trial_that_trained_to_its_end_completes_and_is_evaluated(
        tmp_path, overrides, epochs):
    """always_prune prunes at step 1 (the 2nd epoch) when more epochs follow
    (tests/search/test_sweep_e2e.py::test_pruned_trials_are_recorded_and_keep_their_curves)."""
    from mlflow.tracking import MlflowClient

    run_sweep(tmp_path, "finished", *overrides)
    study = optuna.load_study(study_name="finished",
                              storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    (trial,) = study.trials
    assert trial.state == optuna.trial.TrialState.COMPLETE, trial.state
    assert sorted(trial.intermediate_values) == list(range(epochs))
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = [r for r in client.search_runs(
        [client.get_experiment_by_name("sweeps").experiment_id],
        "tags.`optuna.trial_number` = '0'")]
    assert run.data.tags["optuna.trial_state"] == "COMPLETE"
    assert not re.search(r"pruned", run.info.run_name), run.info.run_name
    assert "eval_test_roc_auc" in run.data.metrics  # evaluated
    assert run.data.tags.get("best_model_uri")  # a logged model: a registry candidate


def test_a_warm_starts_top_configuration_is_never_pruned(tmp_path):
    """Enqueued by a warm start (its source's best), a trial trains to its end: a Hyperband
    bracket had pruned the source's best after 4 epochs in benchmarks/search_efficiency.py."""
    from hydra_plugins.optuna_pruning_sweeper._warm_start import TOP_ATTR

    study = optuna.create_study(
        storage=f"sqlite:///{tmp_path / 'optuna.db'}",
        pruner=optuna.pruners.ThresholdPruner(upper=0.0))
    study.enqueue_trial({}, user_attrs={TOP_ATTR: {"study": "last-night", "number": 3}})
    top = study.ask()
    assert fit(SweepTrial(trial=top, number=top.number, study=study.study_name,
                          sampler="RandomSampler", pruner="ThresholdPruner"), 3) == 3
    assert sorted(study.trials[0].intermediate_values) == [0, 1, 2]  # reported every epoch
    other = study.ask()  # the same pruner stops a trial the warm start did not queue
    with pytest.raises(optuna.TrialPruned):
        fit(SweepTrial(trial=other, number=other.number, study=study.study_name,
                       sampler="RandomSampler", pruner="ThresholdPruner"), 3)
