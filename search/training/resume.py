"""Resumable trials: every epoch leaves a state a retried trial continues from.

Keras' ``BackupAndRestore`` keeps weights, optimizer and epoch, but not what makes a resumed
run the same run: the early-stopping and plateau callbacks' state (best value, wait counter,
best weights), the best-only checkpoint's best value, the dropout seed generators' state
(``save_weights`` leaves RNG state out), the epoch history the pruner and MLflow saw, and the
data order. So this module writes its own, one ``.npz`` file per write (temporary name, then
``os.replace``), and a copy of the best checkpoint beside it:

- every variable of the model (weights and seed-generator states) and of the optimizer
  (iterations, hence the learning-rate schedule's step; the learning rate a plateau cut);
- the epochs done, the epoch logs so far, the callbacks' state, the MLflow run id.

The data order is restored by skipping the batches already trained (``resume_data``): the
train pipeline is a pure function of its seed, and skipping runs its shuffle and augmentation
(their RNG advances exactly as in the first attempt) without training on them.

Only the last state is kept; the trial removes its folder when it ends, except when it was
killed or preempted (the retry needs it). Where the folder lives: ``hydra.sweeper.retry``.

A state never fails the trial it should save: one that cannot be read or does not fit the
run (truncated, overwritten, pickled, missing entries, a broken best-checkpoint copy, the
wrong shapes) is renamed ``<name>.damaged-<time>`` and kept, with one warning naming it and
why, and the trial starts from epoch 0 (``read_state``, ``ResumableState.adopt``). A folder
that cannot take a state costs the trial its resumability, not the trial.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import keras
import numpy as np

from search import sweep_context
from search.tracking import tags as tag_keys
from search.training.stored_state import (  # noqa: F401 - read_state etc. re-exported
    DAMAGED,
    FORMAT,
    STATE_FILE,
    STATEFUL,
    DamagedState,
    ResumePoint,
    _best_weights,
    _clear_way,
    _describe,
    check_fit,
    read_state,
    set_aside,
)

log = logging.getLogger(__name__)

RESUME_DIR_ATTR = sweep_context.RESUME_DIR_ATTR  # a retry copy inherits the user attr


@dataclass
class ResumePlan:
    """Where this trial's state lives, how often it is written, and what it resumes from."""

    directory: Path
    write: bool
    every_epochs: int = 1
    point: ResumePoint | None = None
    attempts: list[int] = field(default_factory=list)

    @property
    def initial_epoch(self) -> int | None:
        return self.point.epoch if self.point is not None else None


def plan_for_trial(trial: sweep_context.SweepTrial | None, output_dir: Path,
                   config_hash: str) -> ResumePlan | None:
    """The trial's state folder (inherited from the attempt it retries) and its last state.

    None outside a sweep. ``retry.resume=false``: no state is written or read (preemption
    still stops the trial cleanly; its retry starts from epoch 0).
    """
    policy = sweep_context.retry_policy()
    if trial is None or policy is None:
        return None
    attrs = trial.trial.user_attrs
    inherited = attrs.get(RESUME_DIR_ATTR)
    if inherited:
        directory = Path(inherited)
    elif policy.get("state_dir"):
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", trial.study)
        root = Path(policy["state_dir"]).expanduser().resolve()
        directory = root / safe / f"trial-{trial.number}"
    else:
        directory = (output_dir / "resume").resolve()
    trial.trial.set_user_attr(RESUME_DIR_ATTR, str(directory))
    write = bool(policy.get("resume", True))
    plan = ResumePlan(directory, write, int(policy.get("every_epochs") or 1))
    if write and inherited:
        plan.point = read_state(directory, config_hash)
    elif write:
        _clear_way(directory)
    return plan


def resume_data(dataset: Any, plan: ResumePlan | None, first_epoch: int,
                steps_per_epoch: int) -> Any:
    """The train dataset positioned where the resumed epoch starts (see the module note)."""
    if plan is None or plan.point is None:
        return dataset
    return dataset.skip((plan.point.epoch - first_epoch) * steps_per_epoch)


