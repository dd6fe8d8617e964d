"""Killed and preempted trials resume from their last epoch (real CLI, real Optuna and MLflow
stores, real training on PneumoniaMNIST with deterministic ops).

Each fault is reached deterministically through `search.faults` (env-var hooks fired once
through a marker file), never by a sleep:
- SIGKILL of the whole command inside epoch 3 (0-based 2), then the same command again;
- SIGTERM to the whole command (as SLURM sends) inside epoch 2: the grace-period path;
- SIGKILL on "box A", whose sweep folder is then deleted, and the resume on "box B" (another
  sweep folder, another worker process) through the shared `retry.state_dir`.
One uninterrupted sweep of the same trial is the reference for the final metrics.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient

from hydra_plugins.optuna_pruning_sweeper._study import count_toward_budget
from tests.faults.invariants import fault_env

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow

EPOCHS = 5


def command(tmp: Path, study: str, sweep: str, *extra: str) -> list[str]:
    return [
        sys.executable, str(REPO / "search" / "run.py"), "-m",
        f"hydra.sweep.dir={tmp / sweep}",
        f"hydra.sweeper.storage=sqlite:///{tmp / 'optuna.db'}",
        "tracking.artifact_root=" + (tmp / "artifacts").as_uri(),
        f"tracking.experiment={study}", f"hydra.sweeper.study_name={study}",
        "hydra.sweeper.n_trials=1", "hydra.sweeper.n_jobs=1",
        "hydra.sweeper.trials_per_worker=null",
        "hydra.sweeper.heartbeat_interval=1", "hydra.sweeper.grace_period=3",
        "data.subset_fraction=0.1", f"trainer.max_epochs={EPOCHS}", "trainer.patience=10",
        "trainer.deterministic=true", "model.depth=2", "model.base_filters=8",
        "model.dense_units=16", "model.conv_dropout=last", "model.conv_dropout_rate=0.25",
        "optimizer=adam", "optimizer.learning_rate=0.01", "lr_schedule=plateau",
        "lr_schedule.patience=1", "data.augment.rotation=0.03", "data.batch_size=32",
        f"registry.model_name={study}-cnn", *extra,
    ]


def run(tmp: Path, study: str, sweep: str = "sweep", fault: str | None = None,
        epoch: int = 2, *extra: str) -> subprocess.CompletedProcess:
    env = fault_env(tmp, tmp / "mlflow.db", fault, epoch)
    return subprocess.run(command(tmp, study, sweep, *extra), cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900,
                          start_new_session=True)


def output(proc: subprocess.CompletedProcess) -> str:
    return proc.stdout[-3000:] + proc.stderr[-6000:]


def trials(tmp: Path, study: str) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=study,
                             storage=f"sqlite:///{tmp / 'optuna.db'}").get_trials()


def resumed_trial(tmp: Path, study: str, from_epoch: int) -> optuna.trial.FrozenTrial:
    """The study holds one counted trial: the COMPLETE retry that resumed after
    ``from_epoch`` epochs, with each epoch's intermediate value once."""
    all_trials = trials(tmp, study)
    assert count_toward_budget(all_trials) == 1, [(t.number, t.state.name) for t in all_trials]
    (done,) = [t for t in all_trials if t.state.name == "COMPLETE"]
    assert done.user_attrs["resumed_from_epoch"] == from_epoch, done.user_attrs
    assert sorted(done.intermediate_values) == list(range(EPOCHS))
    return done


def curves(tmp: Path, run_id: str) -> dict[str, list[int]]:
    client = MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")
    return {key: [m.step for m in client.get_metric_history(run_id, key)]
            for key in ("loss", "val_loss", "learning_rate")}


def the_run(tmp: Path, run_id: str):
    return MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}").get_run(run_id)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> float:
    """The same trial, never interrupted."""
    tmp = tmp_path_factory.mktemp("reference")
    proc = run(tmp, "resume-ref")
    assert proc.returncode == 0, output(proc)
    (done,) = trials(tmp, "resume-ref")
    return float(done.value)


