"""The MLflow run's lifecycle: started (or resumed) with its name and tags, ended with its status.

`tracked_run` opens the run of one training job and always closes it: the trial's state tag,
the resumable state removed unless the trial was killed, the run renamed after how it ended,
and `mlflow.end_run` with FINISHED, FAILED or KILLED.
"""

from __future__ import annotations

import errno
import functools
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import keras
import mlflow
from omegaconf import DictConfig

from search import sweep_context
from search.tracking import descriptions, mlflow_runs, run_names
from search.tracking import tags as tag_keys
from search.tracking.model_logging import config_hash
from search.training import resume
from search.training.run_plan import RunPlan

# train()'s own logger: its lines keep the name the terminal and the sweep's console show.
log = logging.getLogger("search.training.trainer")


@dataclass
class TrackedRun:
    """The open MLflow run of a training job and how it is ending.

    `start_epoch` is where the fit starts (`trainer.initial_epoch`, or the epoch a retried
    trial resumes after). `status` (MLflow) and `state` (the Optuna trial's tag) start as a
    failure and change only when the job reaches an end that is not one; `values` and
    `epochs_run` go into the run's final name.
    """

    run: mlflow.ActiveRun
    run_name: str
    user_named: bool
    trial: sweep_context.SweepTrial | None
    info: dict[str, Any] | None
    resume_plan: resume.ResumePlan | None
    config_hash: str
    start_epoch: int
    status: str = "FAILED"
    state: str = "FAIL"
    values: list[float] | None = None
    epochs_run: int | None = None

    @property
    def run_id(self) -> str:
        return self.run.info.run_id

    @property
    def point(self) -> resume.ResumePoint | None:
        """The state a retried trial resumes from (None: none to resume)."""
        return self.resume_plan.point if self.resume_plan is not None else None

    def end_as_pruned(self, epochs_run: int) -> None:
        """The pruner stopped it: a normal end, not a failure (FINISHED, tagged PRUNED)."""
        self.state, self.status = "PRUNED", "FINISHED"
        self.epochs_run = epochs_run


def run_tags(cfg: DictConfig, info: dict[str, Any] | None) -> dict[str, str]:
    """Tags that let the MLflow UI filter and group runs."""
    tags = {tag_keys.MODEL_BUILDER: str(cfg.model.get("_target_", "?")).rsplit(".", 1)[-1]}
    tags.update({str(k): str(v) for k, v in (cfg.tracking.get("tags") or {}).items()})
    if info:
        tags.update({
            tag_keys.OPTUNA_STUDY: str(info["study"]),
            tag_keys.OPTUNA_TRIAL_NUMBER: str(info["trial_number"]),
            tag_keys.OPTUNA_SAMPLER: str(info["sampler"]),
            tag_keys.OPTUNA_PRUNER: str(info["pruner"]),
            tag_keys.OPTUNA_TRIAL_STATE: "RUNNING",
        })
    return tags


def start_run(cfg: DictConfig, plan: RunPlan, precision: str) -> TrackedRun:
    """Start the job's MLflow run (a retried trial's new run links to the one it resumes)."""
    trial = sweep_context.current_trial()
    info = trial.info if trial is not None else None
    hashed = config_hash(cfg)  # once: the resumable state, the params and the state's meta
    # A retried trial continues from its last resumable state (search/training/resume.py).
    resume_plan = resume.plan_for_trial(trial, plan.output_dir, hashed)
    parent = sweep_context.parent_run_id()
    run_name = run_names.initial_name(cfg, info["trial_number"] if info else None)
    tags = {**run_tags(cfg, info), **mlflow_runs.process_tags(), "precision": precision,
            **(trial.engine_tags() if trial is not None else {})}
    # the resume tags and attrs wait for resume_from: the state must fit the model first
    run = mlflow.start_run(run_name=run_name, parent_run_id=parent, tags=tags)
    tracked = TrackedRun(run, run_name, bool(cfg.tracking.get("run_name")), trial, info,
                         resume_plan, hashed, plan.initial_epoch)
    log.info("MLflow run %s (%s)", run.info.run_id, mlflow.get_tracking_uri())
    if trial is not None:  # optuna-dashboard shows user attrs: the trial links to its run
        trial.trial.set_user_attr("mlflow_run_id", run.info.run_id)
        url = mlflow_runs.run_url(run.info.experiment_id, run.info.run_id)
        if url:
            trial.trial.set_user_attr("mlflow_run_url", url)
        link_trial_to_run(trial.trial, run.info.experiment_id, run.info.run_id, url)
    return tracked


