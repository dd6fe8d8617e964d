"""A real `mlflow server` restarted while a sweep's trial trains: nothing is dropped."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(tmp: Path, port: int) -> subprocess.Popen:
    mlflow = Path(sys.executable).parent / "mlflow"
    proc = subprocess.Popen(
        [str(mlflow), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{tmp / 'server.db'}",
         "--artifacts-destination", str(tmp / "server-artifacts")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
            return proc
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError("mlflow server did not start")


def stop_server(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, 9)
    proc.wait(timeout=30)


def test_server_restart_mid_sweep_delivers_every_metric(tmp_path):
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    server = start_server(tmp_path, port)
    marker = tmp_path / "outage.marker"
    marker.write_text("tracking_outage")
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "TF_CPP_MIN_LOG_LEVEL": "3",
           "XRAY_FAULT": "tracking_outage", "XRAY_FAULT_MARKER": str(marker)}
    sweep = subprocess.Popen(
        [sys.executable, str(REPO / "search" / "run.py"), "-m",
         f"hydra.sweep.dir={tmp_path / 'sweep'}",
         f"hydra.sweeper.storage=sqlite:///{tmp_path / 'optuna.db'}",
         "hydra.sweeper.n_trials=1", "hydra.sweeper.n_jobs=1", "hydra/sweeper/pruner=nop",
         "hydra.sweeper.study_name=outage", "tracking.experiment=outage",
         "data.subset_fraction=0.1", "trainer.max_epochs=3", "trainer.patience=5",
         "model.depth=2", "model.base_filters=8", "registry.model_name=outage-cnn"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        reached = Path(f"{marker}.reached")
        deadline = time.monotonic() + 300
        while not reached.exists() and sweep.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert reached.exists(), "the trial never reached its second epoch"
        stop_server(server)  # the trial is between epochs 1 and 2
        marker.unlink()  # it trains on and logs into the outage
        time.sleep(6)
        server = start_server(tmp_path, port)
        out, _ = sweep.communicate(timeout=600)
    finally:
        if sweep.poll() is None:
            sweep.kill()
        if server.poll() is None:
            stop_server(server)
    assert sweep.returncode == 0, out[-5000:]

    server = start_server(tmp_path, port)
    try:
        client = MlflowClient(uri, registry_uri=uri)
        runs = client.search_runs([client.get_experiment_by_name("outage").experiment_id])
        assert sorted(r.info.status for r in runs) == ["FINISHED", "FINISHED"]
        trial = next(r for r in runs if "optuna.trial_number" in r.data.tags)
        history = client.get_metric_history(trial.info.run_id, "val_loss")
        assert sorted(m.step for m in history) == [0, 1, 2]  # the outage epochs arrived too
        assert client.get_model_version_by_alias("outage-cnn", "champion").run_id == (
            trial.info.run_id)
    finally:
        stop_server(server)
