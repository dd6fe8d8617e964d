"""Hydra callback for the sweep-start hook tests: one JSON line per event in ``path``.

At ``on_sweep_start`` it records what the sweeper has set up (the study's name and its
trials so far) and exports ``SWEEP_START_MARK``, which every job records from its worker's
environment; ``fail=true`` makes the hook raise.
"""

import json
import os
from pathlib import Path
from typing import Any

import optuna
from hydra.experimental.callback import Callback

from hydra_plugins.optuna_pruning_sweeper.trial_context import ENV_STORAGE, ENV_STUDY

MARK = "SWEEP_START_MARK"


class SweepStartCallback(Callback):
    def __init__(self, path: str, fail: bool = False) -> None:
        self.path = Path(path)
        self.fail = fail

    def _record(self, event: str, **extra: Any) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps({"event": event, "pid": os.getpid(), **extra}) + "\n")

    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        self._record("multirun_start", study=os.environ.get(ENV_STUDY))

    def on_sweep_start(self, config: Any, study_name: str, **kwargs: Any) -> None:
        study = optuna.load_study(study_name=os.environ[ENV_STUDY],
                                  storage=os.environ[ENV_STORAGE])
        self._record("sweep_start", study=study_name, env_study=os.environ[ENV_STUDY],
                     trials=len(study.trials))
        if self.fail:
            raise SystemExit("error: the sweep-start hook refused")
        os.environ[MARK] = "set at sweep start"

    def on_job_start(self, config: Any, **kwargs: Any) -> None:
        self._record("job_start", mark=os.environ.get(MARK))