def callback_state(callbacks: Sequence[keras.callbacks.Callback]) -> tuple[list, dict]:
    """(JSON-able attrs per callback, arrays) of the callbacks' resumable state."""
    states, arrays = [], {}
    for i, callback in enumerate(callbacks):
        names = next((n for cls, n in STATEFUL.items() if isinstance(callback, cls)), ())
        states.append({n: _json_number(getattr(callback, n, None)) for n in names})
        for k, weight in enumerate(getattr(callback, "best_weights", None) or []):
            arrays[f"cb{i}_best_{k}"] = np.asarray(weight)
    return states, arrays


def restore_callbacks(callbacks: Sequence[keras.callbacks.Callback], states: list,
                      arrays: dict[str, np.ndarray]) -> None:
    for i, (callback, state) in enumerate(zip(callbacks, states, strict=True)):
        for name, value in state.items():
            setattr(callback, name, value)
        best = _best_weights(arrays, i)
        if best:
            callback.best_weights = best


def _json_number(value: Any) -> Any:
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)  # inf, nan: restored by float()
    return value


def _restore_number(value: Any) -> Any:
    return float(value) if value in ("inf", "-inf", "nan") else value


class ResumableState(keras.callbacks.Callback):
    """Writes the state after every ``every_epochs`` epochs, restores it at the start of a
    resumed fit, and ends the trial cleanly when a preemption (SIGTERM) is asked for.

    Place it after the callbacks whose state it keeps (they reset theirs in on_train_begin)
    and before the ones that report an epoch outward (MLflow, the pruner), so a state never
    lags behind what was reported (a resumed trial re-reports from its own history). After a
    preemption it stops the fit at the next epoch's start, when every callback has seen the
    finished epoch.
    """

    def __init__(self, plan: ResumePlan | None, stateful: Sequence[keras.callbacks.Callback],
                 checkpoint: Path, steps_per_epoch: int, max_epochs: int,
                 meta: dict[str, Any]) -> None:
        super().__init__()
        self.plan = plan
        self.stateful = list(stateful)
        self.checkpoint = checkpoint
        self.steps = steps_per_epoch
        self.max_epochs = max_epochs
        self.meta = meta
        self.history: dict[str, list[float]] = (plan.point.history if plan and plan.point
                                                else {})
        self.saved_epoch = plan.point.epoch if plan and plan.point else None
        self.finishing = False  # preempted: this epoch ends within the grace, then stop
        self.epoch_start = self.val_seconds = 0.0
        self.write_seconds = 0.0
        self.epoch = 0
        self.best_copy: tuple[str, str] | None = None  # (checkpoint mtime, copy's name)

    # --- restore ---------------------------------------------------------------------------

    def adopt(self, model: keras.Model) -> ResumePoint | None:
        """The plan's state if it fits ``model``, its optimizer and the callbacks; else it is
        set aside (one warning) and this fit starts from epoch 0, as if there were none.
        Called before the fit reports or restores anything of it."""
        point = self.plan.point if self.plan else None
        if point is None:
            return None
        problem = check_fit(point, model, self.stateful, self.max_epochs)
        if problem is None:
            return point
        set_aside(point.directory / STATE_FILE, f"it does not fit this run ({problem})")
        self.plan.point, self.history, self.saved_epoch = None, {}, None
        return None

    def on_train_begin(self, logs: dict | None = None) -> None:
        point = self.plan.point if self.plan else None
        if point is None:
            return
        problem = check_fit(point, self.model, self.stateful, self.max_epochs)
        if problem is not None:  # adopt() sets such a state aside before the fit
            raise ValueError(f"the resumable state {point.directory / STATE_FILE} does not "
                             f"fit this run ({problem}); remove it to start again")
        optimizer = self.model.optimizer
        for prefix, variables in (("model", self.model.variables), ("opt", optimizer.variables)):
            for i, variable in enumerate(variables):
                variable.assign(point.arrays[f"{prefix}_{i}"])
        states = [{k: _restore_number(v) for k, v in s.items()} for s in point.meta["callbacks"]]
        restore_callbacks(self.stateful, states, point.arrays)
        log.info("Resumed from %s after epoch %d", point.directory, point.epoch)

    # --- write -----------------------------------------------------------------------------

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        if self.finishing:  # the preempted epoch ended, was saved and reported: stop here
            raise sweep_context.TrialInterrupted(
                f"SIGTERM during epoch {epoch}: it finished within the grace period; the "
                f"retry resumes after epoch {self.saved_epoch or 0}")
        self.epoch, self.epoch_start = epoch, time.monotonic()

    def on_test_begin(self, logs: dict | None = None) -> None:
        self._test_start = time.monotonic()

    def on_test_end(self, logs: dict | None = None) -> None:
        self.val_seconds = time.monotonic() - getattr(self, "_test_start", time.monotonic())

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        for key, value in (logs or {}).items():
            self.history.setdefault(key, []).append(float(value))
        preempted = sweep_context.preemption_deadline() is not None
        done = epoch + 1
        due = (done % self.plan.every_epochs == 0) if self.plan else False
        last = done >= self.max_epochs and not preempted
        if self.plan is not None and self.plan.write and (due or preempted) and not last:
            start = time.monotonic()
            self.write_or_stop_writing(done)
            self.write_seconds = time.monotonic() - start
        # preempted: the next epoch's start stops the trial, once MLflow and the pruner
        # (after this callback) have the epoch; a last epoch lets the trial end normally
        self.finishing = self.finishing or preempted

    def write_or_stop_writing(self, epoch: int) -> None:
        """Write the state; a folder that cannot take it (read-only, full, a file in the way)
        costs the trial its resumability, never the trial: one warning, no more writes."""
        try:
            self.write(epoch)
        except OSError as error:
            self.plan.write = False
            with contextlib.suppress(OSError):  # what the failed write left half-written
                for partial in self.plan.directory.glob(".*.partial*"):
                    partial.unlink(missing_ok=True)
            log.warning("the resumable state cannot be written to %s (%s): the trial goes on "
                        "without one, so a kill restarts it from epoch %d; point "
                        "hydra.sweeper.retry.state_dir at a writable folder", self.plan.directory,
                        _describe(error), self.saved_epoch or 0)

    def write(self, epoch: int) -> None:
        """Write the state after ``epoch`` epochs (atomic: a kill leaves the previous one)."""
        directory = self.plan.directory
        directory.mkdir(parents=True, exist_ok=True)
        best = self._copy_best(epoch)
        states, arrays = callback_state(self.stateful)
        variables = self.model.variables
        opt_vars = self.model.optimizer.variables
        for i, v in enumerate(variables):
            arrays[f"model_{i}"] = keras.ops.convert_to_numpy(v)
        for i, v in enumerate(opt_vars):
            arrays[f"opt_{i}"] = keras.ops.convert_to_numpy(v)
        meta = {**self.meta, "format": FORMAT, "epoch": epoch, "history": self.history,
                "callbacks": states, "n_model": len(variables), "n_opt": len(opt_vars),
                "stopped": bool(self.model.stop_training), "best_checkpoint": best,
                "written": time.time()}
        arrays["meta"] = np.array(json.dumps(meta))
        partial = directory / f".{STATE_FILE}.{os.getpid()}.partial.npz"
        np.savez(partial, **arrays)
        os.replace(partial, directory / STATE_FILE)
        self.saved_epoch = epoch
        for old in directory.glob("best-e*.keras"):  # only the state's own copy stays
            if old.name != best:
                old.unlink(missing_ok=True)

    def _copy_best(self, epoch: int) -> str | None:
        """The best checkpoint's copy beside the state (a retry elsewhere needs it)."""
        if not self.checkpoint.exists():
            return None
        directory = self.plan.directory
        stamp = f"{self.checkpoint.stat().st_mtime_ns}"
        if self.best_copy is not None and self.best_copy[0] == stamp:
            return self.best_copy[1]  # no better epoch since the last copy
        name = f"best-e{epoch}.keras"
        partial = directory / f".{name}.partial"
        shutil.copyfile(self.checkpoint, partial)
        os.replace(partial, directory / name)
        self.best_copy = (stamp, name)
        return name

    # --- preemption ------------------------------------------------------------------------

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        deadline = sweep_context.preemption_deadline()
        if deadline is None or self.finishing:
            return
        now = time.monotonic()
        per_batch = (now - self.epoch_start) / (batch + 1)
        need = (self.steps - batch - 1) * per_batch + self.val_seconds + self.write_seconds
        if self.plan is not None and self.plan.write and now + 1.5 * need < deadline:
            self.finishing = True  # the epoch ends in time: on_epoch_end saves, then stops
            log.warning("SIGTERM: finishing epoch %d (about %.1f s) before stopping",
                        self.epoch + 1, need)
            return
        raise sweep_context.TrialInterrupted(
            f"SIGTERM at epoch {self.epoch + 1}, batch {batch + 1}: the epoch would not end "
            f"within the grace period (about {need:.0f} s left); the retry resumes after "
            f"epoch {self.saved_epoch or 0}")


