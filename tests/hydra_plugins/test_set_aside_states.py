"""A damaged resumable state set aside (``<name>.damaged-<time>``) survives the sweeper.

The trial's worker dies (a real SIGKILL) with no retry left (``max_retry=0``): the sweeper
removes the trial's resumable state, but keeps the damaged state an attempt set aside in the
same folder, as that attempt's warning promised.
"""

import subprocess
import sys
from pathlib import Path

import optuna

from tests.hydra_plugins.test_sweeper_e2e import sweep_env

APP = Path(__file__).parent / "app" / "dying_app.py"


def test_a_trial_not_retried_keeps_its_set_aside_state(tmp_path):
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    proc = subprocess.run(
        [sys.executable, str(APP), "-m", f"hydra.sweeper.storage={url}",
         "hydra.sweeper.study_name=s", f"hydra.sweep.dir={tmp_path / 'sweep'}",
         "hydra.sweeper.n_trials=1", "hydra.sweeper.n_jobs=1", "hydra.sweeper.max_retry=0"],
        cwd=tmp_path, env={**sweep_env(), "STATE_ROOT": str(tmp_path / "states")},
        capture_output=True, text=True, timeout=120)
    out = proc.stdout + proc.stderr
    (trial,) = optuna.load_study(study_name="s", storage=url).trials
    assert trial.state.name == "FAIL" and "worker process died" in trial.user_attrs[
        "fail_reason"], out
    folder = tmp_path / "states" / "trial-0"
    assert sorted(p.name for p in folder.iterdir()) == [
        "state.npz.damaged-20260101T000000"], out  # the state went, the damaged one stays
    assert "state.npz.damaged-20260101T000000" in out and "for inspection" in out, out
