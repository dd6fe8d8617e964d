"""SIGKILL at six points of a real sweep, each time followed by the same command again:
nothing is lost.

Each point is reached deterministically through `search.faults` (an env-var hook that fires
once, guarded by a marker file per point), not by a sleep. `group` kills the whole command
(sweeper and workers); `process` kills only the worker running the trial while the sweeper
lives on. The points are chained on one study, each re-run meeting the next fault, so the
six kills cost five commands instead of twelve (minutes of CI on 2 cores).
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
        # two workers die on purpose in one command, and one trial may meet all four kills
        "hydra.sweeper.max_failure_rate=1.0", "hydra.sweeper.max_retry=6",
        "data.subset_fraction=0.1", "trainer.max_epochs=2", "model.depth=2",
        "model.base_filters=8", "registry.model_name=faults-cnn",
    ]


def run(tmp: Path, fault: str | None = None) -> subprocess.CompletedProcess:
    """The command, with ``fault`` (``point@scope,...``) armed, one marker file per point."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}",
           "TF_CPP_MIN_LOG_LEVEL": "3"}
    if fault:
        for item in fault.split(","):
            marker(tmp, item.split("@")[0]).write_text(item)
        env.update({"XRAY_FAULT": fault, "XRAY_FAULT_MARKER": str(tmp / "{point}.marker")})
    return subprocess.run(command(tmp), cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=900, start_new_session=True)


def marker(tmp: Path, point: str) -> Path:
    return tmp / f"{point}.marker"


def output(proc: subprocess.CompletedProcess) -> str:
    return proc.stdout[-3000:] + proc.stderr[-6000:]


# Each step: the faults armed for one command, and whether the command itself is killed.
CHAIN = [
    ("data_loading@group", True),
    ("model_logging@group", True),
    # the sweeper outlives two workers (each trial failed and retried), then is killed with
    # a version registered but its alias not set yet
    ("mid_epoch@process,checkpoint_write@process,promotion@group", True),
    ("sweep_report@group", True),  # the study is complete: only the end of the sweep runs
    (None, False),
]


def test_kill_at_every_point_then_rerun_loses_nothing(tmp_path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    before: dict[int, float] = {}
    for fault, killed in CHAIN:
        proc = run(tmp_path, fault)
        for item in (fault or "").split(","):
            if item:
                point = item.split("@")[0]
                assert not marker(tmp_path, point).exists(), (
                    f"{point} was never reached\n" + output(proc))
        assert proc.returncode == (-signal.SIGKILL if killed else 0), (fault, output(proc))
        now = invariants.completed(storage, STUDY)
        for number, value in before.items():  # no completed trial lost or changed
            assert now.get(number) == value, (fault, number, value, now)
        before = now
        if fault and "mid_epoch" in fault:  # the dead workers' trials failed and were retried
            study = optuna.load_study(study_name=STUDY, storage=storage)
            died = [t for t in study.trials if t.state.name == "FAIL"
                    and "worker process died" in t.user_attrs.get("fail_reason", "")]
            assert len(died) == 2, [(t.number, t.state.name, t.user_attrs) for t in study.trials]
            assert "re-queued with the same params" in proc.stderr + proc.stdout
            # the killed checkpoint write left its partial file, never best.keras
            assert list((tmp_path / "sweep").rglob("best.partial.keras"))

    counts = invariants.check(uri, storage, STUDY, N_TRIALS, tmp_path / "sweep", {})
    assert counts["complete"] == N_TRIALS, counts
    client = MlflowClient(uri, registry_uri=uri)
    champion = client.get_model_version_by_alias("faults-cnn", "champion")
    assert champion.tags["run_id"] in {r.info.run_id for r in client.search_runs(
        [client.get_experiment_by_name("faults").experiment_id])}
    # the version registered before the promotion kill got its alias on the re-run
    assert len(client.search_model_versions("name='faults-cnn'")) == 1
