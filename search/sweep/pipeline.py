"""The sweep's end as a pipeline: the post-sweep steps, in order, passing values.

    report → final stage → registration and gate (the floor decided before any alias moves)
    → floor → ensemble → cross-validation → next steps

The Hydra callback (`search.sweep.hydra_callbacks`) opens the sweep's MLflow parent run and,
after the last trial, calls `run_sweep_end`. Each step takes the sweep (`SweepEnd`) and what
the steps before it found (`SweepOutcome`: the best trial's run, the registry's decision, why
the sweep fails) and returns what it found. The parent run's tags (`best_run_id`,
`promotion.*`, `final_stage.*`, ...) are written as each step goes, for people and the MLflow
UI; no step reads them back. The step running now is the `sweep.end_step` tag, so even a
SIGKILL leaves the step it stopped in on the run.

What a failing step does:
- final stage, ensemble, cross-validation: their own errors are logged and tagged
  (`final_stage.error`, `ensemble.error`, `cv.error`) and the steps after them run (the
  search's best trial, or the registration, stands);
- any other error, in any step (the report, the registration, a step's setup): the sweep's
  end stops there; the parent run ends FAILED with `sweep.stopped_in` naming the step, and
  the command exits 1;
- an interrupt in any step (Ctrl-C, or SIGTERM, which the sweep's end takes as one): the
  running single runs are stopped, the parent run ends KILLED with `sweep.stopped_in`, and
  the command exits as interrupted (130; 143 for SIGTERM);
- a version under the quality floor (`registry.floor`) gets no alias (decided inside the
  locked gate); the sweep then exits 1 with the figure once its parent run is closed;
- next steps: a warning; they never fail the sweep's end.
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import mlflow
import optuna
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig

from search import sweep_context
from search.faults import fault_point
from search.model_registry.champion import PromotionDecision, floor_failure
from search.model_registry.registration import (
    promote_sweep_best,
    registry_floor,
    registry_options,
)
from search.quiet_start import quiet_native_start
from search.sweep import report
from search.sweep.cross_validation import run_cross_validation
from search.sweep.final_stage import run_final_stage
from search.sweep.top_k_ensemble import promote_ensemble
from search.tracking import descriptions, mlflow_runs
from search.tracking import tags as tag_keys

log = logging.getLogger(__name__)

PROMOTION_FILE = "promotion.json"
# The exit status of a sweep whose end was stopped by SIGTERM (what a shell reports).
SIGTERM_EXIT = 128 + signal.SIGTERM


@dataclass(frozen=True)
class SweepEnd:
    """What every step reads: the sweep's config, its (active) parent run and its study."""

    config: DictConfig
    parent_run_id: str
    study: optuna.Study | None  # None: the sweeper exported no study (report skipped)
    client: MlflowClient
    started: float  # time.time() when the parent run was opened
    report_dir_name: str  # the report's folder, in the sweep folder and on the parent run

    @property
    def sweep_dir(self) -> Path:
        """The sweep's folder (`hydra.sweep.dir`)."""
        return Path(self.config.hydra.sweep.dir)

    @property
    def single_objective(self) -> bool:
        """Whether the study has one best trial to re-rank and register (not a Pareto front)."""
        return self.study is not None and len(self.study.directions) == 1


@dataclass(frozen=True)
class SweepOutcome:
    """What the steps found so far; each step returns a new one."""

    best_run_id: str | None = None  # the best trial's run: the search's, then the best mean's
    decision: PromotionDecision | None = None  # the registry's, for the best run
    failure: str | None = None  # why the sweep fails as a whole (exit 1); None: it does not


class SweepEndTerminated(BaseException):  # noqa: N818 - an interrupt, like KeyboardInterrupt
    """SIGTERM during the sweep's end (a preemption, `kill`): handled as an interrupt."""


@dataclass
class Progress:
    """Where the sweep's end is: the step running and what the steps before it found."""

    step: str = "report"
    outcome: SweepOutcome = field(default_factory=SweepOutcome)
    stopped: str | None = None  # how the end stopped, in words (None: it ran to the end)
    interrupt: BaseException | None = None  # the interrupt to end the command with


