"""Stores and artifact folders a run cannot write: named, with the fix, before any data load;
and one that becomes unwritable mid-run: named, with where the trained model still is.

Real SQLite stores made read-only with chmod, the CLI in a subprocess that file modes hold
for (tests/faults/permissions.py: the tests run as root here and in CI).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from .permissions import as_ordinary_user, make_read_only, ordinary_user  # noqa: F401 - fixture

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def run_cli(tmp: Path, store: Path, *args: str, multirun: bool = False
            ) -> subprocess.Popen:
    """search/run.py +debug=tiny on `store` (given as $MLFLOW_TRACKING_URI), as a user."""
    where = ([f"hydra.sweep.dir={tmp / 'sweep'}", "hydra.sweeper.n_trials=1",
              "hydra.sweeper.n_jobs=1", f"hydra.sweeper.storage=sqlite:///{tmp / 'optuna.db'}"]
             if multirun else [f"hydra.run.dir={tmp / 'run'}"])
    cmd = [sys.executable, str(REPO / "search" / "run.py"), *(["-m"] if multirun else []),
           *where, "+debug=tiny", "tracking.experiment=ro", *args]
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{store / 'mlflow.db'}",
           "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.Popen(as_ordinary_user(cmd), cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def used_store(folder: Path) -> Path:
    """A store a run has used before: schema, experiment, init lock, a run's artifacts."""
    from search.tracking import mlflow_runs

    try:
        mlflow_runs.setup_tracking({"uri": f"sqlite:///{folder / 'mlflow.db'}",
                                    "experiment": "ro"})
        with mlflow.start_run():
            mlflow.log_text("an earlier run", "note.txt")
    finally:
        mlflow.set_tracking_uri(None)
        mlflow.set_registry_uri(None)
    assert (folder / "mlflow.db.init.lock").is_file()
    return folder / "mlflow.db"


@pytest.mark.usefixtures("ordinary_user")
@pytest.mark.parametrize("read_only", ["mlflow.db", "mlruns/"])
def test_a_read_only_store_is_named_before_the_data_load(tmp_path, read_only):
    """chmod 444 mlflow.db, or chmod 555 mlruns/ (SQLite cannot write its journal there):
    a run and a sweep stop before the data load, naming the file and the fix."""
    store = tmp_path / "mlruns"
    db = used_store(store)
    make_read_only(db if read_only == "mlflow.db" else store)
    before = db.read_bytes()
    for multirun in (False, True):
        proc = run_cli(tmp_path, store, multirun=multirun)
        out, err = proc.communicate(timeout=300)
        assert proc.returncode != 0, out[-2000:]
        assert f"the MLflow store {db} cannot be opened for writing" in err, err[-3000:]
        assert f"chmod u+w {db} {store}" in err and "MLFLOW_TRACKING_URI" in err
        assert "Loading data" not in out + err  # before the data, not after it
        assert "sqlalchemy" not in err.lower() and "INSERT INTO" not in err
    assert db.read_bytes() == before


@pytest.mark.usefixtures("ordinary_user")
def test_an_artifact_folder_made_read_only_mid_run_is_named_and_keeps_the_model(tmp_path):
    """The start-of-run check passed; the folder turns read-only while the model trains."""
    import keras

    store = tmp_path / "mlruns"
    proc = run_cli(tmp_path, store, "trainer.max_epochs=3")
    deadline = time.monotonic() + 240
    # the last artifact the run logs before its fit starts
    while not list(store.glob("artifacts/*/artifacts/data/source_info.json")):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.02)
    make_read_only(*(Path(folder) for folder, _, _ in os.walk(store / "artifacts")))
    out, err = proc.communicate(timeout=300)
    assert proc.returncode != 0, out[-2000:]
    client = MlflowClient(f"sqlite:///{store / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("ro").experiment_id])
    folder = store / "artifacts" / run.info.run_id / "artifacts"
    checkpoint = tmp_path / "run" / "checkpoints" / "best.keras"
    assert f"cannot write MLflow artifacts: {folder}/" in err, err[-3000:]
    assert f"artifact folder {folder} (or one above it) became unwritable" in err
    assert f"nothing trained is lost: the best checkpoint is at {checkpoint}" in err
    assert "PermissionError" not in err  # named, not raw
    keras.models.load_model(checkpoint, safe_mode=True, compile=False)  # whole
    assert run.info.status == "FAILED"
