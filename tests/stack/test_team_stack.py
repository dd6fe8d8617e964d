"""The team's workflow on a real PostgreSQL and a real `mlflow server`: three sweep workers
share one study and prune against each other's trials; one worker is SIGKILLed mid-trial and
the tracking server is restarted mid-sweep, and nothing is lost; every trial has its run on
the server, the champion is pulled from it and predicts with the server stopped, and the
database password appears nowhere.

One sweep carries all the assertions: each extra sweep on 2 cores costs minutes of CI."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient

from hydra_plugins.optuna_pruning_sweeper._study import count_toward_budget
from tests.faults import invariants

REPO = Path(__file__).resolve().parents[2]
JPEGS = REPO.parent / "shared" / "data" / "chest_xray_sample" / "val"
pytestmark = pytest.mark.slow

N_TRIALS = 8
TINY = ("data.subset_fraction=0.05", "trainer.max_epochs=2", "hydra.sweeper.n_jobs=1",
        f"hydra.sweeper.n_trials={N_TRIALS}", "hydra.sweeper.study_name=team",
        "tracking.experiment=team", "registry.model_name=team-cnn",
        # short heartbeats, so the killed worker's trial turns stale within seconds; the grace
        # leaves room for a CI machine loaded with three sweeps, a server and a database
        "hydra.sweeper.heartbeat_interval=2", "hydra.sweeper.grace_period=15",
        # prune outside the best 10 % once two trials completed: with eight trials some are
        # pruned against trials that other workers completed
        "hydra/sweeper/pruner=percentile", "hydra.sweeper.pruner.percentile=10",
        "hydra.sweeper.pruner.n_startup_trials=2")
OUTAGE, KILLED = 0, 2  # worker 0 pauses for the server restart; worker 2 is SIGKILLed


def worker_env(i: int, base: dict[str, str], tmp: Path) -> dict[str, str]:
    """Worker 0 pauses at its first trial's second epoch (the test restarts the server
    then); worker 2 SIGKILLs its whole command inside its first trial's second epoch."""
    marker = tmp / f"fault{i}.marker"
    if i == OUTAGE:
        marker.write_text("tracking_outage")
        return {**base, "XRAY_FAULT": "tracking_outage", "XRAY_FAULT_MARKER": str(marker)}
    if i == KILLED:
        marker.write_text("mid_epoch")
        return {**base, "XRAY_FAULT": "mid_epoch", "XRAY_FAULT_MARKER": str(marker),
                "XRAY_FAULT_SCOPE": "group"}
    return base


