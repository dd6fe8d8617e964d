"""Passwords given on the command line, with `hydra.sweeper.executor=ray` (issue 27).

`search/run.py` moves a URL's password into a `SWEEP_SECRET_*` variable; the composed
config reads it back (`${oc.env:...}`). Ray never carries it: a task's `runtime_env` is
shown in Ray's dashboard and job info (and logged by its runtime-env agent), so it holds no
value with a credential. A local Ray, started by the sweeper, inherits the variables; a node
of a cluster started elsewhere lacks them, and its trial says so, naming the fix.

Real PostgreSQL stores with a random password, real `search/run.py` sweeps (1 tiny trial).
Skipped where Ray is not installed (`pip install -e ".[ray]"`).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient

pytest.importorskip("ray")

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


@pytest.fixture
def ray_tmp():
    """Ray's temp folder (RAY_TMPDIR), short: Ray's socket paths must stay under 108 bytes."""
    folder = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def sweep(pg, tmp: Path, name: str, ray_tmp: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items()
           if k not in ("MLFLOW_TRACKING_URI", "OPTUNA_STORAGE", "PGPASSWORD")}
    env.update(TF_CPP_MIN_LOG_LEVEL="3", RAY_TMPDIR=str(ray_tmp), RAY_DISABLE_USAGE_STATS="1")
    return subprocess.run(
        [sys.executable, str(REPO / "search" / "run.py"), "-m", "+debug=tiny",
         "hydra.sweeper.executor=ray", "hydra.sweeper.ray.num_cpus=1",
         "hydra.sweeper.n_trials=1", "hydra.sweeper.n_jobs=1", "hydra/sweeper/pruner=nop",
         f"hydra.sweep.dir={tmp / 'sweep'}", f"hydra.sweeper.study_name={name}",
         f"tracking.experiment={name}", f"registry.model_name={name}",
         "tracking.artifact_root=" + (tmp / "artifacts").as_uri(),
         f"tracking.uri={pg.url('mlflow')}", f"hydra.sweeper.storage={pg.url('optuna')}",
         *extra],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


def files_with(folder: Path, secret: str) -> list[str]:
    return [str(p) for p in folder.rglob("*")
            if p.is_file() and not p.is_symlink() and secret.encode() in p.read_bytes()]


def test_a_local_ray_resolves_the_secrets_that_never_travel_through_ray(pg, tmp_path,
                                                                          ray_tmp):
    proc = sweep(pg, tmp_path, "ray-secrets", ray_tmp)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    (trial,) = optuna.load_study(study_name="ray-secrets", storage=pg.url("optuna")).trials
    assert trial.state.name == "COMPLETE", trial.user_attrs
    client = MlflowClient(tracking_uri=pg.url("mlflow"))
    runs = client.search_runs([client.get_experiment_by_name("ray-secrets").experiment_id])
    parent = next(r for r in runs if r.data.tags.get("sweep.parent") == "true")
    assert any(r.data.tags.get("mlflow.parentRunId") == parent.info.run_id for r in runs)
    # Ray's session (its runtime-env agent logs every task's env_vars), the sweep, the terminal
    assert files_with(ray_tmp, pg.password) == []
    assert "kept out of the trials' runtime_env" in out
    assert files_with(tmp_path, pg.password) == []
    assert pg.password not in out


def test_a_ray_node_without_the_secret_says_what_to_set(pg, tmp_path, ray_tmp):
    """A cluster started elsewhere (here by this test, before the sweep moved the password
    into its variable) lacks `SWEEP_SECRET_TRACKING_URI`: the trial fails naming it."""
    from ray.cluster_utils import Cluster

    saved = os.environ.get("RAY_TMPDIR")
    os.environ.update(RAY_TMPDIR=str(ray_tmp), RAY_DISABLE_USAGE_STATS="1")
    nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 1,
                                                          "include_dashboard": False})
    try:
        proc = sweep(pg, tmp_path, "ray-no-secret", ray_tmp,
                     f"hydra.sweeper.ray.address={nodes.address}")
    finally:
        nodes.shutdown()
        os.environ.pop("RAY_TMPDIR") if saved is None else os.environ.update(RAY_TMPDIR=saved)
    out = proc.stdout + proc.stderr
    (trial,) = optuna.load_study(study_name="ray-no-secret", storage=pg.url("optuna")).trials
    reason = trial.user_attrs.get("fail_reason", "")
    assert trial.state.name == "FAIL", (trial.state, out[-4000:])
    assert reason.startswith("RuntimeError: this Ray node's environment lacks "), reason
    assert "SWEEP_SECRET_TRACKING_URI" in reason and "OPTUNA_STORAGE" in reason, reason
    assert pg.password not in out and files_with(tmp_path, pg.password) == []