def run_sweep_end(config: DictConfig, parent_run_id: str, started: float, report_dir_name: str,
                  close_parent: Callable[[str], None]) -> None:
    """Run the post-sweep steps in order on the sweep's active parent run.

    Args:
        config: The composed sweep config.
        parent_run_id: The sweep's MLflow parent run (active in this process).
        started: When the parent run was opened (`time.time()`), for `sweep_wall_seconds`.
        report_dir_name: The report's folder name.
        close_parent: Ends the parent run with the status given (FINISHED, FAILED or KILLED)
            once the steps are done, or one of them stopped the sweep's end.

    Raises:
        SystemExit: The sweep failed as a whole (no trial completed, a step failed or the
            quality floor was missed), or SIGTERM stopped it; after the parent run was closed.
        KeyboardInterrupt: Ctrl-C stopped it, after the parent run was closed (KILLED).
    """
    client = MlflowClient()
    progress = Progress()
    end: SweepEnd | None = None
    try:
        with sigterm_as_interrupt():
            end = SweepEnd(config, parent_run_id, load_sweep_study(), client, started,
                           report_dir_name)
            run_steps(end, progress)
    except (KeyboardInterrupt, SweepEndTerminated) as interrupt:
        progress.interrupt = interrupt
        how = "SIGTERM" if isinstance(interrupt, SweepEndTerminated) else "Ctrl-C"
        progress.stopped = f"interrupted ({how}) in the sweep's {progress.step} step"
    except Exception as error:  # noqa: BLE001 - the parent run says where, the exit says why
        log.exception("the sweep's %s step failed", progress.step)
        progress.stopped = f"failed in the sweep's {progress.step} step"
        progress.outcome = replace(progress.outcome, failure=progress.outcome.failure or (
            f"the sweep's end stopped in its {progress.step} step: "
            + mlflow_runs.redact_uri(f"{type(error).__name__}: {error}")))
    finish(end, client, parent_run_id, progress, close_parent)


def run_steps(end: SweepEnd, progress: Progress) -> None:
    """The steps in order; `progress` names the step running and keeps what they found."""

    def step(name: str, run: Callable[[], SweepOutcome | None]) -> None:
        progress.step = name
        end.client.set_tag(end.parent_run_id, tag_keys.SWEEP_END_STEP, name)
        found = run()
        if found is not None:
            progress.outcome = found

    step("report", lambda: report_step(end))
    step("final_stage", lambda: final_stage_step(end, progress.outcome))
    if end.single_objective:
        with quiet_native_start():  # held-out scoring imports TF in this process
            step("registration", lambda: registration_step(end, progress.outcome))
            step("floor", lambda: floor_step(end, progress.outcome))
            step("ensemble", lambda: ensemble_step(end, progress.outcome))
        step("cross_validation", lambda: cross_validation_step(end, progress.outcome))
    progress.step = "next_steps"
    end.client.set_tag(end.parent_run_id, tag_keys.SWEEP_END_STEP, "done")


def finish(end: SweepEnd | None, client: MlflowClient, parent_run_id: str, progress: Progress,
           close_parent: Callable[[str], None]) -> None:
    """Close the parent run (KILLED, FAILED or FINISHED, with the step it stopped in), then
    describe it and print the next steps; end the command as the sweep's end ended."""
    failure = progress.outcome.failure
    status = ("KILLED" if progress.interrupt is not None
              else "FAILED" if failure or progress.stopped else "FINISHED")
    if progress.stopped:
        # first the facts a second Ctrl-C must not lose: where it stopped, and the status
        with contextlib.suppress(Exception):
            client.set_tag(parent_run_id, tag_keys.SWEEP_STOPPED_IN, progress.step)
            client.set_tag(parent_run_id, tag_keys.SWEEP_ENDED, progress.stopped)
    close_parent(status)
    lines = next_steps_step(end, progress.outcome, progress.stopped) if end else []
    for line in lines:
        log.info("%s", line)
    if isinstance(progress.interrupt, SweepEndTerminated):
        log.error("error: %s; the parent run %s ended KILLED", progress.stopped, parent_run_id)
        raise SystemExit(SIGTERM_EXIT)
    if progress.interrupt is not None:
        log.error("error: %s; the parent run %s ended KILLED", progress.stopped, parent_run_id)
        raise progress.interrupt
    closing_step([], failure)


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM during the sweep's end raises `SweepEndTerminated` (as Ctrl-C raises
    KeyboardInterrupt), so the parent run ends KILLED naming the step, not RUNNING."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_term(signum: int, frame: object) -> None:
        raise SweepEndTerminated()

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# ---------------------------------------------------------------------------------------------
# The steps, in the order run_sweep_end runs them


