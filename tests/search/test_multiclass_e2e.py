"""K-class tasks end to end, on real images, through `search/run.py` as users type it.

- `+experiment=chest_xray_cause` on the 16 real X-rays. They hold only normal and bacterial
  cases, so the third class is DERIVED here: each pneumonia image, mirrored left-right, is
  saved again under a viral file name (`person9NNN_virus_K.jpeg`, a new patient id). The
  images are real; their viral label is not.
- `+experiment=folder_multiclass` as a sweep on scikit-learn's bundled digits (4 classes),
  written by this test as a class-folder tree of RGB PNGs, then registered, pulled and
  predicted.
- a 10-class MedMNIST-layout npz of the same digits (`data.label_mode=multiclass`).
Nothing is downloaded.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from tests.conftest import DIGIT_NAMES, digit_images, write_cause_tree, write_digits_tree

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow
TINY = ("trainer.max_epochs=2", "trainer.patience=5", "model.depth=2", "model.base_filters=8",
        "model.dense_units=16", "seed=3")


def entry(store: Path, *args: str, script: str = "run.py") -> subprocess.CompletedProcess:
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{store / 'mlflow.db'}",
           "TF_CPP_MIN_LOG_LEVEL": "3"}
    proc = subprocess.run([sys.executable, str(REPO / "search" / script), *args], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def client_of(store: Path) -> MlflowClient:
    uri = f"sqlite:///{store / 'mlflow.db'}"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


@pytest.fixture(scope="module")
def cause_tree(tmp_path_factory, chest_xray_sample_files) -> Path:
    return write_cause_tree(tmp_path_factory.mktemp("cause") / "chest_xray",
                            chest_xray_sample_files)


def test_cause_recipe_on_real_xrays_names_every_metric_for_three_classes(tmp_path, cause_tree):
    entry(tmp_path, "+experiment=chest_xray_cause", f"data.root={cause_tree}",
          "data.image_size=64", "data.batch_size=8", "data.val_fraction=0.25",
          "data.test_fraction=0.25", f"hydra.run.dir={tmp_path / 'hydra'}",
          "tracking.artifact_root=" + (tmp_path / "artifacts").as_uri(), *TINY)
    client = client_of(tmp_path)
    exp = client.get_experiment_by_name("chest-xray-cause")  # the recipe's own experiment
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED"
    classes = ["normal", "bacteria", "virus"]
    # per epoch: macro one-vs-rest AUC and the recall of each class, train and val
    for key in ("auc", "val_auc", *(f"{p}recall_{c}" for p in ("", "val_") for c in classes)):
        assert len(client.get_metric_history(run.info.run_id, key)) == 2, key
    metrics = run.data.metrics
    for split in ("val", "test"):
        for name in ("macro_recall", "macro_specificity", "macro_precision", "macro_f1",
                     "roc_auc", *(f"{m}_{c}" for m in ("recall", "precision", "f1")
                                  for c in classes)):
            assert f"eval_{split}_{name}" in metrics, (split, name, sorted(metrics))
        for binary_only in ("sensitivity", "specificity", "precision", "f1"):
            assert f"eval_{split}_{binary_only}" not in metrics
    cm = json.loads(Path(client.download_artifacts(
        run.info.run_id, "evaluation/test_confusion.json", str(tmp_path))).read_text())
    assert cm["labels"] == classes and np.array(cm["matrix"]).shape == (3, 3)
    assert cm["threshold"] is None
    counts = json.loads(Path(client.download_artifacts(
        run.info.run_id, "data/source_info.json", str(tmp_path))).read_text())["counts"]
    for split in ("train", "val", "test"):  # every class in every split (patient-aware)
        assert all(counts[split][c] > 0 for c in classes), counts
    note = run.data.tags["mlflow.note.content"]
    assert "3 classes (`normal`, `bacteria`, `virus`" in note and "argmax" in note
    assert "macro recall" in note and str(cause_tree.resolve()) in note
    assert "| val | " in note and "one-vs-rest" in note


@pytest.fixture(scope="module")
def digits_tree(tmp_path_factory) -> Path:
    """4 digit classes as root/<name>/<k>.png, RGB."""
    return write_digits_tree(tmp_path_factory.mktemp("digits") / "digits", 4)


def test_folder_multiclass_sweep_registers_pulls_and_predicts_four_digits(tmp_path, digits_tree):
    entry(tmp_path, "-m", "+experiment=folder_multiclass", f"data.root={digits_tree}",
          "data.image_size=28", "data.batch_size=32", "data.val_fraction=0.2",
          "data.test_fraction=0.2", "hydra.sweeper.n_trials=2", "hydra.sweeper.n_jobs=1",
          "hydra/sweeper/pruner=nop", f"hydra.sweep.dir={tmp_path / 'sweep'}",
          f"hydra.sweeper.storage=sqlite:///{tmp_path / 'optuna.db'}",
          "tracking.artifact_root=" + (tmp_path / "artifacts").as_uri(), *TINY[:2])
    client = client_of(tmp_path)
    classes = sorted(DIGIT_NAMES[:4])  # folder names, sorted: the output order
    exp = client.get_experiment_by_name("folder-multiclass")
    children = [r for r in client.search_runs([exp.experiment_id])
                if "optuna.trial_number" in r.data.tags]
    assert len(children) == 2
    for child in children:
        assert child.data.tags["optuna.trial_state"] == "COMPLETE"
        assert all(f"eval_test_recall_{c}" in child.data.metrics for c in classes)
        assert len(client.get_metric_history(child.info.run_id, "val_recall_three")) == 2
    (mv,) = client.search_model_versions("name='folder-multiclass-cnn'")
    assert client.get_model_version_by_alias("folder-multiclass-cnn", "champion").version == \
        mv.version
    assert mv.tags["promotion.metric"] == "roc_auc"
    assert "4 classes (`one`, `three`, `two`, `zero`, output order)" in mv.description
    assert "`p_one`" in mv.description and "argmax" in mv.description
    parent = client.get_run(children[0].data.tags["mlflow.parentRunId"])
    decision = json.loads(Path(client.download_artifacts(
        parent.info.run_id, "promotion/decision.json", str(tmp_path))).read_text())
    assert decision["tie_break"] == "macro_recall"  # the recipe's name, kept for K classes
    assert set(decision["new_metrics"]) >= {f"recall_{c}" for c in classes}

    out = tmp_path / "predictions"
    proc = entry(tmp_path, "models:/folder-multiclass-cnn@champion", str(digits_tree),
                 "--out", str(out), script="predict.py")
    assert "macro recall" in proc.stdout and "sensitivity" not in proc.stdout
    with open(out / "predictions.csv") as handle:
        rows = {Path(r["path"]).as_posix(): r for r in csv.DictReader(handle)}
    files = sorted(digits_tree.rglob("*.png"))
    assert len(rows) == len(files)
    # served as it is: raw RGB pixels through MLflow's pyfunc give predict.py's answer,
    # one p_<class> column per class and the argmax label (no threshold)
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.set_registry_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    try:
        served = mlflow.pyfunc.load_model("models:/folder-multiclass-cnn@champion")
    finally:
        mlflow.set_tracking_uri(None)
        mlflow.set_registry_uri(None)
    pixels = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files[:40]])
    frame = served.predict(pixels.astype(np.float32))
    assert list(frame.columns) == [*(f"p_{c}" for c in classes), "predicted_label", "threshold"]
    for file, (_, answer) in zip(files[:40], frame.iterrows(), strict=True):
        row = next(r for key, r in rows.items() if key.endswith(file.relative_to(
            digits_tree).as_posix()))
        assert answer["predicted_label"] == row["predicted_label"], file
        for c in classes:
            assert answer[f"p_{c}"] == pytest.approx(float(row[f"p_{c}"]), abs=1e-5)
        best = int(np.argmax([answer[f"p_{c}"] for c in classes]))
        assert answer["predicted_label"] == classes[best]


def test_ten_digit_npz_single_run_reports_each_class(tmp_path):
    images, labels = digit_images(10)
    order = np.random.default_rng(1).permutation(len(labels))
    cut = int(0.85 * len(order))
    path = tmp_path / "digits10.npz"
    np.savez(path, train_images=images[order[:cut]], train_labels=labels[order[:cut]],
             val_images=images[order[cut:]], val_labels=labels[order[cut:]])
    entry(tmp_path, f"data.path={path}", "data.label_mode=multiclass",
          f"data.class_names=[{','.join(DIGIT_NAMES)}]", "data.batch_size=64",
          "objective=val_macro_recall", f"hydra.run.dir={tmp_path / 'hydra'}",
          "tracking.artifact_root=" + (tmp_path / "artifacts").as_uri(), *TINY)
    client = client_of(tmp_path)
    (run,) = client.search_runs([client.get_experiment_by_name("pneumonia").experiment_id])
    metrics = run.data.metrics
    recalls = [metrics[f"eval_test_recall_{c}"] for c in DIGIT_NAMES]
    assert metrics["eval_test_macro_recall"] == pytest.approx(np.mean(recalls))
    assert metrics["objective"] == pytest.approx(metrics["eval_val_macro_recall"])
    report = json.loads(Path(client.download_artifacts(
        run.info.run_id, "evaluation/test_classification_report.json", str(tmp_path)))
        .read_text())
    for name in DIGIT_NAMES:  # the logged metric is scikit-learn's per-class recall
        assert metrics[f"eval_test_recall_{name}"] == pytest.approx(report[name]["recall"])
    assert len(client.get_metric_history(run.info.run_id, "val_recall_nine")) == 2
