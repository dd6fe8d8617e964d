"""End to end: `python search/run.py -m` on real data, real Optuna storage, real MLflow store."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient

REPO = Path(__file__).resolve().parents[2]
SWEEP_CONF = Path(__file__).resolve().parent / "sweep_conf"
pytestmark = pytest.mark.slow

TINY = ["data.subset_fraction=0.1", "trainer.max_epochs=2", "hydra.sweeper.n_jobs=1",
        "tracking.experiment=sweeps"]


def sweep(tmp_path: Path, *overrides: str, expect_ok: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
           "TF_CPP_MIN_LOG_LEVEL": "3"}
    cmd = [sys.executable, str(REPO / "search" / "run.py"), "-m",
           f"hydra.sweep.dir={tmp_path / 'sweep'}",
           f"hydra.sweeper.storage=sqlite:///{tmp_path / 'optuna.db'}",
           "tracking.artifact_root=" + (tmp_path / "artifacts").as_uri(), *TINY, *overrides]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    if expect_ok:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def runs_of(tmp_path: Path, study: str) -> tuple[MlflowClient, list, list]:
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("sweeps")
    runs = client.search_runs([exp.experiment_id], f"tags.`optuna.study` = '{study}'")
    parents = [r for r in runs if r.data.tags.get("sweep.parent") == "true"]
    children = [r for r in runs if "optuna.trial_number" in r.data.tags]
    return client, parents, children


def test_parent_child_runs_report_and_best_trial(tmp_path):
    proc = sweep(tmp_path, "hydra.sweeper.n_trials=2", "hydra.sweeper.study_name=e2e",
                 "hydra/sweeper/pruner=nop")
    # a quiet terminal: no TF/absl/CUDA start-up lines from the workers, no Keras shuffle note
    for noise in ("absl::InitializeLog", "Could not find cuda drivers", "failed call to cuInit",
                  "oneDNN custom operations", "`shuffle=True` was passed"):
        assert noise not in proc.stdout + proc.stderr, noise
    client, parents, children = runs_of(tmp_path, "e2e")
    assert len(parents) == 1 and len(children) == 2
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    assert sorted(c.data.tags["optuna.trial_number"] for c in children) == ["0", "1"]
    for child in children:
        assert child.info.status == "FINISHED"
        assert child.data.tags["optuna.trial_state"] == "COMPLETE"
        assert child.data.tags["optuna.sampler"] == "TPESampler"
        assert child.data.tags["optuna.pruner"] == "NopPruner"
        assert len(client.get_metric_history(child.info.run_id, "val_loss")) == 2
    study = optuna.load_study(study_name="e2e", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    assert parent.data.metrics["best_value"] == pytest.approx(study.best_value)
    # The UI opens the experiment on its training runs; names say what was tried and how
    # it ended; trials and runs point at each other; the objective is named in the study.
    experiment = client.get_experiment_by_name("sweeps")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert study.metric_names == ["val_loss"]
    by_number = {t.number: t for t in study.trials}
    for child in children:
        trial = by_number[int(child.data.tags["optuna.trial_number"])]
        assert trial.user_attrs["mlflow_run_id"] == child.info.run_id
        assert re.fullmatch(rf"t{trial.number:03d} · \w+ · lr \d\.\de-\d+ · d\d → "
                            rf"val_loss {trial.value:.3f}", child.info.run_name), (
            child.info.run_name)
    assert parent.data.tags["best_run_id"] in {c.info.run_id for c in children}
    assert parent.data.metrics["trials_complete"] == 2
    assert any(k.startswith("best.model.") for k in parent.data.params)
    report = {a.path for a in client.list_artifacts(parent.info.run_id, "sweep_report")}
    for name in ("optimization_history.png", "intermediate_values.png",
                 "parallel_coordinate.png", "param_importances.png", "trials.csv",
                 "sweep_report.html"):
        assert f"sweep_report/{name}" in report, sorted(report)


def test_pruned_trials_are_recorded_and_keep_their_curves(tmp_path):
    sweep(tmp_path, "hydra.sweeper.n_trials=2", "hydra.sweeper.study_name=pruned",
          f"hydra.searchpath=[file://{SWEEP_CONF}]", "hydra/sweeper/pruner=always_prune",
          "trainer.max_epochs=4")
    study = optuna.load_study(study_name="pruned", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.PRUNED] * 2
    client, _, children = runs_of(tmp_path, "pruned")
    assert len(children) == 2
    for child in children:
        assert child.data.tags["optuna.trial_state"] == "PRUNED"
        assert child.info.status == "FINISHED"  # pruned is a normal end, not a failure
        assert child.info.run_name.endswith(" · pruned @ epoch 2"), child.info.run_name
        # pruned at its 2nd epoch (step 1): the curve up to there is kept
        assert len(client.get_metric_history(child.info.run_id, "val_loss")) == 2
        paths = {a.path for a in client.list_artifacts(child.info.run_id, "curves")}
        assert "curves/loss_accuracy.png" in paths


def test_nan_loss_fails_the_trial_with_its_reason_and_the_sweep_goes_on(tmp_path):
    proc = sweep(tmp_path, "hydra.sweeper.n_trials=2", "hydra.sweeper.study_name=nan",
                 "hydra/sweeper/pruner=nop", "optimizer=sgd", "optimizer.learning_rate=1e12",
                 "hydra.sweeper.max_failure_rate=1.0",  # command-line values beat the space's
                 expect_ok=False)
    # every trial failed: the sweep says so and exits non-zero (its parent run ends FAILED)
    assert proc.returncode != 0 and "none of this sweep's 2 trial(s) completed" in proc.stderr
    study = optuna.load_study(study_name="nan", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.FAIL] * 2
    assert all("NaN" in t.user_attrs["fail_reason"] for t in study.trials)
    _, _, children = runs_of(tmp_path, "nan")
    assert {c.info.status for c in children} == {"FAILED"}


