"""Hydra callbacks that give a sweep its MLflow parent run, its report and stale-run cleanup.

Hydra calls `on_multirun_start` before the sweeper asks its first trial and `on_multirun_end`
after the last one finished, both in the sweeper's process. Trial jobs run in worker
processes; they find the parent run through `search.sweep_context` (an environment variable
that spawned workers inherit).
"""

from __future__ import annotations

import atexit
import logging
import time
from pathlib import Path
from typing import Any

import mlflow
import optuna
from hydra.experimental.callback import Callback
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf

from search import sweep_context
from search.config_checks import ConfigError, check_sweep_config
from search.faults import fault_point
from search.sweep import report
from search.tracking import descriptions, mlflow_runs

log = logging.getLogger(__name__)


class MlflowSweepCallback(Callback):
    """One MLflow parent run per sweep; the best trial and the Optuna report logged at the end."""

    def __init__(self, report_dir_name: str = "sweep_report") -> None:
        self.report_dir_name = report_dir_name
        self.run_id: str | None = None
        self.started = 0.0
        self.ended = False

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        # Hydra turns an Exception raised by a callback into a warning and sweeps on, so a
        # config or store that cannot work ends the command here with SystemExit instead.
        try:
            check_sweep_config(config)
            if config.hydra.sweeper.get("dry_run"):
                return  # a dry run trains nothing and leaves MLflow and the study untouched
            mlflow_runs.setup_tracking(config.tracking)
        except (ConfigError, mlflow_runs.TrackingError) as error:
            raise SystemExit(f"error: {error}") from None
        except mlflow.exceptions.MlflowException as error:  # the store answered, but refused
            raise SystemExit(f"error: the tracking store refused the sweep's setup "
                             f"({error})") from None
        sweeper = config.hydra.sweeper
        study = sweeper.get("study_name")
        tags = {"sweep.parent": "true", "sweep.dir": str(config.hydra.sweep.dir),
                **mlflow_runs.process_tags()}
        if study:
            tags["optuna.study"] = str(study)
        try:
            run = mlflow.start_run(run_name=f"sweep-{time.strftime('%Y%m%d-%H%M%S')}", tags=tags)
        except Exception as error:  # noqa: BLE001 - Hydra would sweep on without a parent run
            raise SystemExit(f"error: the sweep's MLflow parent run could not be started on "
                             f"{mlflow_runs.redact_uri(mlflow.get_tracking_uri())} "
                             f"({type(error).__name__}: {error})") from None
        self.run_id = run.info.run_id
        self.started = time.time()
        # Registered after MLflow's own exit hook, so it runs first: a sweep that never reached
        # on_multirun_end (the sweeper raised, Ctrl-C) ends FAILED, not FINISHED.
        atexit.register(self._end_if_unfinished)
        sweep_context.set_parent_run_id(self.run_id)
        mlflow.log_text(redacted_sweeper_yaml(sweeper), "sweep/sweeper.yaml")
        engine = str(sweeper.get("engine") or "optuna")
        kt = sweeper.get("keras_tuner") or {}
        mlflow.log_params({
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
        })
        log.info("MLflow parent run %s for the sweep", self.run_id)

    def _end_if_unfinished(self) -> None:
        if self.run_id is None or self.ended:
            return
        self.ended = True
        try:
            MlflowClient().set_tag(self.run_id, "sweep.ended",
                                   "early: the sweep stopped before its end (see its log)")
            active = mlflow.active_run()
            if active is not None and active.info.run_id == self.run_id:
                mlflow.end_run(status="FAILED")
            else:
                MlflowClient().set_terminated(self.run_id, "FAILED")
        except Exception:  # noqa: BLE001 - at exit: the next command closes it (dead pid)
            log.warning("could not mark the sweep's parent run %s FAILED", self.run_id)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self.run_id is None:
            return
        client = MlflowClient()
        study = load_sweep_study()
        if study is not None:
            mlflow.set_tag("optuna.study", study.study_name)
            close_stale_runs(client, study, keep=self.run_id)
            summary = report.summarize(study)
            log_best_trial(client, study, summary)
            mlflow.log_dict(summary, "sweep/summary.json")
            for state, count in summary["counts"].items():
                mlflow.log_metric(f"trials_{state.lower()}", count)
            folder = Path(config.hydra.sweep.dir) / self.report_dir_name
            fault_point("sweep_report")
            report.write_report(study, folder, client.get_run(self.run_id).data.metrics)
            mlflow.log_artifacts(str(folder), self.report_dir_name)
            log_sweep_curves(client, study, summary)
            log.info("Sweep report: %s", folder / "sweep_report.html")
        mlflow.log_metric("sweep_wall_seconds", time.time() - self.started)
        failure = session_failure(Path(config.hydra.sweep.dir))
        decision = None
        if study is not None and len(study.directions) == 1 and not failure:
            try:  # before promotion: it may move best_run_id to the best mean
                from search.sweep.final_stage import run_final_stage

                run_final_stage(config, self.run_id)
            except Exception as error:  # noqa: BLE001 - the search's results stand
                log.exception("the final stage failed; the search's best trial is registered")
                client.set_tag(self.run_id, "final_stage.error",
                               f"{type(error).__name__}: {error}"[:5000])
        try:
            if study is not None and len(study.directions) == 1:
                from search.model_registry.champion import floor_failure
                from search.model_registry.registration import promote_sweep_best
                from search.quiet_start import quiet_native_start
                from search.sweep.top_k_ensemble import promote_ensemble

                with quiet_native_start():  # held-out scoring imports TF in this process
                    decision = promote_sweep_best(config, self.run_id)
                    if decision is not None:  # registry.ensemble.top_k: its own version
                        promote_ensemble(config, self.run_id, decision)
                if decision is not None:  # beside the summary, for CI summaries and people
                    write_promotion(Path(config.hydra.sweep.dir), decision.to_dict())
                    from search.sweep.cross_validation import run_cross_validation

                    try:  # after the gate: a failure here leaves the registration as it is
                        run_cross_validation(config, self.run_id, decision)
                    except Exception as error:  # noqa: BLE001
                        log.exception("cross-validating the champion failed")
                        client.set_tag(self.run_id, "cv.error",
                                       f"{type(error).__name__}: {error}"[:5000])
                floor = (config.get("registry") or {}).get("floor")
                if floor is not None and decision is not None:
                    value = decision.new_metrics.get(decision.metric)
                    if value is not None:
                        mlflow.log_metric(f"floor_{decision.metric}", float(value))
                failure = failure or floor_failure(decision, floor)
        except Exception as error:  # noqa: BLE001 - tagged on the run by promote_sweep_best
            log.exception("registering the sweep's best trial failed")
            failure = failure or (f"registering the sweep's best trial failed: "
                                  f"{type(error).__name__}: {error}")
        finally:
            steps = self._describe(config, client, study, decision)
            self.ended = True
            mlflow.end_run(status="FAILED" if failure else "FINISHED")
            sweep_context.set_parent_run_id(None)
        for line in steps:
            log.info("%s", line)
        if failure:
            # Hydra would turn an exception into a warning and exit 0.
            raise SystemExit(f"error: {failure}")


    def _describe(self, config: DictConfig, client: MlflowClient, study: optuna.Study | None,
                  decision: Any) -> list[str]:
        """The parent run's description (Markdown) and the lines that say what to do next."""
        uri = mlflow.get_tracking_uri()
        model_name = registry_model_name(config)
        decided = decision.to_dict() if decision is not None else None
        try:
            run = client.get_run(self.run_id)
            if study is not None:
                summary = report.summarize(study)
                best_id = run.data.tags.get("best_run_id")
                note = descriptions.parent_description(
                    study.study_name, summary, ", ".join(study.metric_names or ["value"]),
                    (run.info.experiment_id, best_id) if best_id else None, decided, uri,
                    model_name)
                mlflow.set_tag("mlflow.note.content", note)
            return descriptions.next_steps(uri, run.info.experiment_id, self.run_id,
                                           model_name, decided)
        except Exception:  # noqa: BLE001 - a description never fails the sweep's end
            log.warning("could not describe the sweep's parent run", exc_info=True)
            return []