def remove_state(plan: ResumePlan | None) -> None:
    """The trial ended (not killed, not preempted): its state is no longer needed. A damaged
    state set aside in its folder stays there for inspection (``set_aside``)."""
    if plan is None:
        return
    sweep_context.remove_state_folder(plan.directory)


def merged_history(callback: ResumableState | None,
                   fit_history: dict[str, list[float]]) -> dict[str, list[float]]:
    """The whole trial's epoch history: what the interrupted attempts trained, then this
    fit's epochs (the callback keeps both; without a callback, the fit's own)."""
    return callback.history if callback is not None else fit_history


def run_tags(point: ResumePoint | None) -> dict[str, str]:
    """Tags linking a resumed trial's new MLflow run to the interrupted attempt's run.

    A new run rather than the old one reopened: every Optuna trial keeps its own run (the
    interrupted one stays KILLED with its partial curve), and the new run holds the whole
    curve, the earlier epochs copied from the state (``carry_over``)."""
    if point is None:
        return {}
    return {tag_keys.RESUME_FROM_EPOCH: str(point.epoch),
            **({tag_keys.RESUME_PREVIOUS_RUN_ID: point.run_id} if point.run_id else {})}


def carry_over(point: ResumePoint, checkpoint: Path, run_id: str,
               trial: sweep_context.SweepTrial | None, prune_on: str | None,
               first_epoch: int) -> None:
    """What the resumed fit starts with besides the variables: the best checkpoint so far,
    the earlier epochs' metrics in the new MLflow run (from the state's history, so an epoch
    the interrupted attempt never logged is there too; none is logged twice), and the
    pruner's values for those epochs (the retry is a new Optuna trial: each epoch reported
    once on it)."""
    from mlflow.tracking import MlflowClient

    best = point.best_checkpoint
    if best is not None and best.is_file():
        shutil.copyfile(best, checkpoint)
    from mlflow.entities import Metric

    history = point.history
    now = int(time.time() * 1000)
    # the run is new: every earlier epoch goes in once (MLflow takes 1000 per batch)
    metrics = [Metric(key, value, now, first_epoch + i)
               for key, values in history.items() for i, value in enumerate(values)]
    for start in range(0, len(metrics), 1000):
        MlflowClient().log_batch(run_id, metrics=metrics[start:start + 1000], synchronous=True)
    if trial is not None and prune_on in history:
        for i, value in enumerate(history[prune_on]):
            trial.report(value, first_epoch + i)
