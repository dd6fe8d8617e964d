"""The sweeper's ``on_sweep_start`` hook for Hydra callbacks (``sweeper.SWEEP_START_HOOK``).

Hydra calls ``on_multirun_start`` before it builds the sweeper; a callback that must not act
on a config the sweeper refuses (the project's MLflow parent run) acts at ``on_sweep_start``,
which the sweeper calls once its search space, storage, study and executor are set up,
before the first trial. Real sweeps of the tiny test app on a SQLite study.
"""

import json
from pathlib import Path

import optuna

from tests.hydra_plugins.test_sweeper_e2e import Sweep

CALLBACK = "+hydra.callbacks.start._target_=sweep_start_callback.SweepStartCallback"


def events(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def run(tmp_path: Path, *overrides: str, ok: bool = True):
    sweep = Sweep(tmp_path)
    log = tmp_path / "events.jsonl"
    proc = sweep.run(CALLBACK, f"+hydra.callbacks.start.path={log}", "hydra.sweeper.n_jobs=1",
                     *overrides, ok=ok)
    return sweep, proc, events(log)


def test_called_once_after_the_study_is_open_before_any_trial(tmp_path):
    sweep, _, seen = run(tmp_path, "hydra.sweeper.n_trials=2")
    assert [e["event"] for e in seen] == ["multirun_start", "sweep_start", "job_start",
                                          "job_start"], seen
    assert seen[0]["study"] is None  # Hydra's on_multirun_start: no sweeper yet
    start = seen[1]
    assert start["study"] == start["env_study"] == "s" and start["trials"] == 0
    # what the hook exports reaches every job in its worker process
    jobs = [e for e in seen if e["event"] == "job_start"]
    assert {e["mark"] for e in jobs} == {"set at sweep start"}
    assert all(e["pid"] != start["pid"] for e in jobs)
    assert [t.state.name for t in sweep.trials()] == ["COMPLETE"] * 2


def test_not_called_when_the_sweeper_refuses_its_config(tmp_path):
    _, proc, seen = run(tmp_path, "no_such_key=choice(1,2)", ok=False)
    assert proc.returncode != 0 and "no_such_key" in proc.stderr
    assert [e["event"] for e in seen] == ["multirun_start"], seen


def test_not_called_by_a_dry_run(tmp_path):
    _, _, seen = run(tmp_path, "hydra.sweeper.dry_run=2")
    assert [e["event"] for e in seen] == ["multirun_start"], seen


def test_a_hook_that_raises_stops_the_sweep_before_its_first_trial(tmp_path):
    sweep, proc, seen = run(tmp_path, "+hydra.callbacks.start.fail=true", ok=False)
    assert proc.returncode != 0, proc.stdout
    assert "the sweep-start hook refused" in proc.stderr
    assert [e["event"] for e in seen] == ["multirun_start", "sweep_start"], seen
    study = optuna.load_study(study_name="s", storage=sweep.url)
    assert study.trials == []