def report_step(end: SweepEnd) -> SweepOutcome:
    """The sweep report on disk and on the parent run, the sweep's wall time, and whether
    this session failed as a whole; the best trial's run is the search's best."""
    best_run_id = None
    if end.study is not None:
        best_run_id = _report(end, end.study)
    mlflow.log_metric("sweep_wall_seconds", time.time() - end.started)
    return SweepOutcome(best_run_id=best_run_id, failure=session_failure(end.sweep_dir))


def _report(end: SweepEnd, study: optuna.Study) -> str | None:
    """Close stale runs, log the best trial, the summary, the report and the curves; the best
    trial's run id (None when it has no FINISHED run)."""
    client = end.client
    mlflow.set_tag(tag_keys.OPTUNA_STUDY, study.study_name)
    report.close_stale_runs(client, study, keep=end.parent_run_id)
    summary = report.summarize(study)
    best_run_id = report.log_best_trial(client, study, summary)
    mlflow.log_dict(summary, "sweep/summary.json")
    for state, count in summary["counts"].items():
        mlflow.log_metric(f"trials_{state.lower()}", count)
    folder = end.sweep_dir / end.report_dir_name
    fault_point("sweep_report")
    report.write_report(study, folder, client.get_run(end.parent_run_id).data.metrics)
    mlflow.log_artifacts(str(folder), end.report_dir_name)
    report.log_sweep_curves(client, study, summary)
    log.info("Sweep report: %s", folder / "sweep_report.html")
    return best_run_id


def final_stage_step(end: SweepEnd, outcome: SweepOutcome) -> SweepOutcome:
    """Re-train the top trials with other seeds (`registry.final_stage`); the trial with the
    best mean becomes the best run. Skipped for a Pareto front or a failed session."""
    if not end.single_objective or outcome.failure:
        return outcome
    try:  # before registration: it may move the best run to the best mean
        best_mean = run_final_stage(end.config, end.parent_run_id)
    except Exception as error:  # noqa: BLE001 - the search's results stand
        log.exception("the final stage failed; the search's best trial is registered")
        end.client.set_tag(end.parent_run_id, tag_keys.FINAL_STAGE_ERROR,
                           mlflow_runs.redact_uri(f"{type(error).__name__}: {error}")[:5000])
        return outcome
    return outcome if best_mean is None else replace(outcome, best_run_id=best_mean)


def registration_step(end: SweepEnd, outcome: SweepOutcome) -> SweepOutcome:
    """Register the best run's model and decide, under the lock, the floor first and then
    champion or challenger (the gate); the decision as promotion.json."""
    decision = promote_sweep_best(end.config, end.parent_run_id, best_run_id=outcome.best_run_id)
    if decision is not None:  # beside the summary, for CI summaries and people
        write_promotion(end.sweep_dir, decision.to_dict())
    return replace(outcome, decision=decision)


def ensemble_step(end: SweepEnd, outcome: SweepOutcome) -> None:
    """The top-k ensemble as its own version, through the same gate and floor
    (`registry.ensemble`)."""
    if outcome.decision is not None:
        promote_ensemble(end.config, end.parent_run_id, outcome.decision)