def test_three_workers_share_one_postgres_study_and_one_server(postgres, mlflow_server,
                                                               tmp_path):
    storage = postgres.url("optuna")
    env = {**os.environ, "OPTUNA_STORAGE": storage,
           "MLFLOW_TRACKING_URI": mlflow_server.uri, "TF_CPP_MIN_LOG_LEVEL": "3",
           "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
    started = time.monotonic()
    workers = [
        subprocess.Popen(
            [sys.executable, str(REPO / "search" / "run.py"), "-m",
             f"hydra.sweep.dir={tmp_path / f'worker{i}'}", *TINY],
            cwd=REPO, env=worker_env(i, env, tmp_path), stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, start_new_session=True)  # own group: kill 2
        for i in range(3)
    ]
    try:
        # The server restart: SIGKILL it while worker 0's trial is between two epochs, let the
        # trial (and the other workers) train and log into the outage, start it again.
        reached = tmp_path / f"fault{OUTAGE}.marker.reached"
        deadline = time.monotonic() + 300
        while not reached.exists() and workers[OUTAGE].poll() is None:
            assert time.monotonic() < deadline, "worker 0 never reached its second epoch"
            time.sleep(0.2)
        assert reached.exists(), "worker 0 ended before its second epoch"
        mlflow_server.stop()
        outage_started = time.monotonic()
        (tmp_path / f"fault{OUTAGE}.marker").unlink()
        time.sleep(6)
        mlflow_server.start()
        outage_s = time.monotonic() - outage_started
        logs = [w.communicate(timeout=900)[0] for w in workers]
    finally:
        for w in workers:
            if w.poll() is None:
                os.killpg(w.pid, signal.SIGKILL)
    wall_s = time.monotonic() - started
    assert not (tmp_path / f"fault{KILLED}.marker").exists(), "the kill never fired"
    assert workers[KILLED].returncode == -signal.SIGKILL, logs[KILLED][-4000:]
    for i in (0, 1):
        assert workers[i].returncode == 0, logs[i][-6000:]

    # One study, exactly n_trials counted: the killed worker's trial failed by heartbeat
    # and retried with its params by a surviving worker.
    study = optuna.load_study(study_name="team", storage=storage)
    trials = study.get_trials()
    assert count_toward_budget(trials) == N_TRIALS
    assert sorted(t.number for t in trials) == list(range(len(trials)))
    failed = [t for t in trials if t.state.name == "FAIL"]
    assert len(failed) == 1, [(t.number, t.state.name, t.user_attrs.get("fail_reason"))
                              for t in trials]
    retry = [t for t in trials if t.system_attrs.get("failed_trial") == failed[0].number]
    assert len(retry) == 1 and retry[0].params == failed[0].params
    assert retry[0].state.name in ("COMPLETE", "PRUNED")
    counted = [t for t in trials if t.state.name != "FAIL"]
    assert len({tuple(sorted(t.params.items())) for t in counted}) == N_TRIALS
    per_worker = [sum("] started  slot" in line for line in log.splitlines()) for log in logs]
    assert all(n >= 1 for n in per_worker), per_worker

    # Nothing left running, every completed trial has one FINISHED run, checkpoints load,
    # registry consistent (the same invariants as after the single-machine faults).
    counts = invariants.check(mlflow_server.uri, storage, "team", N_TRIALS, tmp_path, {})

    # Every trial's child run on the server, under one parent run per worker.
    client = MlflowClient(mlflow_server.uri, registry_uri=mlflow_server.uri)
    experiment = client.get_experiment_by_name("team")
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    parents = {r.info.run_id: r for r in runs if r.data.tags.get("sweep.parent") == "true"}
    children = [r for r in runs if "optuna.trial_number" in r.data.tags]
    assert len(parents) == 3, [  # which worker lacks one, and what its log said
        [line for line in log.splitlines()
         if "parent run" in line or "error" in line.lower()][:6] for log in logs]
    assert sorted(int(r.data.tags["optuna.trial_number"]) for r in children) == [
        t.number for t in trials]
    assert {r.data.tags["mlflow.parentRunId"] for r in children} <= set(parents)
    # The killed worker's runs do not stay RUNNING: the survivors closed them, marked.
    dead = next(r for r in children
                if r.data.tags["optuna.trial_number"] == str(failed[0].number))
    assert (dead.info.status, dead.data.tags.get("optuna.trial_state")) == ("KILLED", "FAIL")
    assert parents[dead.data.tags["mlflow.parentRunId"]].info.status == "KILLED"

    # Pruning across workers: a trial was pruned while the completed trials it was ranked
    # against included one of another worker.
    worker_of = {int(r.data.tags["optuna.trial_number"]): r.data.tags["mlflow.parentRunId"]
                 for r in children}
    pruned = [t for t in trials if t.state.name == "PRUNED"]
    assert pruned, [(t.number, t.state.name) for t in trials]
    assert any(
        c.datetime_complete < p.datetime_complete and worker_of[c.number] != worker_of[p.number]
        for p in pruned for c in trials if c.state.name == "COMPLETE"
    ), [(t.number, t.state.name, worker_of[t.number][:6]) for t in trials]

    # The outage: the paused trial trained through it, every epoch's metrics arrived.
    pid = reached.read_text().strip()
    paused = min((r for r in children if r.data.tags.get("process.pid") == pid),
                 key=lambda r: r.info.start_time)  # the worker's first trial
    assert paused.info.status == "FINISHED", paused.info
    history = client.get_metric_history(paused.info.run_id, "val_loss")
    assert sorted(m.step for m in history) == [0, 1]
    print(f"team stack: {wall_s:.0f} s wall, trials per worker {per_worker}, outage "
          f"{outage_s:.0f} s, states {sorted(t.state.name for t in trials)}, {counts}")

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
    mlflow_server.stop()
    out = tmp_path / "predictions"
    proc = subprocess.run([sys.executable, str(REPO / "search" / "predict.py"), str(pulled),
                           str(JPEGS), "--out", str(out)],
                          cwd=REPO, env={**env, "MLFLOW_TRACKING_URI": "http://127.0.0.1:9"},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    csv = next(out.glob("*.csv")).read_text().splitlines()
    assert len(csv) == 1 + 16  # a header and the 16 real chest X-rays
