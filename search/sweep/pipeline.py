"""The sweep's end as a pipeline: the post-sweep steps, in order, passing values.

    report → final stage → registration and gate → ensemble → cross-validation → next steps

The Hydra callback (`search.sweep.hydra_callbacks`) opens the sweep's MLflow parent run and,
after the last trial, calls `run_sweep_end`. Each step takes the sweep (`SweepEnd`) and what
the steps before it found (`SweepOutcome`: the best trial's run, the registry's decision, why
the sweep fails) and returns what it found. The parent run's tags (`best_run_id`,
`promotion.*`, `final_stage.*`, ...) are written as each step goes, for people and the MLflow
UI; no step reads them back.

What a failing step does:
- report: its error propagates (the parent run then ends FAILED at exit);
- final stage: logged and tagged `final_stage.error`; the search's best trial is registered;
- registration and gate (with the ensemble, cross-validation and the floor after it): the
  sweep fails (exit 1) once its parent run is closed; the ensemble's and the
  cross-validation's own errors are tagged (`ensemble.error`, `cv.error`) and the
  registration stands;
- next steps: a warning; they never fail the sweep's end.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import mlflow
import optuna
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig

from search import sweep_context
from search.faults import fault_point
from search.model_registry.champion import PromotionDecision, floor_failure
from search.model_registry.registration import promote_sweep_best, registry_options
from search.quiet_start import quiet_native_start
from search.sweep import report
from search.sweep.cross_validation import run_cross_validation
from search.sweep.final_stage import run_final_stage
from search.sweep.top_k_ensemble import promote_ensemble
from search.tracking import descriptions
from search.tracking import tags as tag_keys

log = logging.getLogger(__name__)

PROMOTION_FILE = "promotion.json"


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


def run_sweep_end(config: DictConfig, parent_run_id: str, started: float, report_dir_name: str,
                  close_parent: Callable[[bool], None]) -> None:
    """Run the post-sweep steps in order on the sweep's active parent run.

    Args:
        config: The composed sweep config.
        parent_run_id: The sweep's MLflow parent run (active in this process).
        started: When the parent run was opened (`time.time()`), for `sweep_wall_seconds`.
        report_dir_name: The report's folder name.
        close_parent: Ends the parent run (FAILED when given True) once the registration
            and the steps after it are done, or were interrupted.

    Raises:
        SystemExit: The sweep failed as a whole (no trial completed, the registration
            failed or the quality floor was missed), after the parent run was closed.
    """
    client = MlflowClient()
    end = SweepEnd(config, parent_run_id, load_sweep_study(), client, started, report_dir_name)
    outcome = report_step(end)
    outcome = final_stage_step(end, outcome)
    # The parent run is closed whatever happens from here (Ctrl-C included), described with
    # what the steps found until then: hence one `outcome`, reassigned after each step.
    try:
        if end.single_objective:
            with quiet_native_start():  # held-out scoring imports TF in this process
                outcome = registration_step(end, outcome)
                ensemble_step(end, outcome)
            cross_validation_step(end, outcome)
            outcome = floor_step(end, outcome)
    except Exception as error:  # noqa: BLE001 - tagged on the run by promote_sweep_best
        log.exception("registering the sweep's best trial failed")
        outcome = replace(outcome, failure=outcome.failure or (
            f"registering the sweep's best trial failed: {type(error).__name__}: {error}"))
    finally:
        lines = next_steps_step(end, outcome)
        close_parent(bool(outcome.failure))
    closing_step(lines, outcome.failure)


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
                           f"{type(error).__name__}: {error}"[:5000])
        return outcome
    return outcome if best_mean is None else replace(outcome, best_run_id=best_mean)


def registration_step(end: SweepEnd, outcome: SweepOutcome) -> SweepOutcome:
    """Register the best run's model and decide champion or challenger (the gate)."""
    decision = promote_sweep_best(end.config, end.parent_run_id, best_run_id=outcome.best_run_id)
    return replace(outcome, decision=decision)


def ensemble_step(end: SweepEnd, outcome: SweepOutcome) -> None:
    """The top-k ensemble as its own version, through the same gate (`registry.ensemble`)."""
    if outcome.decision is not None:
        promote_ensemble(end.config, end.parent_run_id, outcome.decision)


def cross_validation_step(end: SweepEnd, outcome: SweepOutcome) -> None:
    """The decision as promotion.json, then the champion's config on k folds
    (`registry.cv_folds`); a failure here leaves the registration as it is."""
    if outcome.decision is None:
        return
    # beside the summary, for CI summaries and people
    write_promotion(end.sweep_dir, outcome.decision.to_dict())
    try:  # after the gate: a failure here leaves the registration as it is
        run_cross_validation(end.config, end.parent_run_id, outcome.decision)
    except Exception as error:  # noqa: BLE001
        log.exception("cross-validating the champion failed")
        end.client.set_tag(end.parent_run_id, tag_keys.CV_ERROR,
                           f"{type(error).__name__}: {error}"[:5000])


def floor_step(end: SweepEnd, outcome: SweepOutcome) -> SweepOutcome:
    """The quality floor (`registry.floor`) on the version this sweep registered."""
    floor = (end.config.get("registry") or {}).get("floor")
    decision = outcome.decision
    if floor is not None and decision is not None:
        value = decision.new_metrics.get(decision.metric)
        if value is not None:
            mlflow.log_metric(f"floor_{decision.metric}", float(value))
    return replace(outcome, failure=outcome.failure or floor_failure(decision, floor))


def next_steps_step(end: SweepEnd, outcome: SweepOutcome) -> list[str]:
    """The parent run's description (Markdown) and the lines that say what to do next."""
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
                (run.info.experiment_id, best) if best else None, decided, uri, model_name)
            mlflow.set_tag(tag_keys.MLFLOW_NOTE, note)
        return descriptions.next_steps(uri, run.info.experiment_id, end.parent_run_id,
                                       model_name, decided)
    except Exception:  # noqa: BLE001 - a description never fails the sweep's end
        log.warning("could not describe the sweep's parent run", exc_info=True)
        return []


def closing_step(lines: list[str], failure: str | None) -> None:
    """Print the next steps; end the command non-zero when the sweep failed."""
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
