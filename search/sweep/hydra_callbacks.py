"""The Hydra callback that gives a sweep its MLflow parent run and runs the sweep's end.

Hydra calls `on_multirun_start` before it even builds the sweeper, and `on_multirun_end`
after the last trial finished, both in the sweeper's process. The callback checks the
sweep's config and tracking store at `on_multirun_start`, but opens the parent run only in
`on_sweep_start`, which our sweeper calls once its own checks passed (search space, storage,
study, executor) and before its first trial: a sweep refused anywhere before that leaves no
parent run at all. At the end it hands the sweep's end to `search.sweep.pipeline` (report,
final stage, registration and gate, ensemble, cross-validation, next steps) and closes the
run. Trial jobs run in worker processes; they find the parent run through
`search.sweep_context` (an environment variable that workers inherit).

With a sweeper that has no such hook (Hydra's basic one), the parent run opens at
`on_multirun_start`, and one whose sweeper stopped before sweeping is deleted at exit.
"""

from __future__ import annotations

import atexit
import logging
import time
from pathlib import Path
from typing import Any

import mlflow
from hydra.experimental.callback import Callback
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf

from search import sweep_context
from search.config_checks import ConfigError, check_sweep_config
from search.sweep import pipeline
from search.tracking import mlflow_runs
from search.tracking import tags as tag_keys

log = logging.getLogger(__name__)


class MlflowSweepCallback(Callback):
    """One MLflow parent run per sweep; the best trial and the Optuna report logged at the end."""

    def __init__(self, report_dir_name: str = "sweep_report") -> None:
        self.report_dir_name = report_dir_name
        self.run_id: str | None = None
        self.started = 0.0
        self.ended = False
        self.sweep_dir: Path | None = None
        self.announced = False  # the parent run opened at the sweeper's on_sweep_start

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        """Check the sweep's config and store; open the parent run only now when the
        sweeper will not announce its start (``on_sweep_start``)."""
        # Hydra turns an Exception raised by a callback into a warning and sweeps on, so a
        # config or store that cannot work ends the command here with SystemExit instead.
        try:
            check_sweep_config(config)
            if config.hydra.sweeper.get("dry_run"):
                return  # a dry run trains nothing and leaves MLflow and the study untouched
            mlflow_runs.setup_tracking(config.tracking)
        except (ConfigError, mlflow_runs.TrackingError) as error:
            raise SystemExit(mlflow_runs.redact_uri(f"error: {error}")) from None
        except mlflow.exceptions.MlflowException as error:  # the store answered, but refused
            raise SystemExit(mlflow_runs.redact_uri(
                f"error: the tracking store refused the sweep's setup ({error})")) from None
        self.sweep_dir = Path(str(config.hydra.sweep.dir))
        if not sweep_context.sweeper_announces_start(config):
            self._start_parent(config)

    def on_sweep_start(self, config: DictConfig, **kwargs: Any) -> None:
        """The sweeper accepted its config and asks its first trial next: open the parent
        run (`sweep_context.SWEEP_START_HOOK`)."""
        if self.run_id is None and not config.hydra.sweeper.get("dry_run"):
            self.announced = True
            self._start_parent(config)

    def _start_parent(self, config: DictConfig) -> None:
        """Open the parent run, export it to the trial jobs and log the sweeper's setup."""
        sweeper = config.hydra.sweeper
        study = sweeper.get("study_name")
        tags = {tag_keys.SWEEP_PARENT: "true", tag_keys.SWEEP_DIR: str(config.hydra.sweep.dir),
                **mlflow_runs.process_tags()}
        if study:
            tags[tag_keys.OPTUNA_STUDY] = str(study)
        try:
            run = mlflow.start_run(run_name=f"sweep-{time.strftime('%Y%m%d-%H%M%S')}", tags=tags)
        except Exception as error:  # noqa: BLE001 - Hydra would sweep on without a parent run
            raise SystemExit(f"error: the sweep's MLflow parent run could not be started on "
                             f"{mlflow_runs.redact_uri(mlflow.get_tracking_uri())} "
                             f"({type(error).__name__}: "
                             f"{mlflow_runs.redact_uri(str(error))})") from None
        self.run_id = run.info.run_id
        self.started = time.time()
        self.sweep_dir = Path(str(config.hydra.sweep.dir))
        # Registered after MLflow's own exit hook, so it runs first: a sweep that never reached
        # on_multirun_end (the sweeper raised, Ctrl-C) ends FAILED, not FINISHED.
        atexit.register(self._end_if_unfinished)
        sweep_context.set_parent_run_id(self.run_id)
        mlflow.log_text(redacted_sweeper_yaml(sweeper), "sweep/sweeper.yaml")
        mlflow.log_params(sweeper_params(config))
        log.info("MLflow parent run %s for the sweep", self.run_id)

    def _end_if_unfinished(self) -> None:
        """At exit: a parent run the sweep's end never closed ends FAILED, tagged as stopped
        in its trials. Only with a sweeper that does not announce its start (the run opened
        at on_multirun_start): one that never started sweeping (it refused its config) is
        deleted, as no parent run should exist for a config that did not pass its checks."""
        if self.run_id is None or self.ended:
            return
        self.ended = True
        client = MlflowClient()
        try:
            swept = self.announced or self._sweeper_started()
            if swept:
                client.set_tag(self.run_id, tag_keys.SWEEP_STOPPED_IN, "trials")
                client.set_tag(self.run_id, tag_keys.SWEEP_ENDED,
                               "early: the sweep stopped before its end (see its log)")
            active = mlflow.active_run()
            if active is not None and active.info.run_id == self.run_id:
                mlflow.end_run(status="FAILED")
            else:
                client.set_terminated(self.run_id, "FAILED")
            if not swept:
                client.delete_run(self.run_id)
                log.info("the sweep stopped before its first trial (its config was refused): "
                         "its MLflow parent run %s is deleted", self.run_id)
        except Exception:  # noqa: BLE001 - at exit: the next command closes it (dead pid)
            log.warning("could not mark the sweep's parent run %s FAILED", self.run_id)

    def _sweeper_started(self) -> bool:
        """For a sweeper that does not announce its start: whether it got past its own
        checks, i.e. saved `multirun.yaml` in the sweep folder (Hydra's BasicSweeper does
        once it starts), or a run nests under the parent."""
        saved = self.sweep_dir / "multirun.yaml" if self.sweep_dir else None
        if saved and saved.is_file() and saved.stat().st_mtime >= self.started - 1:
            return True
        client = MlflowClient()
        parent = client.get_run(str(self.run_id))
        return bool(client.search_runs(
            [parent.info.experiment_id],
            f"tags.`{tag_keys.PARENT_RUN_ID}` = '{self.run_id}'", max_results=1))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        """Run the sweep's end (`search.sweep.pipeline`), which closes the parent run."""
        if self.run_id is None:
            return
        pipeline.run_sweep_end(config, self.run_id, self.started, self.report_dir_name,
                               close_parent=self._close)

    def _close(self, status: str) -> None:
        """End the parent run (FINISHED, FAILED or KILLED) and stop exporting it to trial
        jobs."""
        self.ended = True
        mlflow.end_run(status=status)
        sweep_context.set_parent_run_id(None)


