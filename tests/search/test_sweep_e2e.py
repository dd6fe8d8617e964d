"""End to end: `python search/run.py -m` on real data, real Optuna storage, real MLflow store."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import CHEST_XRAY_SAMPLE

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
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)  # never the process's default
    exp = client.get_experiment_by_name("sweeps")
    runs = client.search_runs([exp.experiment_id], f"tags.`optuna.study` = '{study}'")
    parents = [r for r in runs if r.data.tags.get("sweep.parent") == "true"]
    children = [r for r in runs if "optuna.trial_number" in r.data.tags]
    return client, parents, children


def test_parent_child_runs_report_and_best_trial(tmp_path):
    from search.model_registry import model_store

    external = f"evaluation.external=[{{name: xray16, path: '{CHEST_XRAY_SAMPLE / 'val'}'}}]"
    proc = sweep(tmp_path, "hydra.sweeper.n_trials=2", "hydra.sweeper.study_name=e2e",
                 "hydra/sweeper/pruner=nop", external, "registry.ensemble.top_k=2")
    # a quiet terminal: no TF/absl/CUDA start-up lines from the workers, no Keras shuffle note
    for noise in ("absl::InitializeLog", "Could not find cuda drivers", "failed call to cuInit",
                  "oneDNN custom operations", "`shuffle=True` was passed",
                  "ms/step", "Downloading artifacts", "Successfully registered model",
                  "] Loading data"):  # Keras/MLflow bars, MLflow's prints, workers' INFO
        assert noise not in proc.stdout + proc.stderr, noise
    warned = [re.sub(r"^\[[^]]*\]|0x[0-9a-f]+|\d+", "#", line)
              for line in (proc.stdout + proc.stderr).splitlines() if "[WARNING]" in line]
    assert len(warned) == len(set(warned)), warned  # each warning once per sweep
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
    assert parent.data.metrics["objective"] == pytest.approx(study.best_value)
    # One name per thing, few enough to read: the swept values under Optuna's names, no
    # Hydra internals or Keras-callback copies, one metric per quantity.
    by_trial = {t.number: t for t in study.trials}
    for child in children:
        params, metrics = child.data.params, child.data.metrics
        trial = by_trial[int(child.data.tags["optuna.trial_number"])]
        # intervals are the run's evaluation/*_intervals.json, not two series per metric
        # (issue 28); external sets have their own prefix
        assert not [k for k in metrics if "_ci_" in k], sorted(metrics)
        plain = [k for k in metrics if not k.startswith("ext_")]
        assert len(params) < 40 and len(plain) < 30, (sorted(params), sorted(metrics))
        found = model_store.run_intervals(client, child.info.run_id)
        for name in ("eval_test_roc_auc", "eval_test_sensitivity", "ext_xray16_roc_auc",
                     "ext_xray16_specificity"):
            low, high = found[f"{name}_ci_low"], found[f"{name}_ci_high"]
            assert low <= metrics[name] <= high, (name, low, high)  # [1, 1] when all caught
        assert found["eval_test_roc_auc_ci_low"] < found["eval_test_roc_auc_ci_high"]
        assert not [k for k in found if k.startswith("eval_val_")]  # val chose the model
        assert not [k for k in params if "_target_" in k or k.startswith("optimizer_")]
        assert {k: params[k] for k in trial.params} == {k: str(v) for k, v in
                                                         trial.params.items()}
        assert metrics["objective"] == pytest.approx(trial.value)
        assert not {"eval_val_recall", "eval_val_threshold", "eval_val_loss"} & set(metrics)
        assert {"threshold", "eval_test_sensitivity", "val_loss"} <= set(metrics)
    # The UI opens the experiment on its training runs; names say what was tried and how
    # it ended; trials and runs point at each other; the objective is named in the study.
    experiment = client.get_experiment_by_name("sweeps")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert study.metric_names == ["val_loss"]
    by_number = {t.number: t for t in study.trials}
    for child in children:
        trial = by_number[int(child.data.tags["optuna.trial_number"])]
        assert trial.user_attrs["mlflow_run_id"] == child.info.run_id
        # the outcome first, where the runs list's narrow column still shows it (issue 28)
        assert re.fullmatch(rf"t{trial.number:03d} {trial.value:.3f} \w+ d\d lr \d\.\de-\d+",
                            child.info.run_name), child.info.run_name
    assert parent.data.tags["best_run_id"] in {c.info.run_id for c in children}
    assert parent.data.metrics["trials_complete"] == 2
    best_child = next(c for c in children if c.info.run_id == parent.data.tags["best_run_id"])
    # the parent's row reads like its best trial's: same param and metric names
    assert {k: parent.data.params[k] for k in study.best_params} == {
        k: best_child.data.params[k] for k in study.best_params}
    assert parent.data.metrics["eval_test_roc_auc"] == best_child.data.metrics[
        "eval_test_roc_auc"]
    # the parent's description names the best trial (linked to its run) and how to pull it
    note = parent.data.tags["mlflow.note.content"]
    assert f"trial {study.best_trial.number}" in note and best_child.info.run_id in note
    assert "python search/pull.py --name pneumonia-cnn" in note and "@champion" in note
    # the registry candidate is scored on the external set too, with its interval
    assert "promotion_new_ext_xray16_roc_auc" in parent.data.metrics
    assert parent.data.metrics["promotion_new_roc_auc_ci_low"] <= parent.data.metrics[
        "promotion_new_roc_auc"] <= parent.data.metrics["promotion_new_roc_auc_ci_high"]
    sweep_files = {a.path for a in client.list_artifacts(parent.info.run_id, "sweep")}
    assert "sweep/val_loss_all_trials.png" in sweep_files
    # the end of the sweep says what to do next
    out = proc.stdout + proc.stderr
    # one command to look, and the interactive all-trials figure at the parent's top level
    assert "UI:      python search/ui.py --tracking-uri sqlite:///" in out
    assert f"curves:  {parent.info.artifact_uri}/val_loss_all_trials.html" in out
    assert "val_loss_all_trials.html" in {
        a.path for a in client.list_artifacts(parent.info.run_id)}
    assert "](#/experiments/" in note and ":5000" not in note  # links work on any host
    assert "pull:    python search/pull.py --name pneumonia-cnn" in out
    # the version and the registered model describe themselves; the config is an artifact
    version = client.get_model_version_by_alias("pneumonia-cnn", "champion")
    assert "Trained on" in version.description and "Operating point" in version.description
    assert "config" not in version.tags
    assert version.tags["config_uri"] == f"runs:/{version.run_id}/config/config.yaml"
    assert "@champion" in client.get_registered_model("pneumonia-cnn").description
    report = {a.path for a in client.list_artifacts(parent.info.run_id, "sweep_report")}
    for name in ("optimization_history.png", "intermediate_values.png",
                 "parallel_coordinate.png", "trials.csv", "sweep_report.html"):
        assert f"sweep_report/{name}" in report, sorted(report)
    # 2 complete trials: no importances (shown from 5 complete trials), and the page says so
    assert "sweep_report/param_importances.png" not in report
    page = (tmp_path / "sweep" / "sweep_report" / "sweep_report.html").read_text()
    assert "<table" in page and "<pre>" not in page  # the header is a table, not a dict
    assert "not fitted on 2 complete trial(s)" in page and "Objective Value" not in page
    for child in children:  # every trial linked to its run
        assert f">{child.info.run_id}</a>" in page

    check_calibration(tmp_path, client, best_child, version)
    check_ensemble(tmp_path, client, parent, children)


def check_calibration(tmp_path: Path, client: MlflowClient, child, version) -> None:
    """evaluation.calibration=temperature (the default): fitted on val, folded into the
    logged model, recorded with it, and the served scores are the calibrated ones."""
    import json

    import mlflow
    import numpy as np

    from search.evaluation import calibration as cal

    record = json.loads(Path(client.download_artifacts(
        child.info.run_id, "evaluation/calibration.json", str(tmp_path))).read_text())
    assert record["method"] == "temperature" and record["fitted_on"] == "val"
    assert child.data.tags["calibration"] == f"temperature T={record['temperature']:.4f}"
    # the fit minimised val NLL: never worse there than as trained
    assert record["val"]["after"]["nll"] <= record["val"]["before"]["nll"] + 1e-9
    assert set(record["test"]["after"]) == {"nll", "brier", "ece"}
    assert "evaluation/calibration.png" in {
        a.path for a in client.list_artifacts(child.info.run_id, "evaluation")}
    assert json.loads(version.tags["calibration"])["method"] in ("temperature", "members")
    # the logged model's val scores are the calibrated ones: the stored threshold came from
    # them, and the val NLL recorded "after" is what the logged model gives on val
    metadata = json.loads(Path(client.download_artifacts(
        child.info.run_id, "model_metadata.json", str(tmp_path))).read_text())
    assert metadata["calibration"]["temperature"] == pytest.approx(record["temperature"])
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    try:
        from hydra.utils import instantiate

        from search.model_registry.model_store import load_keras_safely
        from search.model_registry.registration import run_config

        cfg = run_config(client, child.info.run_id)
        model = load_keras_safely(mlflow.artifacts.download_artifacts(
            child.data.tags["best_model_uri"], dst_path=str(tmp_path / "calibrated")))
    finally:
        mlflow.set_tracking_uri(None)
    data = instantiate(cfg.data, seed=int(cfg.seed), _convert_="all")
    scores = model.predict(data.val, verbose=0)[:, 0]
    assert cal.nll(np.asarray(data.y_val), scores) == pytest.approx(
        record["val"]["after"]["nll"], abs=1e-5)


def check_ensemble(tmp_path: Path, client: MlflowClient, parent, children) -> None:
    """registry.ensemble.top_k=2: both trials averaged into one registered, pullable model."""
    import mlflow
    import numpy as np

    from models.ensemble import build_ensemble
    from search import predict as pr
    from search import pull
    from search.evaluation.inputs import batches, collect_inputs
    from search.model_registry import model_store

    tags = parent.data.tags
    run = client.get_run(tags["ensemble.run_id"])
    assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
    members = run.data.tags["ensemble.members"].split(",")
    assert sorted(members) == sorted(c.info.run_id for c in children)
    assert {"threshold", "eval_test_roc_auc", "ext_xray16_roc_auc"} <= set(run.data.metrics)
    assert {"eval_test_roc_auc_ci_low", "ext_xray16_roc_auc_ci_high"} <= set(
        model_store.run_intervals(client, run.info.run_id))
    assert "ensemble_gain_roc_auc" in parent.data.metrics
    version = client.get_model_version("pneumonia-cnn", tags["ensemble.version"])
    assert version.run_id == run.info.run_id and tags["ensemble.alias"] in version.aliases
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    folder = tmp_path / "ensemble"
    assert pull.main(["--version", str(version.version), "--out", str(folder),
                      "--tracking-uri", uri]) == 0
    try:
        out = pr.predict(folder, CHEST_XRAY_SAMPLE / "val", tmp_path / "pred", gradcam=True)
        pulled = np.array([r["p_pneumonia"] for r in out.rows])
        loaded = [model_store.load_keras_safely(mlflow.artifacts.download_artifacts(
            client.get_run(m).data.tags["best_model_uri"], dst_path=str(tmp_path / m)))
            for m in members]
    finally:
        mlflow.set_tracking_uri(None)
        mlflow.set_registry_uri(None)
    items, _ = collect_inputs(CHEST_XRAY_SAMPLE / "val", ["normal", "pneumonia"])
    images = np.concatenate([x for _, x in batches(items, 64, 28, 1, [])])
    in_memory = build_ensemble(loaded).predict(images, verbose=0)[:, 0]
    np.testing.assert_allclose(pulled, in_memory, atol=1e-6)
    assert len(list((tmp_path / "pred" / "gradcam").glob("*.png"))) == 16


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
        assert re.match(r"t\d{3} pruned@2 ", child.info.run_name), child.info.run_name
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




def test_final_stage_retrains_the_top_trials_and_registers_the_best_mean(tmp_path):
    sweep(tmp_path, "hydra.sweeper.n_trials=3", "hydra.sweeper.study_name=final",
          "hydra/sweeper/pruner=nop", "registry.final_stage.top_k=2",
          "registry.final_stage.repeats=1")
    study = optuna.load_study(study_name="final", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    assert len(study.trials) == 3  # the repeats are runs, not trials: the total stays exact
    client, [parent], children = runs_of(tmp_path, "final")
    assert len(children) == 3
    by_number = {int(c.data.tags["optuna.trial_number"]): c for c in children}
    ranking = client.download_artifacts(parent.info.run_id, "final_stage/ranking.json",
                                        str(tmp_path))
    table = json.loads(Path(ranking).read_text())
    top = sorted(study.trials, key=lambda t: t.value)[:2]
    assert [r["trial"] for r in table["rows"]] == [str(t.number) for t in top]
    exp = client.get_experiment_by_name("sweeps")
    repeats = client.search_runs([exp.experiment_id], "tags.`final_stage.repeat` = '1'")
    assert len(repeats) == 2
    for row, trial in zip(table["rows"], top, strict=True):
        origin = by_number[trial.number]
        [rerun] = [r for r in repeats if r.data.tags["final_stage.origin_run"] == row["run_id"]]
        assert row["run_id"] == origin.info.run_id and row["n"] == 2
        assert rerun.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert rerun.info.status == "FINISHED" and "optuna.trial_number" not in rerun.data.tags
        assert row["single_value"] == pytest.approx(trial.value)
        assert row["mean"] == pytest.approx((trial.value + rerun.data.metrics["objective"]) / 2)
        assert rerun.data.params["data.fingerprint"] == origin.data.params["data.fingerprint"]
        assert rerun.data.metrics["objective"] != pytest.approx(trial.value, abs=1e-7)
    best_mean = min(table["rows"], key=lambda r: r["mean"])
    assert parent.data.tags["best_run_id"] == best_mean["run_id"]
    assert parent.data.tags["final_stage.search_best_run_id"] == by_number[
        study.best_trial.number].info.run_id
    assert parent.data.metrics["final_stage_rank_changed"] == float(
        best_mean["run_id"] != table["rows"][0]["run_id"])
    champion = client.get_model_version_by_alias("pneumonia-cnn", "champion")
    assert champion.run_id == best_mean["run_id"]