def test_sigkill_after_epoch_k_resumes_there_with_the_same_result(tmp_path, reference):
    killed = run(tmp_path, "resume-kill", fault="mid_epoch@group", epoch=2)
    assert killed.returncode == -signal.SIGKILL, output(killed)
    (first,) = trials(tmp_path, "resume-kill")
    assert sorted(first.intermediate_values) == [0, 1]  # two epochs done, the third killed
    state = Path(first.user_attrs["resume_dir"])
    assert (state / "state.npz").is_file()

    again = run(tmp_path, "resume-kill")
    assert again.returncode == 0, output(again)
    done = resumed_trial(tmp_path, "resume-kill", 2)
    log = (tmp_path / "sweep" / str(done.number) / "run.log").read_text()
    assert "Resuming after epoch 2 of 5" in log and f"Resumed from {state}" in log
    # its own MLflow run, linked to the killed attempt's, which stays KILLED with 2 epochs
    old = the_run(tmp_path, first.user_attrs["mlflow_run_id"])
    run_ = the_run(tmp_path, done.user_attrs["mlflow_run_id"])
    assert run_.info.status == "FINISHED" and run_.data.tags["resume.from_epoch"] == "2"
    assert run_.data.tags["resume.previous_run_id"] == old.info.run_id
    assert old.info.status == "KILLED" and curves(tmp_path, old.info.run_id)["loss"] == [0, 1]
    for key, steps in curves(tmp_path, run_.info.run_id).items():
        assert steps == list(range(EPOCHS)), (key, steps)  # no repeated, no missing step
    assert not state.exists()  # the trial ended: its state is gone
    # deterministic ops: the same final val_loss as the run that was never interrupted
    assert abs(done.value - reference) <= 1e-5, (done.value, reference)


def test_sigterm_finishes_the_epoch_in_its_grace_period_and_resumes(tmp_path, reference):
    stopped = run(tmp_path, "resume-term", "sweep", "preempt@group", 1,
                  "hydra.sweeper.retry.preempt_grace=120", "hydra.sweeper.max_failure_rate=0")
    assert stopped.returncode == 143, output(stopped)  # 128 + SIGTERM: not a crash
    assert "re-run the same command to resume" in stopped.stderr + stopped.stdout
    first, retry = trials(tmp_path, "resume-term")
    assert first.state.name == "FAIL" and retry.state.name == "WAITING"
    assert "finished within the grace period" in first.user_attrs["interrupted"]
    assert sorted(first.intermediate_values) == [0, 1]  # the second epoch ran to its end
    run_ = the_run(tmp_path, first.user_attrs["mlflow_run_id"])
    assert run_.info.status == "KILLED" and run_.data.tags["optuna.trial_state"] == "INTERRUPTED"

    # max_failure_rate=0: an interrupted trial is not a failure, so the sweep goes on
    again = run(tmp_path, "resume-term", "sweep", None, 1, "hydra.sweeper.max_failure_rate=0")
    assert again.returncode == 0, output(again)
    done = resumed_trial(tmp_path, "resume-term", 2)
    for key, steps in curves(tmp_path, done.user_attrs["mlflow_run_id"]).items():
        assert steps == list(range(EPOCHS)), (key, steps)
    assert abs(done.value - reference) <= 1e-5, (done.value, reference)


def test_a_trial_killed_on_one_box_resumes_on_another_through_the_shared_folder(tmp_path):
    shared = f"hydra.sweeper.retry.state_dir={tmp_path / 'shared'}"
    killed = run(tmp_path, "resume-shared", "box-a", "mid_epoch@group", 3, shared)
    assert killed.returncode == -signal.SIGKILL, output(killed)
    (first,) = trials(tmp_path, "resume-shared")
    assert first.user_attrs["resume_dir"].startswith(str(tmp_path / "shared"))
    shutil.rmtree(tmp_path / "box-a")  # box A and its local folders are gone

    again = run(tmp_path, "resume-shared", "box-b", None, 3, shared)
    assert again.returncode == 0, output(again)
    done = resumed_trial(tmp_path, "resume-shared", 3)
    assert done.user_attrs["worker_pid"] != first.user_attrs["worker_pid"]
    assert (tmp_path / "box-b" / str(done.number) / "checkpoints" / "best.keras").is_file()
    assert not list((tmp_path / "shared").rglob("state.npz"))
