"""Faults other than kills: stores that are down or corrupt, memory, disk, divergence, locks.

Each drives the real CLI in a subprocess against real SQLite stores.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient

from . import invariants

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow
TINY = ["data.subset_fraction=0.1", "trainer.max_epochs=2", "model.depth=2",
        "model.base_filters=8", "trainer.verbose=0"]


def run_py(tmp: Path, *args: str, multirun: bool = False, env: dict | None = None,
           timeout: int = 600) -> subprocess.CompletedProcess:
    environment = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}",
                   "TF_CPP_MIN_LOG_LEVEL": "3", **(env or {})}
    where = ([f"hydra.sweep.dir={tmp / 'sweep'}",
              f"hydra.sweeper.storage=sqlite:///{tmp / 'optuna.db'}"] if multirun
             else [f"hydra.run.dir={tmp / 'run'}"])
    cmd = [sys.executable, str(REPO / "search" / "run.py"), *(["-m"] if multirun else []),
           *where, "tracking.artifact_root=" + (tmp / "artifacts").as_uri(), *args]
    return subprocess.run(cmd, cwd=REPO, env=environment, capture_output=True, text=True,
                          timeout=timeout)


def fault_env(tmp: Path, point: str, scope: str = "process") -> dict[str, str]:
    marker = tmp / f"{point}.marker"
    marker.write_text(point)
    return {"XRAY_FAULT": point, "XRAY_FAULT_MARKER": str(marker), "XRAY_FAULT_SCOPE": scope}


def runs(tmp: Path) -> list:
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    client = MlflowClient(uri, registry_uri=uri)
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


def test_unreachable_tracking_server_fails_in_seconds_before_data(tmp_path):
    for multirun in (False, True):
        start = time.monotonic()
        proc = run_py(tmp_path, "tracking.uri=http://127.0.0.1:9", *TINY, multirun=multirun)
        elapsed = time.monotonic() - start
        assert proc.returncode != 0
        assert "http://127.0.0.1:9" in proc.stderr and "does not answer" in proc.stderr
        assert "Loading data" not in proc.stdout + proc.stderr
        assert elapsed < 30, elapsed  # seconds of start-up, not minutes of HTTP retries


@pytest.mark.parametrize("store", ["optuna", "mlflow"])
def test_corrupt_sqlite_file_is_named_and_never_overwritten(tmp_path, store):
    bad = tmp_path / f"{store}.db"
    bad.write_text("this is not a database\n")
    proc = run_py(tmp_path, *TINY, "hydra.sweeper.n_trials=1", multirun=True)
    assert proc.returncode != 0
    assert str(bad) in proc.stderr and "not a usable" in proc.stderr and "move it aside" in (
        proc.stderr)
    assert bad.read_text() == "this is not a database\n"


def test_unknown_storage_scheme_names_the_setting(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(REPO / "search" / "run.py"), "-m",
         f"hydra.sweep.dir={tmp_path / 'sweep2'}", "hydra.sweeper.storage=foo://x", *TINY],
        cwd=REPO, capture_output=True, text=True, timeout=300,
        env={**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"})
    assert proc.returncode != 0 and "hydra.sweeper.storage='foo://x'" in proc.stderr
    assert not [r for r in runs(tmp_path) if r.info.status == "RUNNING"]


def test_killed_run_is_closed_by_the_next_command_and_divergence_fails(tmp_path):
    killed = run_py(tmp_path, *TINY, env=fault_env(tmp_path, "mid_epoch"))
    assert killed.returncode == -9
    assert [r.info.status for r in runs(tmp_path)] == ["RUNNING"]  # nobody could end it

    diverged = run_py(tmp_path, *TINY, "optimizer.learning_rate=1000")
    assert diverged.returncode != 0
    assert "training diverged" in diverged.stderr and "optimizer.learning_rate" in (
        diverged.stderr)
    statuses = sorted((r.info.status, r.data.tags.get("process.ended", "")) for r in runs(
        tmp_path))
    assert statuses == [("FAILED", ""), ("KILLED", "killed: its process died")], statuses


def test_disk_full_on_a_checkpoint_fails_clearly_and_keeps_the_previous_best(tmp_path):
    proc = run_py(tmp_path, *TINY, "trainer.max_epochs=3",
                  env=fault_env(tmp_path, "disk_full"))
    assert proc.returncode != 0
    assert "no space left on the device writing the checkpoint" in proc.stderr
    assert "the previous best checkpoint" in proc.stderr and "is intact" in proc.stderr
    best = tmp_path / "run" / "checkpoints" / "best.keras"
    import keras

    keras.models.load_model(best, safe_mode=True, compile=False)  # the epoch-1 best, whole
    assert not list(best.parent.glob("*.partial.keras"))
    assert [r.info.status for r in runs(tmp_path)] == ["FAILED"]


def test_four_slots_on_sqlite_and_an_out_of_memory_trial(tmp_path):
    """4 parallel workers on the default SQLite stores; one trial runs out of memory."""
    proc = run_py(tmp_path, *TINY, "hydra.sweeper.n_jobs=4", "hydra.sweeper.n_trials=4",
                  "hydra.sweeper.study_name=slots", "hydra/sweeper/pruner=nop",
                  "registry.enabled=false", multirun=True, env=fault_env(tmp_path, "oom"),
                  timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    assert "database is locked" not in out
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.load_study(study_name="slots", storage=storage)
    states = sorted(t.state.name for t in study.trials)
    assert states == ["COMPLETE", "COMPLETE", "COMPLETE", "FAIL"], states
    failed = next(t for t in study.trials if t.state.name == "FAIL")
    assert "out of memory while training" in failed.user_attrs["fail_reason"]
    invariants.check(f"sqlite:///{tmp_path / 'mlflow.db'}", storage, "slots", 4,
                     tmp_path / "sweep", {})


@pytest.fixture
def read_only_dir(tmp_path):
    """A read-only bind mount of a folder (as root); skipped where mounts are not allowed."""
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a read-only folder")
    src, ro = tmp_path / "src", tmp_path / "ro"
    src.mkdir()
    ro.mkdir()

    def mount() -> Path:
        for cmd in (["mount", "--bind", str(src), str(ro)],
                    ["mount", "-o", "remount,ro,bind", str(ro)]):
            if subprocess.run(cmd, capture_output=True).returncode != 0:
                pytest.skip(f"cannot {' '.join(cmd[:2])} here")
        return ro

    yield src, mount
    subprocess.run(["umount", str(ro)], capture_output=True)


def test_read_only_stores_are_named_before_training(tmp_path, read_only_dir):
    src, mount = read_only_dir
    good = run_py(tmp_path, "tracking.experiment=ro", "trainer.max_epochs=1",
                  "data.subset_fraction=0.05", env={"MLFLOW_TRACKING_URI": f"sqlite:///{src}/m.db"})
    assert good.returncode == 0, good.stderr[-3000:]  # a store and artifacts made writable
    ro = mount()
    for args, message in [
        ((f"tracking.uri=sqlite:///{ro}/m.db",), f"the MLflow store {ro}/m.db cannot be opened"),
        (("tracking.experiment=new", f"tracking.artifact_root=file://{ro}/artifacts"),
         f"cannot write MLflow artifacts to {ro}/artifacts"),
    ]:
        proc = run_py(tmp_path, *args, *TINY)
        assert proc.returncode != 0 and message in proc.stderr, (args, proc.stderr[-2000:])
        assert "Loading data" not in proc.stdout + proc.stderr
