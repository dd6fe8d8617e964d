"""The nightly workflow keeps its MLflow store between nights and runs where its owner enables
it: its shell steps run here for real (bash, a GITHUB_ENV file), its cache steps are checked
against each other (the store they carry is the one the sweep writes)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import yaml

WORKFLOW = Path(__file__).resolve().parents[2] / ".github" / "workflows" / "nightly.yml"


def _jobs() -> dict:
    return yaml.safe_load(WORKFLOW.read_text())["jobs"]


def _steps(job: str) -> dict[str, dict]:
    return {s.get("name", s.get("id", s.get("uses"))): s for s in _jobs()[job]["steps"]}


def _bash(script: str, env: dict[str, str], tmp_path: Path) -> dict[str, str]:
    """Run a step's script as the runner does (bash -e); what it wrote to GITHUB_ENV/OUTPUT."""
    files = {name: tmp_path / name for name in ("GITHUB_ENV", "GITHUB_OUTPUT")}
    for path in files.values():
        path.write_text("")
    subprocess.run(["bash", "-e", "-c", script], check=True, timeout=30, env={
        "PATH": os.environ["PATH"], "GITHUB_WORKSPACE": "/w",
        **{k: str(v) for k, v in files.items()}, **env})
    lines = files["GITHUB_ENV"].read_text().splitlines()
    lines += files["GITHUB_OUTPUT"].read_text().splitlines()
    return dict(line.split("=", 1) for line in lines)


@pytest.mark.parametrize(("event", "enabled", "runs"), [
    ("schedule", "", "no"), ("schedule", "true", "yes"), ("workflow_dispatch", "", "yes"),
    ("schedule", "false", "no")])
def test_the_schedule_runs_where_the_owner_enables_it(event, enabled, runs, tmp_path) -> None:
    gate = _steps("enabled")["check"]
    assert gate["env"]["ENABLED"] == "${{ secrets.NIGHTLY_ENABLED }}"
    assert _bash(gate["run"], {"EVENT": event, "ENABLED": enabled}, tmp_path)["run"] == runs
    assert _jobs()["sweep"]["if"] == "needs.enabled.outputs.run == 'yes'"


def test_without_a_server_the_store_is_carried_from_night_to_night(tmp_path) -> None:
    steps = _steps("sweep")
    chosen = _bash(steps["Choose the MLflow store"]["run"],
                   {"SERVER_URI": "", "SERVER_USER": "", "SERVER_PASSWORD": ""}, tmp_path)
    studies = "sqlite:////w/mlruns/nightly-optuna.db"  # carried with the store: warm starts
    assert chosen == {"MLFLOW_TRACKING_URI": "sqlite:////w/mlruns/mlflow.db",
                      "NIGHTLY_STORE": "carried", "NIGHTLY_OPTUNA_STORAGE": studies}
    restore = steps["Restore the last night's MLflow store and studies"]
    save = steps["Keep tonight's MLflow store and studies for the next night"]
    assert restore["uses"].startswith("actions/cache/restore@")
    assert save["uses"].startswith("actions/cache/save@")
    assert restore["with"]["path"] == save["with"]["path"] == "mlruns"  # where the URI points
    # the restore never hits exactly and falls back on the newest saved night
    assert save["with"]["key"].startswith(restore["with"]["restore-keys"])
    assert restore["with"]["key"] == save["with"]["key"]
    assert "always()" in save["if"] and "hashFiles('mlruns/mlflow.db')" in save["if"]
    order = list(steps)
    assert [order.index(s) for s in (
        "Choose the MLflow store", "Restore the last night's MLflow store and studies",
        "Nightly sweep", "Keep tonight's MLflow store and studies for the next night",
        "Fail on a missed floor or a failed sweep")] == sorted(order.index(s) for s in (
        "Choose the MLflow store", "Restore the last night's MLflow store and studies",
        "Nightly sweep", "Keep tonight's MLflow store and studies for the next night",
        "Fail on a missed floor or a failed sweep"))
    review = steps["Upload the MLflow store for review"]
    assert review["with"]["path"].rstrip("/") == "mlruns"


def test_a_server_secret_replaces_the_carried_store(tmp_path) -> None:
    step = _steps("sweep")["Choose the MLflow store"]
    chosen = _bash(step["run"], {"SERVER_URI": "https://mlflow.example", "SERVER_USER": "",
                                 "SERVER_PASSWORD": ""}, tmp_path)
    # no empty login variables: MLflow's client would send an empty user
    assert chosen == {"MLFLOW_TRACKING_URI": "https://mlflow.example", "NIGHTLY_STORE": "server",
                      "NIGHTLY_OPTUNA_STORAGE": "sqlite:////w/mlruns/nightly-optuna.db"}
    chosen = _bash(step["run"], {"SERVER_URI": "https://mlflow.example", "SERVER_USER": "ci",
                                 "SERVER_PASSWORD": "pw"}, tmp_path)
    assert chosen["MLFLOW_TRACKING_USERNAME"] == "ci" and chosen["MLFLOW_TRACKING_PASSWORD"] == "pw"
    assert "MLFLOW_TRACKING_URI" not in _jobs()["sweep"].get("env", {})  # chosen, not fixed


def test_each_night_warm_starts_from_the_last_nights_study() -> None:
    """The recipe's study is tonight's own, in the carried database, warm-started from the
    newest earlier night (the workflow's NIGHTLY_OPTUNA_STORAGE; unset: the sweep folder)."""
    recipe = yaml.safe_load((WORKFLOW.parents[2] / "conf" / "experiment" / "nightly.yaml")
                            .read_text())
    sweeper = recipe["hydra"]["sweeper"]
    assert sweeper["warm_start"]["studies"] == ["nightly-*"]
    assert sweeper["study_name"].startswith("nightly-${now:")
    assert sweeper["storage"] == "${oc.env:NIGHTLY_OPTUNA_STORAGE,null}"
    steps = _steps("sweep")
    restore = steps["Restore the last night's MLflow store and studies"]
    assert "if" not in restore  # the studies are carried with a tracking server too
    save = steps["Keep tonight's MLflow store and studies for the next night"]
    assert "hashFiles('mlruns/nightly-optuna.db')" in save["if"]
