"""Test app whose trial leaves a resumable-state folder, with a damaged state set aside in
it, then dies by SIGKILL (as a worker killed by the OOM killer): the sweeper must decide
what becomes of the folder. The folder is ``$STATE_ROOT/trial-<number>``."""

import os
import signal
from pathlib import Path

import hydra
from omegaconf import DictConfig

from hydra_plugins.optuna_pruning_sweeper.trial_context import RESUME_DIR_ATTR, current_trial


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float:
    trial = current_trial()
    assert trial is not None
    folder = Path(os.environ["STATE_ROOT"]) / f"trial-{trial.number}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "state.npz").write_bytes(b"the state this attempt wrote")
    (folder / "state.npz.damaged-20260101T000000").write_bytes(b"truncated")
    trial.set_user_attr(RESUME_DIR_ATTR, str(folder))
    os.kill(os.getpid(), signal.SIGKILL)
    return 0.0


if __name__ == "__main__":
    main()