# optuna-dashboard shows user attrs as plain text but renders a trial's note as Markdown: the
# note carries the link. Its storage (optuna_dashboard/_note.py): study system attrs
# "dashboard:<trial_id>:note_ver" and "dashboard:<trial_id>:note_str:<i>", 2045-char pieces.
DASHBOARD_NOTE_PIECE = 2045


def link_trial_to_run(trial: Any, experiment_id: str, run_id: str, url: str | None) -> None:
    """The trial's note in optuna-dashboard links its MLflow run, for a local store too: there
    the address `mlflow ui` serves by default, said as such (another port or host: search the
    run id). A note someone already wrote is kept; a storage that refuses it costs the link."""
    local = url is None
    url = url or descriptions.run_link(mlflow.get_tracking_uri(), experiment_id, run_id)
    if local:  # the URL attr too, so the sweep report links every trial
        trial.set_user_attr("mlflow_run_url", url)
        trial.set_user_attr("mlflow_run_url_note", "where `python search/ui.py` (`mlflow ui`) "
                            "serves a local store by default; on another port or host, "
                            "search the run id")
    body = f"MLflow run: [{run_id}]({url})" + (
        "\n\n(where `python search/ui.py` (`mlflow ui`) serves this local store by default; "
        "on another port or host, search the run id in the UI)" if local else "")
    try:
        storage = trial.storage
        study_id = storage.get_study_id_from_name(trial.study.study_name)
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
        key = f"dashboard:{trial_id}:note_ver"
        if key in storage.get_study_system_attrs(study_id):
            return
        for i in range(0, len(body), DASHBOARD_NOTE_PIECE):
            storage.set_study_system_attr(study_id, f"dashboard:{trial_id}:note_str:"
                                          f"{i // DASHBOARD_NOTE_PIECE}",
                                          body[i:i + DASHBOARD_NOTE_PIECE])
        storage.set_study_system_attr(study_id, key, 1)
    except Exception as error:  # noqa: BLE001 - a convenience: no storage error (a locked
        # SQLite, a trial object without a storage) may cost the trial its run
        log.debug("optuna-dashboard note not written (%s)", error)


def resume_from(tracked: TrackedRun, plan: RunPlan, model: keras.Model,
                resumable: resume.ResumableState | None) -> resume.ResumePoint | None:
    """The state the fit resumes from, once it fits ``model`` (a state that does not is set
    aside and the fit starts from epoch 0); the run and the trial then say where it starts."""
    point = resumable.adopt(model) if resumable is not None else None
    if point is None:
        return None
    tracked.start_epoch = point.epoch
    mlflow.set_tags(resume.run_tags(point))
    log.info("Resuming after epoch %d of %d in MLflow run %s", point.epoch, plan.max_epochs,
             tracked.run_id)
    if tracked.trial is not None:
        tracked.trial.trial.set_user_attr("resumed_from_epoch", point.epoch)
    return point


def end_run(tracked: TrackedRun, objective: str) -> None:
    """Close the run for good or for a retry: state tag, name, status (never raises on rename)."""
    if tracked.status != "KILLED":  # ended for good: its resumable state is not needed
        resume.remove_state(tracked.resume_plan)
    # No flush here: end_run drains MLflow's async queue itself, and each drain waits for
    # its logging thread's 1 s poll to lapse (benchmarks/trial_overhead.py measures it).
    if tracked.info:
        mlflow.set_tag(tag_keys.OPTUNA_TRIAL_STATE, tracked.state)
    if not tracked.user_named:  # a name the user gave stays as given
        values = tracked.values
        try:  # the name says how it ended; never let a rename hide the trial's outcome
            mlflow.MlflowClient().update_run(tracked.run_id, name=run_names.final_name(
                tracked.run_name, tracked.state, objective, values[0] if values else None,
                tracked.epochs_run))
        except Exception:  # noqa: BLE001
            log.warning("could not rename run %s", tracked.run_id, exc_info=True)
    mlflow.end_run(status=tracked.status)


