"""End to end: `python search/run.py` trains on real X-rays and tracks into a real MLflow store."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def run_entry(tmp_path: Path, *overrides: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run search/run.py in a subprocess against a tracking store in tmp_path."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
           "TF_CPP_MIN_LOG_LEVEL": "2"}
    cmd = [sys.executable, str(REPO / "search" / "run.py"),
           f"hydra.run.dir={tmp_path / 'hydra'}", "tracking.artifact_root=" +
           (tmp_path / "artifacts").as_uri(), *overrides]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def only_run(tmp_path: Path):
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("pneumonia")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    return client, runs[0]


def artifact_paths(client: MlflowClient, run_id: str, path: str = "") -> set[str]:
    out: set[str] = set()
    for item in client.list_artifacts(run_id, path):
        out |= artifact_paths(client, run_id, item.path) if item.is_dir else {item.path}
    return out


def test_builtin_data_two_epochs_tracked(tmp_path):
    run_entry(tmp_path, "data.subset_fraction=0.15", "trainer.max_epochs=2",
              "trainer.patience=5", "seed=7")
    client, run = only_run(tmp_path)
    assert run.info.status == "FINISHED"
    history = client.get_metric_history(run.info.run_id, "val_loss")
    assert [m.step for m in history] == [0, 1]
    for key in ("loss", "accuracy", "val_accuracy", "precision", "recall", "auc",
                "learning_rate"):
        assert len(client.get_metric_history(run.info.run_id, key)) == 2, key
    metrics = run.data.metrics
    assert 0.0 <= metrics["eval_val_roc_auc"] <= 1.0
    assert 0.0 <= metrics["threshold"] <= 1.0
    assert "eval_test_sensitivity" in metrics
    assert run.data.params["seed"] == "7"
    assert len(run.data.params["data.fingerprint"]) >= 16
    files = artifact_paths(client, run.info.run_id)
    for expected in ("evaluation/val_confusion.png", "evaluation/val_confusion.json",
                     "evaluation/test_confusion.png", "evaluation/test_confusion.json",
                     "evaluation/val_roc_pr.png", "evaluation/val_classification_report.json",
                     "curves/loss_accuracy.png", "config/config.yaml", "model_summary.txt",
                     "environment/versions.json"):
        assert expected in files, (expected, sorted(files))
    cm = client.download_artifacts(run.info.run_id, "evaluation/val_confusion.json", tmp_path)
    import json

    matrix = json.loads(Path(cm).read_text())["matrix"]
    assert sum(map(sum, matrix)) == int(run.data.params["data.n_val"])
    assert run.data.tags["best_model_uri"].startswith("models:/")


def test_folder_loader_transfer_224px_on_real_jpegs(tmp_path, chest_xray_tree):
    run_entry(tmp_path, "data=chest_xray", f"data.root={chest_xray_tree}",
              "data.image_size=224", "data.val_fraction=0.25", "data.test_fraction=0.25",
              "data.batch_size=4", "model=transfer", "model.weights=none",
              # a frozen backbone, as transfer learning usually starts: tracing the full
              # backward pass of MobileNetV2 at 224 px costs ~25 s of CPU here
              "model.trainable_layers=0", "trainer.max_epochs=1")
    client, run = only_run(tmp_path)
    assert run.info.status == "FINISHED"
    assert run.data.params["data.image_size"] == "224"
    assert run.data.tags["model.builder"] == "build_transfer"
    assert len(client.get_metric_history(run.info.run_id, "val_loss")) == 1
    assert int(run.data.params["data.n_train"]) + int(run.data.params["data.n_val"]) + int(
        run.data.params["data.n_test"]) == 16
    # the transfer model serves like the CNN: raw 0-255 pixels at its input contract (224 px,
    # grayscale: the network repeats the channel for its ImageNet backbone and preprocesses
    # inside) through MLflow's pyfunc give search/predict.py's probabilities and labels
    import csv

    import mlflow
    import numpy as np

    from data.pipeline import decode_to_uint8
    from search.predict import predict

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    try:
        model_dir = Path(mlflow.artifacts.download_artifacts(
            run.data.tags["best_model_uri"], dst_path=str(tmp_path / "model")))
    finally:
        mlflow.set_tracking_uri(None)
    predict(model_dir, chest_xray_tree, out=tmp_path / "pred")
    with open(tmp_path / "pred" / "predictions.csv") as handle:
        by_file = {Path(r["path"]).name: r for r in csv.DictReader(handle)}
    files = sorted(chest_xray_tree.rglob("*.jpeg"))
    pixels = np.stack([decode_to_uint8(f.read_bytes(), 224, 1).numpy() for f in files])
    frame = mlflow.pyfunc.load_model(str(model_dir)).predict(pixels.astype(np.float32))
    assert list(frame.columns) == ["p_normal", "p_pneumonia", "predicted_label", "threshold"]
    for file, (_, row) in zip(files, frame.iterrows(), strict=True):
        assert row["predicted_label"] == by_file[file.name]["predicted_label"], file.name
        assert row["p_pneumonia"] == pytest.approx(
            float(by_file[file.name]["p_pneumonia"]), abs=1e-5), file.name
