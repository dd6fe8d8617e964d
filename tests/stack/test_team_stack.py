"""The team's workflow on a real PostgreSQL and a real `mlflow server`: three sweep workers
share one study, every trial has its run on the server, the champion is pulled from it and
predicts with the server stopped, and the database password appears nowhere."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient

REPO = Path(__file__).resolve().parents[2]
JPEGS = REPO.parent / "shared" / "data" / "chest_xray_sample" / "val"
pytestmark = pytest.mark.slow

TINY = ("data.subset_fraction=0.05", "trainer.max_epochs=2", "hydra.sweeper.n_jobs=1",
        "hydra.sweeper.n_trials=6", "hydra.sweeper.study_name=team",
        "tracking.experiment=team", "registry.model_name=team-cnn")


def test_three_workers_share_one_postgres_study_and_one_server(postgres, mlflow_server,
                                                               tmp_path):
    env = {**os.environ, "OPTUNA_STORAGE": postgres.url("optuna"),
           "MLFLOW_TRACKING_URI": mlflow_server.uri, "TF_CPP_MIN_LOG_LEVEL": "3",
           "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
    workers = [
        subprocess.Popen(
            [sys.executable, str(REPO / "search" / "run.py"), "-m",
             f"hydra.sweep.dir={tmp_path / f'worker{i}'}", *TINY],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(3)
    ]
    logs = [w.communicate(timeout=900)[0] for w in workers]
    for w, log in zip(workers, logs, strict=True):
        assert w.returncode == 0, log[-4000:]

    # One study, exactly n_trials, distinct numbers and parameter sets.
    study = optuna.load_study(study_name="team", storage=postgres.url("optuna"))
    trials = study.get_trials()
    assert len(trials) == 6 and {t.state.name for t in trials} <= {"COMPLETE", "PRUNED"}
    assert sorted(t.number for t in trials) == list(range(6))
    assert len({tuple(sorted(t.params.items())) for t in trials}) == 6
    per_worker = [sum("] started  slot" in line for line in log.splitlines()) for log in logs]
    assert sum(per_worker) == 6 and all(n >= 1 for n in per_worker), per_worker

    # Every trial's child run on the server, under one parent run per worker.
    client = MlflowClient(mlflow_server.uri, registry_uri=mlflow_server.uri)
    experiment = client.get_experiment_by_name("team")
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    parents = {r.info.run_id for r in runs if r.data.tags.get("sweep.parent") == "true"}
    children = [r for r in runs if "optuna.trial_number" in r.data.tags]
    assert len(parents) == 3
    assert sorted(int(r.data.tags["optuna.trial_number"]) for r in children) == list(range(6))
    assert {r.data.tags["mlflow.parentRunId"] for r in children} <= parents

    # The champion is registered on the server.
    champion = client.get_model_version_by_alias("team-cnn", "champion")
    assert int(champion.version) >= 1

    # The password never reaches logs, params, tags or the sweep folders.
    secret = postgres.password
    assert not any(secret in log for log in logs)
    for run in runs:
        assert secret not in repr(run.data.params) + repr(run.data.tags)
    for path in tmp_path.rglob("*"):
        if path.is_file() and path.suffix in (".yaml", ".json", ".log", ".csv", ".html"):
            assert secret not in path.read_text(errors="ignore"), path

    # Pull from the server, then predict from the pulled folder with the server stopped.
    pulled = tmp_path / "pulled"
    subprocess.run([sys.executable, str(REPO / "search" / "pull.py"), "--name", "team-cnn",
                    "--out", str(pulled), "--tracking-uri", mlflow_server.uri],
                   cwd=REPO, env=env, check=True, capture_output=True, text=True, timeout=300)
    os.killpg(mlflow_server.proc.pid, 9)
    mlflow_server.proc.wait(timeout=30)
    out = tmp_path / "predictions"
    proc = subprocess.run([sys.executable, str(REPO / "search" / "predict.py"), str(pulled),
                           str(JPEGS), "--out", str(out)],
                          cwd=REPO, env={**env, "MLFLOW_TRACKING_URI": "http://127.0.0.1:9"},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    csv = next(out.glob("*.csv")).read_text().splitlines()
    assert len(csv) == 1 + 16  # a header and the 16 real chest X-rays