def best_checkpoint(plan: RunPlan) -> Path:
    """Where the fit keeps the best epoch's model (outside MLflow: in the job's folder)."""
    return plan.output_dir / "checkpoints" / "best.keras"


def unwritable_artifact(error: BaseException, run: mlflow.ActiveRun) -> OSError | None:
    """The refused write into the run's local artifact folder behind ``error`` (its cause or
    context, as `log_keras_model`'s caller wraps it), or None for any other error."""
    try:
        location = mlflow.get_experiment(run.info.experiment_id).artifact_location
    except Exception:  # noqa: BLE001 - the store is gone too: not this case
        return None
    if not location.startswith("file:"):
        return None  # a server or an object store: its own errors say what went wrong
    root = Path(unquote(urlparse(location).path))
    seen: BaseException | None = error
    while seen is not None:
        if (isinstance(seen, OSError) and seen.errno in (errno.EACCES, errno.EPERM, errno.EROFS)
                and seen.filename and Path(str(seen.filename)).is_relative_to(root)):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def artifact_folder_problem(refused: OSError, tracked: TrackedRun, plan: RunPlan) -> str:
    """What a run whose artifact folder became unwritable says: the folder, what is kept."""
    folder = Path(unquote(urlparse(tracked.run.info.artifact_uri).path))
    checkpoint = best_checkpoint(plan)
    kept = (f"nothing trained is lost: the best checkpoint is at {checkpoint} (load it with "
            "keras.models.load_model(path, safe_mode=True))" if checkpoint.is_file()
            else "no epoch had been trained yet")
    return (f"cannot write MLflow artifacts: {refused.filename} ({refused.strerror}); the "
            f"run's artifact folder {folder} (or one above it) became unwritable during the "
            f"run, after the start-of-run check passed. The run ends FAILED; {kept}. Make the "
            "folder writable and re-run, or set tracking.artifact_root (a new "
            "tracking.experiment) to a writable place")


@contextmanager
def tracked_run(cfg: DictConfig, plan: RunPlan, precision: str) -> Iterator[TrackedRun]:
    """The job's MLflow run around the `with` body: FINISHED when the body returns, KILLED
    when it is interrupted (the retry resumes from the saved state), else FAILED. An artifact
    folder that becomes unwritable mid-run is named (`TrackingError`) with where the trained
    model still is."""
    tracked = start_run(cfg, plan, precision)
    try:
        yield tracked
        tracked.status, tracked.state = "FINISHED", "COMPLETE"
    except (KeyboardInterrupt, sweep_context.TrialInterrupted):
        tracked.status, tracked.state = "KILLED", "INTERRUPTED"
        raise
    except Exception as error:
        refused = unwritable_artifact(error, tracked.run)
        if refused is None:
            raise
        raise mlflow_runs.TrackingError(artifact_folder_problem(refused, tracked, plan)) from None
    finally:
        end_run(tracked, plan.objectives[0])


def log_run_inputs(cfg: DictConfig, tracked: TrackedRun, data: Any,
                   model: keras.Model) -> Callable[..., str]:
    """Log what the run starts from (config, data, model size) and its first description.

    Returns:
        The run's description maker; called again with the results once evaluated.
    """
    mlflow_runs.log_run_context(cfg)
    mlflow.log_params({
        "data.fingerprint": data.fingerprint,
        "data.n_train": data.n_train,
        "data.n_val": data.n_val,
        "data.n_test": data.n_test,
        "model.n_params": model.count_params(),
        "config_hash": tracked.config_hash,
    })
    mlflow.log_dict(data.source_info, "data/source_info.json")
    describe = functools.partial(
        descriptions.run_description, list(data.class_names), data.source_info,
        tuple(data.input_shape), data.fingerprint,
        threshold_rule=str(cfg.evaluation.threshold_rule))
    mlflow.set_tag(tag_keys.MLFLOW_NOTE, describe())
    return describe
