"""SIGKILL at six points of a real sweep, then the same command again: nothing is lost.

Each point is reached deterministically through `search.faults` (an env-var hook that fires
once, guarded by a marker file), not by a sleep. `group` kills the whole command (sweeper
and workers); `process` kills only the worker running the trial while the sweeper lives on.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient

from . import invariants

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow

N_TRIALS = 2
STUDY = "faults"


def command(tmp: Path) -> list[str]:
    return [
        sys.executable, str(REPO / "search" / "run.py"), "-m",
        f"hydra.sweep.dir={tmp / 'sweep'}",
        f"hydra.sweeper.storage=sqlite:///{tmp / 'optuna.db'}",
        "tracking.artifact_root=" + (tmp / "artifacts").as_uri(),
        "tracking.experiment=faults", f"hydra.sweeper.study_name={STUDY}",
        f"hydra.sweeper.n_trials={N_TRIALS}", "hydra.sweeper.n_jobs=1",
        "hydra.sweeper.trials_per_worker=null", "hydra/sweeper/pruner=nop",
        "hydra.sweeper.heartbeat_interval=1", "hydra.sweeper.grace_period=3",
        "data.subset_fraction=0.1", "trainer.max_epochs=2", "model.depth=2",
        "model.base_filters=8", "registry.model_name=faults-cnn",
    ]


def run(tmp: Path, fault: str | None = None, scope: str = "group") -> subprocess.CompletedProcess:
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}",
           "TF_CPP_MIN_LOG_LEVEL": "3"}
    if fault:
        marker = tmp / "fault.marker"
        marker.write_text(fault)
        env.update({"XRAY_FAULT": fault, "XRAY_FAULT_MARKER": str(marker),
                    "XRAY_FAULT_SCOPE": scope})
    return subprocess.run(command(tmp), cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=900, start_new_session=True)


def output(proc: subprocess.CompletedProcess) -> str:
    return proc.stdout[-3000:] + proc.stderr[-6000:]


@pytest.mark.parametrize(("point", "scope"), [
    ("data_loading", "group"),
    ("mid_epoch", "process"),
    ("checkpoint_write", "process"),
    ("model_logging", "group"),
    ("sweep_report", "group"),
    ("promotion", "group"),
])
def test_kill_then_rerun_loses_nothing(tmp_path, point, scope):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    faulted = run(tmp_path, point, scope)
    assert not (tmp_path / "fault.marker").exists(), f"{point} was never reached\n" + output(
        faulted)
    if scope == "group":
        assert faulted.returncode == -signal.SIGKILL, output(faulted)
    else:  # the sweeper outlived its worker: the trial failed, was retried, the sweep finished
        assert faulted.returncode == 0, output(faulted)
        study = optuna.load_study(study_name=STUDY, storage=storage)
        failed = [t for t in study.trials if t.state.name == "FAIL"]
        assert len(failed) == 1 and "worker process died" in failed[0].user_attrs["fail_reason"]
        assert "re-queued with the same params" in faulted.stderr + faulted.stdout
    before = invariants.completed(storage, STUDY)

    again = run(tmp_path)
    assert again.returncode == 0, output(again)
    counts = invariants.check(uri, storage, STUDY, N_TRIALS, tmp_path / "sweep", before)
    assert counts["complete"] == N_TRIALS, counts

    client = MlflowClient(uri, registry_uri=uri)
    champion = client.get_model_version_by_alias("faults-cnn", "champion")
    assert champion.tags["run_id"] in {r.info.run_id for r in client.search_runs(
        [client.get_experiment_by_name("faults").experiment_id])}
    if point == "checkpoint_write":  # the killed write left its partial file, never best.keras
        assert list((tmp_path / "sweep").rglob("best.partial.keras"))
    if point == "promotion":  # the version registered before the kill got its alias on re-run
        assert len(client.search_model_versions("name='faults-cnn'")) == 1