def registry_model_name(config: DictConfig) -> str:
    from search.model_registry.model_store import DEFAULT_MODEL_NAME

    return str((config.get("registry") or {}).get("model_name") or DEFAULT_MODEL_NAME)


def log_sweep_curves(client: MlflowClient, study: optuna.Study, summary: dict) -> None:
    """Every trial's val_loss per epoch, from the tracked series, as one PNG on the parent."""
    import matplotlib.pyplot as plt

    from search.sweep.figures import curves_figure, run_curves

    runs = child_runs(client, study.study_name)
    curves = run_curves(client, runs, "val_loss")
    if not curves:
        return
    states = {int(r.data.tags["optuna.trial_number"]): r.data.tags.get("optuna.trial_state", "")
              for r in runs if "optuna.trial_number" in r.data.tags}
    best = summary.get("best") or {}
    figure = curves_figure(curves, states, best.get("number"), "val_loss",
                           title=f"val_loss per epoch: {len(curves)} trials of {study.study_name}",
                           best_value=best.get("value"))
    mlflow.log_figure(figure, "sweep/val_loss_all_trials.png")
    plt.close(figure)


PROMOTION_FILE = "promotion.json"


def write_promotion(sweep_dir: Path, decision: dict[str, Any]) -> None:
    """The registry decision (version, alias, held-out metrics) as ``promotion.json``."""
    import json

    sweep_dir.mkdir(parents=True, exist_ok=True)
    (sweep_dir / PROMOTION_FILE).write_text(json.dumps(decision, indent=2, default=str))