def sweeper_params(config: DictConfig) -> dict[str, Any]:
    """The sweeper's setup as the parent run's params."""
    sweeper = config.hydra.sweeper
    engine = str(sweeper.get("engine") or "optuna")
    kt = sweeper.get("keras_tuner") or {}
    return {
        "sweeper.n_trials": sweeper.get("n_trials"),
        "sweeper.n_jobs": sweeper.get("n_jobs"),
        "sweeper.engine": engine,
        # with keras-tuner, its oracle chooses and no Optuna pruner runs
        "sweeper.sampler": (f"keras_tuner.{kt.get('algorithm')}" if engine == "keras_tuner"
                            else str(sweeper.get("sampler", {}).get("_target_", ""))),
        "sweeper.pruner": ("none" if engine == "keras_tuner"
                           else str((sweeper.get("pruner") or {}).get("_target_", ""))),
        "sweeper.direction": str(sweeper.get("direction")),
        "objective": str(config.get("objective")),
    }


def redacted_sweeper_yaml(sweeper: DictConfig) -> str:
    """The sweeper settings as written, with any password in the storage URL masked."""
    settings = OmegaConf.to_container(sweeper, resolve=False)
    if isinstance(settings.get("storage"), str):
        settings["storage"] = mlflow_runs.redact_uri(settings["storage"])
    return OmegaConf.to_yaml(OmegaConf.create(settings))
