"""Intervals live where people read them, not as metric series (issue 28, item 5).

A run keeps its 95 % intervals in `evaluation/<split>_intervals.json` (external sets too) and
in its description; model_info.json, the model card and the sweep report read them from
those artifacts. A trained run has no `_ci_` series and at most about 30 series in all.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import mlflow
import optuna
import pytest
from mlflow.tracking import MlflowClient

from search.evaluation.intervals import INTERVALS_ARTIFACT
from search.model_registry import model_store
from search.model_registry.model_card import model_card, with_interval
from search.sweep import report

# The README's figure for a trial: Keras' per-epoch series, eval_val_*/eval_test_*, threshold,
# epochs_trained, best_epoch, objective (29 with the default config).
MAX_SERIES = 30

POINTS = {"threshold": 0.41, "eval_val_roc_auc": 0.97, "eval_test_roc_auc": 0.95,
          "eval_test_sensitivity": 0.96, "ext_xray16_roc_auc": 0.7, "loss": 0.3}
INTERVALS = {  # as evaluate_run writes them: every metric, NaN as null, val has none
    "test": {"roc_auc": [0.9, 0.99], "sensitivity": [0.91, 1.0], "recall": [0.91, 1.0],
             "specificity": [None, None]},
    "ext_xray16": {"roc_auc": [0.45, 0.88]},
}


def _run_with_interval_artifacts(tmp_path: Path) -> tuple[MlflowClient, str, str]:
    """A real store holding one run logged as evaluate_run logs it: points as metrics,
    intervals as JSON artifacts."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("e", artifact_location=(tmp_path / "a").as_uri())
    run_id = client.create_run(experiment).info.run_id
    for key, value in POINTS.items():
        client.log_metric(run_id, key, value)
    for split, found in INTERVALS.items():
        client.log_dict(run_id, found, INTERVALS_ARTIFACT.format(split=split))
    client.log_dict(run_id, {"matrix": [[1, 0], [0, 1]]}, "evaluation/test_confusion.json")
    return client, run_id, uri


def test_run_metrics_read_the_intervals_from_the_runs_json_artifacts(tmp_path):
    client, run_id, _ = _run_with_interval_artifacts(tmp_path)
    metrics = model_store.run_metrics(client, run_id)
    # the points as logged, and beside each the interval its split's JSON holds; none for
    # `recall` (no point value logged), `specificity` (undefined) or val (none drawn)
    assert metrics == {
        "threshold": 0.41, "eval_val_roc_auc": 0.97, "eval_test_roc_auc": 0.95,
        "eval_test_sensitivity": 0.96, "ext_xray16_roc_auc": 0.7,
        "eval_test_roc_auc_ci_low": 0.9, "eval_test_roc_auc_ci_high": 0.99,
        "eval_test_sensitivity_ci_low": 0.91, "eval_test_sensitivity_ci_high": 1.0,
        "ext_xray16_roc_auc_ci_low": 0.45, "ext_xray16_roc_auc_ci_high": 0.88}
    info = {"name": "m", "version": 1, "aliases": [], "model_uri": "models:/m/1",
            "class_names": ["normal", "pneumonia"], "threshold": 0.41,
            "preprocessing": {"image_size": 28}, "metrics": metrics}
    card = model_card(info)
    assert "| roc_auc | 0.9700 | 0.9500 [0.9000, 0.9900] |" in card
    assert "sensitivity 0.9600 [0.9100, 1.0000]" in card  # the operating point
    assert "| xray16 | roc_auc | 0.7000 [0.4500, 0.8800] |" in card  # the external set


def test_the_sweep_report_shows_the_best_trials_intervals_from_its_run(tmp_path):
    _, run_id, uri = _run_with_interval_artifacts(tmp_path)
    study = optuna.create_study(study_name="s", direction="minimize")
    study.set_metric_names(["val_loss"])

    def objective(trial: optuna.Trial) -> float:
        trial.set_user_attr("mlflow_run_id", run_id)
        return trial.suggest_float("x", 0.0, 1.0)

    study.optimize(objective, n_trials=1)
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:  # held_out: the parent's copy of the best trial's metrics, as the sweep passes it
        report.write_report(study, tmp_path / "report", {k: v for k, v in POINTS.items()
                                                          if k.startswith(("eval_", "ext_"))})
    finally:
        mlflow.set_tracking_uri(previous)
    page = (tmp_path / "report" / "sweep_report.html").read_text()
    assert "roc_auc 0.9500 [0.9000, 0.9900]" in page
    assert "sensitivity 0.9600 [0.9100, 1.0000]" in page
    assert "external xray16 (95 % interval)" in page and "0.7000 [0.4500, 0.8800]" in page


@pytest.mark.slow
def test_a_trained_run_keeps_its_intervals_out_of_its_metric_series(registry_store, tmp_path):
    from search import pull
    from search.model_registry import registration

    run_id = registry_store.runs.good_run_id  # search.training.trainer.train, as a trial
    client = MlflowClient(registry_store.uri)
    run = client.get_run(run_id)
    metrics = run.data.metrics
    assert not [k for k in metrics if "_ci_" in k], sorted(metrics)
    assert len(metrics) <= MAX_SERIES, sorted(metrics)
    # the intervals: the JSON artifact, ...
    path = client.download_artifacts(run_id, INTERVALS_ARTIFACT.format(split="test"),
                                     str(tmp_path))
    low, high = json.loads(Path(path).read_text())["roc_auc"]
    assert low <= metrics["eval_test_roc_auc"] <= high and low < high
    # ... the run's description (its page) ...
    note = run.data.tags["mlflow.note.content"]
    assert re.search(r"^- test: .*ROC AUC [\d.]+ \[[\d.]+, [\d.]+\]", note, re.M), note
    # ... and the pulled model_info.json and MODEL_CARD.md
    registration.register_and_promote(run_id)
    folder = tmp_path / "champion"
    assert pull.main(["--out", str(folder), "--tracking-uri", registry_store.uri]) == 0
    info = json.loads((folder / "model_info.json").read_text())["metrics"]
    assert (info["eval_test_roc_auc_ci_low"], info["eval_test_roc_auc_ci_high"]) == (
        pytest.approx(low), pytest.approx(high))
    card = (folder / "MODEL_CARD.md").read_text()
    assert f"| {with_interval(info, 'eval_test_roc_auc')} |" in card
    assert re.search(r"roc_auc \| [\d.]+ \| [\d.]+ \[[\d.]+, [\d.]+\] \|", card), card