def redacted_sweeper_yaml(sweeper: DictConfig) -> str:
    """The sweeper settings as written, with any password in the storage URL masked."""
    settings = OmegaConf.to_container(sweeper, resolve=False)
    if isinstance(settings.get("storage"), str):
        settings["storage"] = mlflow_runs.redact_uri(settings["storage"])
    return OmegaConf.to_yaml(OmegaConf.create(settings))


def session_failure(sweep_dir: Path) -> str | None:
    """Why this sweep session failed as a whole: it ran trials and none completed."""
    counts = sweep_context.session_counts(sweep_dir)
    if counts.get("FAIL") and not (counts.get("COMPLETE") or counts.get("PRUNED")):
        return (f"none of this sweep's {counts['FAIL']} trial(s) completed; each trial's "
                "fail_reason is in the study and its log in the sweep folder")
    return None


def load_sweep_study() -> optuna.Study | None:
    """The study the sweeper used (it exports its name and storage to the environment)."""
    study = sweep_context.sweep_study()
    if study is None:
        log.warning("no %s/%s in the environment: sweep report skipped",
                    *sweep_context.STUDY_ENV_NAMES)
    return study


def child_runs(client: MlflowClient, study: str, extra: str = "") -> list:
    """Trial runs of a study, in every experiment of the store."""
    experiments = [e.experiment_id for e in client.search_experiments()]
    query = f"tags.`optuna.study` = '{study}'" + (f" and {extra}" if extra else "")
    return client.search_runs(experiments, filter_string=query, max_results=5000)


def close_stale_runs(client: MlflowClient, study: optuna.Study, keep: str) -> int:
    """End runs left RUNNING by a killed sweep: trial runs whose trial has finished, and
    other parent runs of this study once no trial is running any more."""
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    alive = any(t.state == optuna.trial.TrialState.RUNNING for t in trials.values())
    closed = 0
    for run in child_runs(client, study.study_name, "attributes.status = 'RUNNING'"):
        if run.info.run_id == keep:
            continue
        number = run.data.tags.get("optuna.trial_number")
        if number is None:
            # Between two trials no trial runs, yet the sweep may well be alive: a parent
            # whose process on this host still runs is never closed.
            if (run.data.tags.get("sweep.parent") == "true" and not alive
                    and mlflow_runs.owner_alive(run.data.tags) is not True):
                client.set_terminated(run.info.run_id, "KILLED")
                closed += 1
            continue
        trial = trials.get(int(number))
        if trial is not None and trial.state.is_finished():
            client.set_tag(run.info.run_id, "optuna.trial_state", trial.state.name)
            client.set_terminated(run.info.run_id, "KILLED")
            closed += 1
    if closed:
        log.info("closed %d MLflow run(s) left RUNNING by an interrupted sweep", closed)
    return closed


def log_best_trial(client: MlflowClient, study: optuna.Study, summary: dict) -> None:
    """Best params and value on the parent run, plus the best trial's run id and eval metrics."""
    best = summary.get("best")
    if not best:
        return
    # The names the trials' runs use, so the parent's row reads like its best trial's.
    mlflow.log_params(dict(best["params"]))
    mlflow.log_metric("objective", best["value"])
    runs = child_runs(client, study.study_name, f"tags.`optuna.trial_number` = '{best['number']}'")
    finished = [r for r in runs if r.info.status == "FINISHED"]
    if finished:
        run = finished[0]
        mlflow.set_tag("best_run_id", run.info.run_id)
        mlflow.log_metrics({
            k: v for k, v in run.data.metrics.items() if k.startswith(("eval_", "ext_"))
        })
