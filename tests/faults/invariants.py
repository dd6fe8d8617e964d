"""What must hold after any fault, once the same command has been re-run."""

from __future__ import annotations

import os
from pathlib import Path

import optuna
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from hydra_plugins.optuna_pruning_sweeper._study import count_toward_budget


def fault_env(tmp: Path, mlflow_db: Path, fault: str | None = None,
              epoch: int | None = None) -> dict[str, str]:
    """The command's environment: its MLflow store, quiet TF and, with ``fault``, the
    `search.faults` point armed once (its marker file written in ``tmp``)."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{mlflow_db}",
           "TF_CPP_MIN_LOG_LEVEL": "3"}
    if fault:
        (tmp / f"{fault.split('@')[0]}.marker").write_text(fault)
        env.update({"XRAY_FAULT": fault, "XRAY_FAULT_MARKER": str(tmp / "{point}.marker")})
        if epoch is not None:
            env["XRAY_FAULT_EPOCH"] = str(epoch)
    return env


def completed(storage: str, study: str) -> dict[int, float]:
    """COMPLETE trials of a study: number -> value ({} when the study does not exist yet)."""
    try:
        s = optuna.load_study(study_name=study, storage=storage)
    except KeyError:
        return {}
    return {t.number: t.value for t in s.get_trials(states=(TrialState.COMPLETE,))}


def check(tracking_uri: str, storage: str, study: str, n_trials: int, sweep_dir: Path,
          completed_before: dict[int, float]) -> dict[str, int]:
    """Assert the invariants; returns counts for the test's message."""
    import keras

    s = optuna.load_study(study_name=study, storage=storage)
    trials = s.get_trials()
    # the study total is exact, nothing is left running or queued
    assert count_toward_budget(trials) == n_trials, [(t.number, t.state.name) for t in trials]
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    # no completed trial is lost or changed
    now = {t.number: t.value for t in trials if t.state == TrialState.COMPLETE}
    for number, value in completed_before.items():
        assert now.get(number) == value, (number, value, now)

    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, max_results=1000)
    running = [(r.info.run_name, r.data.tags.get("process.pid")) for r in runs
               if r.info.status == "RUNNING"]
    assert not running, f"runs left RUNNING: {running}"
    # each completed trial has exactly one finished MLflow run (no duplicate, none lost)
    for number in now:
        finished = [r for r in runs if r.data.tags.get("optuna.study") == study
                    and r.data.tags.get("optuna.trial_number") == str(number)
                    and r.info.status == "FINISHED"]
        assert len(finished) == 1, (number, [r.info.status for r in finished])

    # no checkpoint is half-written
    checkpoints = list(sweep_dir.rglob("best.keras"))
    for path in checkpoints:
        keras.models.load_model(path, safe_mode=True, compile=False)

    # the registry is consistent: aliases on existing versions, every version has metadata
    versions = 0
    for model in client.search_registered_models():
        for alias, version in (model.aliases or {}).items():
            assert str(client.get_model_version(model.name, version).version) == str(version), alias
        for mv in client.search_model_versions(f"name='{model.name}'"):
            versions += 1
            for tag in ("class_names", "preprocessing", "threshold", "run_id"):
                assert tag in mv.tags, (model.name, mv.version, tag)
    return {"trials": len(trials), "complete": len(now), "runs": len(runs),
            "checkpoints": len(checkpoints), "versions": versions}
