"""`hydra.sweeper.executor=ray` on a real two-node Ray cluster on this machine
(`ray.cluster_utils.Cluster`: a head and a second node, each its own raylet with one CPU),
running the real `search/run.py` sweep: real training, real MLflow and Optuna stores.

One sweep carries the assertions (each extra sweep costs minutes of CI on 2 cores): exactly
`n_trials` counted, trials on both nodes, at least one pruned, parent and child runs, a
champion; and one trial's Ray worker SIGKILLed inside its second epoch (the `mid_epoch`
fault hook, fired once) is recorded FAIL with the reason, retried once with its params, and
the sweep goes on. Skipped where Ray is not installed (`pip install -e ".[ray]"`; `.ci/run`
installs it for this group).
"""

from __future__ import annotations

import collections
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient

from hydra_plugins.optuna_pruning_sweeper._study import count_toward_budget
from tests.faults import invariants

ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402 - after the skip

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow
N_TRIALS = 6


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Two Ray nodes; their workers inherit this environment (each node's own, as on a real
    cluster), so the tracking store is set before they start."""
    tmp = tmp_path_factory.mktemp("ray")
    saved = dict(os.environ)
    os.environ.update({"MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}",
                       "TF_CPP_MIN_LOG_LEVEL": "3", "RAY_DISABLE_USAGE_STATS": "1"})
    nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 1,
                                                          "include_dashboard": False})
    nodes.add_node(num_cpus=1)
    nodes.wait_for_nodes()
    try:
        yield nodes, tmp
    finally:
        nodes.shutdown()
        os.environ.clear()
        os.environ.update(saved)


def test_a_sweep_on_two_ray_nodes_survives_a_killed_worker(cluster):
    nodes, tmp = cluster
    env = {**os.environ, "XRAY_FAULT": "mid_epoch",
           "XRAY_FAULT_MARKER": str(tmp / "{point}.marker")}
    (tmp / "mid_epoch.marker").write_text("kill one trial's Ray worker")
    proc = subprocess.run(
        [sys.executable, str(REPO / "search" / "run.py"), "-m",
         "hydra.sweeper.executor=ray", f"hydra.sweeper.ray.address={nodes.address}",
         "hydra.sweeper.n_jobs=4", f"hydra.sweeper.n_trials={N_TRIALS}",
         f"hydra.sweep.dir={tmp / 'sweep'}", f"hydra.sweeper.storage=sqlite:///{tmp / 'o.db'}",
         "hydra.sweeper.study_name=ray", "tracking.experiment=ray",
         "registry.model_name=ray-cnn", "tracking.artifact_root=" + (tmp / "art").as_uri(),
         "data.subset_fraction=0.05", "trainer.max_epochs=3", "model.depth=2",
         "model.base_filters=8", "hydra.sweeper.heartbeat_interval=2",
         "hydra/sweeper/pruner=percentile", "hydra.sweeper.pruner.percentile=10",
         "hydra.sweeper.pruner.n_startup_trials=2"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    log = proc.stdout[-4000:] + proc.stderr[-8000:]
    assert proc.returncode == 0, log
    assert not (tmp / "mid_epoch.marker").exists(), "the kill never fired\n" + log
    assert "Ray executor" in proc.stdout + proc.stderr and "2 slots" in proc.stdout + proc.stderr

    storage = f"sqlite:///{tmp / 'o.db'}"
    trials = optuna.load_study(study_name="ray", storage=storage).get_trials()
    assert count_toward_budget(trials) == N_TRIALS, [(t.number, t.state.name) for t in trials]
    (failed,) = [t for t in trials if t.state.name == "FAIL"]
    assert "Ray worker or node lost" in failed.user_attrs["fail_reason"], failed.user_attrs
    (retry,) = [t for t in trials if t.system_attrs.get("failed_trial") == failed.number]
    assert retry.params == failed.params and retry.state.name in ("COMPLETE", "PRUNED")
    assert any(t.state.name == "PRUNED" for t in trials), [t.state.name for t in trials]
    node_ids = {n.node_id for n in nodes.list_all_nodes()}
    used = {t.user_attrs.get("ray_node") for t in trials}
    assert used == node_ids, (used, node_ids)  # both nodes ran trials, nothing else did

    uri = os.environ["MLFLOW_TRACKING_URI"]
    counts = invariants.check(uri, storage, "ray", N_TRIALS, tmp / "sweep", {})
    client = MlflowClient(uri, registry_uri=uri)
    experiment = client.get_experiment_by_name("ray")
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    (parent,) = [r for r in runs if r.data.tags.get("sweep.parent") == "true"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(int(r.data.tags["optuna.trial_number"]) for r in children) == [
        t.number for t in trials]
    assert client.get_model_version_by_alias("ray-cnn", "champion").tags["run_id"] in {
        r.info.run_id for r in children}
    per_node = collections.Counter(t.user_attrs["ray_node"][:8] for t in trials)
    print(f"ray: trials per node {dict(per_node)}, states "
          f"{collections.Counter(t.state.name for t in trials)}, {counts}")
