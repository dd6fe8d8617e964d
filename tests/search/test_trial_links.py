"""optuna-dashboard links each trial to its MLflow run, for a local store too: the trial's
note (Markdown, which the dashboard renders) and the `mlflow_run_url` attr the report links."""

from __future__ import annotations

from pathlib import Path

import mlflow
import optuna
import pytest

from search.training.lifecycle import link_trial_to_run


def _note(study: optuna.Study, trial_id: int) -> tuple[int, str]:
    """The note as optuna-dashboard reads it (optuna_dashboard/_note.py)."""
    attrs = study._storage.get_study_system_attrs(study._study_id)
    pieces = sorted((int(k.rsplit(":", 1)[1]), v) for k, v in attrs.items()
                    if k.startswith(f"dashboard:{trial_id}:note_str:"))
    return int(attrs.get(f"dashboard:{trial_id}:note_ver", 0)), "".join(v for _, v in pieces)


@pytest.fixture()
def study(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> optuna.Study:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    return optuna.create_study(study_name="s", storage=f"sqlite:///{tmp_path / 'optuna.db'}")


def test_local_store_trial_links_its_run(study: optuna.Study) -> None:
    trial = study.ask()
    link_trial_to_run(trial, "7", "abc123", None)
    frozen = study.trials[0]
    url = frozen.user_attrs["mlflow_run_url"]
    assert url.startswith("http") and url.endswith("/#/experiments/7/runs/abc123"
                                                   "?workflowType=machine_learning")
    assert "mlflow ui" in frozen.user_attrs["mlflow_run_url_note"]
    version, body = _note(study, frozen._trial_id)
    assert version == 1 and body.startswith(f"MLflow run: [abc123]({url})")


def test_server_url_is_kept_and_a_written_note_is_not_overwritten(study: optuna.Study) -> None:
    first, second = study.ask(), study.ask()
    link_trial_to_run(first, "1", "r1", "https://mlflow.example/#/experiments/1/runs/r1")
    assert _note(study, study.trials[0]._trial_id)[1] == (
        "MLflow run: [r1](https://mlflow.example/#/experiments/1/runs/r1)")
    assert "mlflow_run_url_note" not in study.trials[0].user_attrs
    key = f"dashboard:{study.trials[1]._trial_id}"
    study._storage.set_study_system_attr(study._study_id, f"{key}:note_ver", 3)
    study._storage.set_study_system_attr(study._study_id, f"{key}:note_str:0", "mine")
    link_trial_to_run(second, "1", "r2", "https://mlflow.example/#/experiments/1/runs/r2")
    assert _note(study, study.trials[1]._trial_id) == (3, "mine")
