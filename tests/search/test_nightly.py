"""The nightly recipe (`+experiment=nightly`) as CI runs it, short: it trains, registers into
its own model name, and a floor above what it reaches fails the sweep with the figure."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def test_short_nightly_registers_its_own_model_and_fails_below_the_floor(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "TF_CPP_MIN_LOG_LEVEL": "3",
           "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
    sweep_dir = tmp_path / "nightly"
    cmd = [sys.executable, str(REPO / "search" / "run.py"), "-m", "+experiment=nightly",
           f"hydra.sweep.dir={sweep_dir}", "tracking.artifact_root=" + (tmp_path / "a").as_uri(),
           # short: two trials of two epochs, and a floor no model of this size reaches
           "hydra.sweeper.n_trials=2", "trainer.max_epochs=2",
           "registry.floor=0.999"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    log = proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.returncode != 0, log
    assert "quality floor missed: pneumonia-cnn-nightly v1" in proc.stderr, log
    assert "< registry.floor 0.9990" in proc.stderr
    promotion = json.loads((sweep_dir / "promotion.json").read_text())
    assert promotion["model_name"] == "pneumonia-cnn-nightly"
    client = MlflowClient(uri, registry_uri=uri)
    assert [m.name for m in client.search_registered_models()] == ["pneumonia-cnn-nightly"]
    assert client.get_experiment_by_name("nightly") is not None
    assert (sweep_dir / "optuna.db").is_file()  # storage null: tonight's own study
    from search.nightly_summary import summary_markdown

    table = summary_markdown(sweep_dir, env={"RC": str(proc.returncode)})
    assert "pneumonia-cnn-nightly v1" in table and "| exit status | 1 (failed) |" in table
    # registry.cv_folds=3: the champion's config trained on 3 folds of train + val
    experiment = client.get_experiment_by_name("nightly")
    folds = client.search_runs([experiment.experiment_id], "tags.`cv.fold` != ''")
    champion = client.get_model_version("pneumonia-cnn-nightly", "1")
    assert sorted(r.data.tags["cv.fold"] for r in folds) == ["0", "1", "2"]
    assert {r.data.tags["cv.of_run"] for r in folds} == {champion.run_id}
    prints = {r.data.params["data.fingerprint"] for r in folds}
    assert len(prints) == 3  # three different train/val splits
    assert {r.data.params["data.n_test"] for r in folds} == {
        client.get_run(champion.run_id).data.params["data.n_test"]}  # test untouched
    values = [r.data.metrics["eval_val_roc_auc"] for r in folds]
    parent = client.get_run(promotion["run_id"]).data.tags["mlflow.parentRunId"]
    metrics = client.get_run(parent).data.metrics
    assert metrics["cv_val_roc_auc_mean"] == pytest.approx(sum(values) / 3)
    assert metrics["cv_val_roc_auc_std"] > 0
    assert champion.tags["cv.val_roc_auc"].endswith("over 3 folds")
