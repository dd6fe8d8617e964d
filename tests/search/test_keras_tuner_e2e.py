"""End to end: `search/run.py -m hydra.sweeper.engine=keras_tuner` with keras-tuner's own
Hyperband oracle, real worker processes, a real MLflow store and registry, a tiny budget.

One sweep is shared by the assertions: Hyperband with max_epochs=4 and factor 2, capped at 7
trials on 10 % of the built-in data. Its first bracket starts 4 trials of 1 epoch and
continues the best to 2 epochs. The first trial is made to run out of memory (the `oom` fault
point): the FAIL must show in the log, the summary, MLflow and keras-tuner, and never be the
best. keras-tuner's own rule then promotes only while more trials of a round completed than
it drops, so one model is continued and the next bracket starts.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient

from search.tracking.tags import FIGURES_SKIPPED

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def command(tmp: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}",
           "TF_CPP_MIN_LOG_LEVEL": "3", "XRAY_FAULT": "oom",
           "XRAY_FAULT_MARKER": str(tmp / "oom.marker")}
    cmd = [sys.executable, str(REPO / "search" / "run.py"), "-m",
           "hydra.sweeper.engine=keras_tuner", "hydra.sweeper.keras_tuner.max_epochs=4",
           "hydra.sweeper.keras_tuner.factor=2",
           "hydra.sweeper.keras_tuner.seed=5", "hydra.sweeper.n_jobs=1",
           "hydra.sweeper.n_trials=7", "data.subset_fraction=0.1", "tracking.experiment=kt",
           f"hydra.sweep.dir={tmp / 'sweep'}",
           f"hydra.sweeper.storage=sqlite:///{tmp / 'optuna.db'}",
           "tracking.artifact_root=" + (tmp / "artifacts").as_uri(), *overrides]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("kt")
    (tmp / "oom.marker").touch()  # the fault fires once: in the first trial
    proc = command(tmp)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return tmp, proc.stdout + proc.stderr


def test_every_keras_tuner_trial_is_a_tracked_child_run(swept):
    tmp, log = swept
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("kt").experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("sweep.parent") == "true"]
    children = [r for r in runs if "optuna.trial_number" in r.data.tags]
    assert len(children) == 7
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    for child in children:
        tags = child.data.tags
        assert tags["optuna.sampler"] == "keras-tuner HyperbandOracle"
        assert tags["keras_tuner.algorithm"] == "hyperband"
        for key in ("trial_id", "bracket", "round", "epochs", "initial_epoch"):
            assert f"keras_tuner.{key}" in tags, (key, sorted(tags))
    complete = [c for c in children if c.data.tags["optuna.trial_state"] == "COMPLETE"]
    for child in complete:  # curves per epoch, confusion matrices, the model
        epochs = int(child.data.tags["keras_tuner.epochs"])
        initial = int(child.data.tags["keras_tuner.initial_epoch"])
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "val_loss")]
        assert steps and steps[0] == initial and steps[-1] < epochs, (initial, epochs, steps)
        files = {f.path for f in client.list_artifacts(child.info.run_id, "evaluation")}
        assert "evaluation/test_confusion.json" in files
        # the picture too, unless the trial ended outside the running top k (then it says so)
        assert ("evaluation/test_confusion.png" in files) != (
            FIGURES_SKIPPED in tags), (sorted(files), tags)
    # Hyperband's later rounds continue an earlier round's model, as keras-tuner does
    continued = [c for c in complete if "keras_tuner.continues_trial" in c.data.tags]
    assert continued, [c.data.tags for c in children]
    for child in continued:
        tags = child.data.tags
        assert int(tags["keras_tuner.round"]) >= 1 and int(tags["keras_tuner.initial_epoch"]) > 0
        assert child.data.params["trainer.init_weights"].endswith(
            f"/{tags['keras_tuner.continues_trial']}/checkpoints/best.keras")

    # the FAIL: in MLflow, the log, the sweep summary and keras-tuner's own records
    (failed,) = [c for c in children if c.data.tags["optuna.trial_state"] == "FAIL"]
    assert failed.info.status == "FAILED"
    assert "[trial 0] FAIL" in log and "out of memory" in log
    summary = yaml.safe_load((tmp / "sweep" / "optuna_summary.yaml").read_text())
    assert summary["states"]["FAIL"] == 1 and summary["stop_reason"] == "n_trials"
    assert summary["sampler"] == "keras-tuner HyperbandOracle"
    kt = summary["keras_tuner"]
    assert kt["states"]["FAILED"] == 1 and kt["best_optuna_trial"] != 0
    study = optuna.load_study(study_name=kt["project"].rsplit("/", 1)[-1],
                              storage=f"sqlite:///{tmp / 'optuna.db'}")
    assert study.best_trial.number == kt["best_optuna_trial"]  # both engines agree
    assert parent.data.metrics["objective"] == pytest.approx(study.best_value)

    # the report and the registry, as after an Optuna sweep
    assert (tmp / "sweep" / "sweep_report" / "sweep_report.html").is_file()
    champion = client.get_model_version_by_alias("pneumonia-cnn", "champion")
    assert client.get_run(champion.run_id).data.tags["optuna.trial_number"] == str(
        study.best_trial.number)


def test_an_old_project_is_resumed_only_when_asked_with_the_same_space(swept):
    tmp, _ = swept
    summary = yaml.safe_load((tmp / "sweep" / "optuna_summary.yaml").read_text())
    project = summary["keras_tuner"]["project"]
    changed = command(tmp, f"hydra.sweeper.keras_tuner.resume={project}",
                      "model.depth=choice(2,3)", f"hydra.sweep.dir={tmp / 'again'}")
    assert changed.returncode != 0
    assert "resume only with the same params and algorithm" in changed.stdout + changed.stderr
    assert not list((tmp / "again").glob("*/checkpoints"))  # refused before any trial
