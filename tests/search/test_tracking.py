"""Tracking store resolution and config flattening against a real SQLite MLflow store."""

from pathlib import Path

import mlflow
from omegaconf import OmegaConf

from search.tracking import mlflow_runs as tracking


def test_uri_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    default = tracking.resolve_tracking_uri(None)
    assert default == f"sqlite:///{tracking.REPO_ROOT / 'mlruns' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///from-env.db")
    assert tracking.resolve_tracking_uri(None) == "sqlite:///from-env.db"
    assert tracking.resolve_tracking_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"


def test_artifacts_sit_beside_sqlite_store(tmp_path):
    root = tracking.default_artifact_root(f"sqlite:///{tmp_path}/mlflow.db")
    assert root == (tmp_path / "artifacts").as_uri()
    assert tracking.default_artifact_root("http://127.0.0.1:5000") is None


def test_flatten_config_dotted_keys():
    cfg = OmegaConf.create({"a": {"b": 1, "c": [1, 2]}, "d": "x"})
    assert tracking.flatten_config(cfg) == {"a.b": 1, "a.c": "[1, 2]", "d": "x"}


def test_setup_tracking_creates_experiment_with_local_artifacts(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    exp_id = tracking.setup_tracking({"uri": None, "experiment": "t-exp"})
    assert tracking.setup_tracking({"uri": None, "experiment": "t-exp"}) == exp_id
    exp = mlflow.get_experiment(exp_id)
    assert exp.artifact_location == (tmp_path / "artifacts").as_uri()
    cfg = OmegaConf.create({"seed": 3, "model": {"depth": 2}})
    with mlflow.start_run() as run:
        tracking.log_run_context(cfg)
    got = mlflow.get_run(run.info.run_id)
    # outside a Hydra job: only the key values (model.depth sits in the config artifact)
    assert got.data.params == {"seed": "3"}
    config = mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/config/config.yaml")
    assert "depth: 2" in config
    assert got.data.tags["version.tensorflow"].startswith("2.21")


def _first_connect(uri: str) -> str:
    return tracking.setup_tracking({"uri": uri, "experiment": "race"})


def test_experiments_open_on_training_runs_old_or_new(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    new_id = tracking.setup_tracking({"uri": None, "experiment": "new"})
    assert mlflow.get_experiment(new_id).tags[tracking.EXPERIMENT_KIND] == tracking.TRAINING_KIND
    old_id = mlflow.create_experiment("made-by-hand")  # a store from before the kind tag
    assert tracking.EXPERIMENT_KIND not in mlflow.get_experiment(old_id).tags
    assert tracking.setup_tracking({"uri": None, "experiment": "made-by-hand"}) == old_id
    assert mlflow.get_experiment(old_id).tags[tracking.EXPERIMENT_KIND] == tracking.TRAINING_KIND


def test_owner_alive_only_judges_this_hosts_processes():
    import os
    import subprocess
    import sys
    import time

    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    here = tracking.host_id()
    assert tracking.owner_alive({"process.host": here, "process.pid": str(os.getpid())})
    assert tracking.owner_alive({"process.host": here, "process.pid": done.stdout.strip()}) \
        is False
    assert tracking.owner_alive({"process.host": "another-box", "process.pid": "1"}) is None
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])  # exits, not reaped yet
    for _ in range(100):
        stat = Path(f"/proc/{zombie.pid}/stat").read_text()
        if stat.rsplit(")", 1)[-1].split()[0] == "Z":
            break
        time.sleep(0.05)
    assert tracking.owner_alive({"process.host": here, "process.pid": str(zombie.pid)}) \
        is False
    zombie.wait()


def test_two_processes_creating_one_new_store_at_once(tmp_path):
    """Two sweep processes on a new SQLite store: schema creation must not collide."""
    import multiprocessing

    uri = f"sqlite:///{tmp_path}/new.db"
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        ids = pool.map(_first_connect, [uri, uri])
    assert ids[0] == ids[1]