def cross_validation_step(end: SweepEnd, outcome: SweepOutcome) -> None:
    """The champion's config on k folds (`registry.cv_folds`; a version the floor refused is
    cross-validated itself); a failure here leaves the registration as it is, an interrupt
    stops the sweep's end."""
    if outcome.decision is None:
        return
    try:  # after the gate: a failure here leaves the registration as it is
        run_cross_validation(end.config, end.parent_run_id, outcome.decision)
    except Exception as error:  # noqa: BLE001
        log.exception("cross-validating the champion failed")
        end.client.set_tag(end.parent_run_id, tag_keys.CV_ERROR,
                           mlflow_runs.redact_uri(f"{type(error).__name__}: {error}")[:5000])


def floor_step(end: SweepEnd, outcome: SweepOutcome) -> SweepOutcome:
    """The quality floor (`registry.floor`) on the version this sweep registered: its figure
    on the parent run, and the sweep's failure when it was missed (the gate already kept
    every alias away from it)."""
    floor = registry_floor(end.config)
    decision = outcome.decision
    if floor is not None and decision is not None:
        value = decision.new_metrics.get(decision.metric)
        if value is not None:
            mlflow.log_metric(f"floor_{decision.metric}", float(value))
    return replace(outcome, failure=outcome.failure or floor_failure(decision, floor))


def next_steps_step(end: SweepEnd, outcome: SweepOutcome, stopped: str | None = None
                    ) -> list[str]:
    """The parent run's description (Markdown) and the lines that say what to do next
    (`stopped`: how the sweep's end stopped, when it did)."""
    uri = mlflow.get_tracking_uri()
    model_name = registry_options(end.config)["model_name"]
    decided = outcome.decision.to_dict() if outcome.decision is not None else None
    try:
        run = end.client.get_run(end.parent_run_id)
        if end.study is not None:
            summary = report.summarize(end.study)
            best = outcome.best_run_id
            note = descriptions.parent_description(
                end.study.study_name, summary, ", ".join(end.study.metric_names or ["value"]),
                (run.info.experiment_id, best) if best else None, decided, uri, model_name,
                stopped, experiment_id=run.info.experiment_id, parent_run_id=end.parent_run_id)
            end.client.set_tag(end.parent_run_id, tag_keys.MLFLOW_NOTE, note)
        return descriptions.next_steps(uri, run.info.experiment_id, end.parent_run_id,
                                       model_name, decided, stopped,
                                       artifact_uri=run.info.artifact_uri)
    except Exception:  # noqa: BLE001 - a description never fails the sweep's end
        log.warning("could not describe the sweep's parent run", exc_info=True)
        return []


def closing_step(lines: list[str], failure: str | None) -> None:
    """Print `lines`; end the command non-zero when the sweep failed."""
    for line in lines:
        log.info("%s", line)
    if failure:
        # Hydra would turn an exception into a warning and exit 0.
        raise SystemExit(f"error: {failure}")


# ---------------------------------------------------------------------------------------------
# Helpers of the steps


def load_sweep_study() -> optuna.Study | None:
    """The study the sweeper used (it exports its name and storage to the environment)."""
    study = sweep_context.sweep_study()
    if study is None:
        log.warning("no %s/%s in the environment: sweep report skipped",
                    *sweep_context.STUDY_ENV_NAMES)
    return study


def session_failure(sweep_dir: Path) -> str | None:
    """Why this sweep session failed as a whole: it ran trials and none completed."""
    counts = sweep_context.session_counts(sweep_dir)
    if counts.get("FAIL") and not (counts.get("COMPLETE") or counts.get("PRUNED")):
        return (f"none of this sweep's {counts['FAIL']} trial(s) completed; each trial's "
                "fail_reason is in the study and its log in the sweep folder")
    return None


def write_promotion(sweep_dir: Path, decision: dict[str, Any]) -> None:
    """The registry decision (version, alias, held-out metrics) as ``promotion.json``."""
    sweep_dir.mkdir(parents=True, exist_ok=True)
    (sweep_dir / PROMOTION_FILE).write_text(json.dumps(decision, indent=2, default=str))
