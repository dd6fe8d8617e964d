"""A moved local store keeps its artifact and model views (a real SQLite store, moved)."""

from __future__ import annotations

import shutil
import sqlite3

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from search.model_registry import registration as registry
from search.tracking import mlflow_runs as tracking
from search.tracking import store_move

pytestmark = pytest.mark.slow


def test_a_moved_mlruns_folder_keeps_its_artifacts_models_and_versions(trained_store, tmp_path,
                                                                       monkeypatch):
    before = tmp_path / "clone-a" / "mlruns"
    shutil.copytree(trained_store.root, before, ignore=shutil.ignore_patterns("good"))
    with sqlite3.connect(before / "mlflow.db") as con:  # as if logged at clone-a
        for table, column in store_move.LOCATION_COLUMNS:
            con.execute(f"UPDATE {table} SET {column} = replace({column}, ?, ?)",
                        (str(trained_store.root), str(before)))
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    tracking.setup_cli(f"sqlite:///{before / 'mlflow.db'}")
    assert store_move.relocate(before / "mlflow.db") == (None, 0)  # not moved: untouched
    registry.register_run_model(MlflowClient(), trained_store.good_run_id, "moved-cnn")

    after = tmp_path / "clone-b" / "mlruns"
    shutil.move(before.parent, after.parent)  # the folder moves; its old place is gone
    uri = f"sqlite:///{after / 'mlflow.db'}"
    client = MlflowClient(uri)
    assert str(before) in client.get_run(trained_store.good_run_id).info.artifact_uri

    tracking.setup_cli(uri)  # what run, sweep, pull and predict do first
    run = client.get_run(trained_store.good_run_id)
    assert run.info.artifact_uri == (after / "artifacts").as_uri() + (
        f"/{run.info.run_id}/artifacts")
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.artifact_location.startswith((after / "artifacts").as_uri())
    config = mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/config/config.yaml")
    assert "seed: 3" in config
    with sqlite3.connect(after / "mlflow.db") as con:  # MLflow's entity does not expose it
        (location,) = con.execute("SELECT storage_location FROM model_versions").fetchone()
    assert location.startswith((after / "artifacts").as_uri())
    files = mlflow.artifacts.download_artifacts("models:/moved-cnn/1", dst_path=str(
        tmp_path / "dl"))
    assert (tmp_path / "dl" / "MLmodel").is_file() and files
    assert store_move.relocate(after / "mlflow.db") == (None, 0)  # once is enough
    mlflow.set_tracking_uri(None)
    mlflow.set_registry_uri(None)
