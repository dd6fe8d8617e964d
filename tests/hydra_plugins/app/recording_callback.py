"""Hydra callback for the sweeper tests: appends one JSON line per event to ``path``."""

import json
import os
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

from hydra_plugins.optuna_pruning_sweeper.trial_context import ENV_STUDY, trial_info


class RecordingCallback(Callback):
    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def _record(self, event: str, **extra: Any) -> None:
        line = {"event": event, "pid": os.getpid(), "study": os.environ.get(ENV_STUDY), **extra}
        with self.path.open("a") as f:
            f.write(json.dumps(line) + "\n")

    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        self._record("multirun_start")

    def on_job_start(self, config: Any, **kwargs: Any) -> None:
        self._record("job_start", trial=trial_info())

    def on_job_end(self, config: Any, job_return: Any, **kwargs: Any) -> None:
        self._record("job_end", trial=trial_info(), status=job_return.status.name)

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        summary = Path(config.hydra.sweep.dir) / "optuna_summary.yaml"
        self._record("multirun_end", summary=summary.exists())
