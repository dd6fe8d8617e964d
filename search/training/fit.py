"""The fit: the Keras callbacks, the fault tests' hooks, the pruner's reports and `model.fit`.

`fit_model` trains the built model inside the job's MLflow run and checks what training left:
a finite loss, a best checkpoint, no divergence. A pruned trial ends here (tagged PRUNED).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import optuna
import tensorflow as tf
from omegaconf import DictConfig

from search.config_checks import pruning_metric
from search.evaluation import metrics as ev
from search.evaluation.evaluate_run import log_figure
from search.faults import armed, memory_fault
from search.training import resume
from search.training.keras_callbacks import (
    AtomicModelCheckpoint,
    EpochMetricsToMlflow,
    FaultInEpoch,
    LearningRateLogger,
    ReportToPruner,
    check_divergence,
)
from search.training.lifecycle import TrackedRun, best_checkpoint, resume_from
from search.training.model_setup import BuiltModel
from search.training.run_plan import RunPlan

# train()'s own logger: its lines keep the name the terminal and the sweep's console show.
log = logging.getLogger("search.training.trainer")


@dataclass(frozen=True)
class FitSettings:
    """The `trainer.*` knobs only the fit reads (the shared ones are in `RunPlan`)."""

    patience: int
    min_delta: float
    verbose: int
    divergence_factor: float
    prune_on: str | None  # the per-epoch value reported to a sweep's pruner; None: no pruning
    objective: Any

    @classmethod
    def from_cfg(cls, cfg: DictConfig, in_sweep: bool) -> FitSettings:
        return cls(
            patience=int(cfg.trainer.patience),
            min_delta=float(cfg.trainer.min_delta),
            verbose=int(cfg.trainer.verbose),
            divergence_factor=float(cfg.trainer.get("divergence_factor") or 0),
            prune_on=pruning_metric(cfg) if in_sweep else None,
            objective=cfg.objective,
        )


@dataclass(frozen=True)
class FitResult:
    """What the fit leaves: the whole trial's epoch history, its losses, the best checkpoint."""

    history: dict[str, list[float]]
    losses: list[float]
    checkpoint: Path


def smooth_labels(dataset: tf.data.Dataset, eps: float) -> tf.data.Dataset:
    """Train targets pulled to eps/2 and 1 - eps/2, as Keras' `BinaryCrossentropy(
    label_smoothing=eps)` does, but in the train batches only: the loss object would smooth
    val too, and val_loss (objective, pruning, early stopping) must stay comparable across
    trials with and without smoothing."""
    if not eps:
        return dataset
    return dataset.map(lambda x, y: (x, y * (1.0 - eps) + 0.5 * eps),
                       num_parallel_calls=tf.data.AUTOTUNE)


def log_curves(history: dict[str, list[float]]) -> None:
    """The loss/accuracy curve figure (also for pruned or stopped trials)."""
    if history.get("loss"):
        log_figure(ev.history_figure(history), "curves/loss_accuracy.png")


def fit_model(cfg: DictConfig, plan: RunPlan, data: Any, built: BuiltModel,
              tracked: TrackedRun) -> FitResult:
    """Train `built.model` on `data` (resuming a retried trial) and check what it left."""
    checkpoint = best_checkpoint(plan)
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    settings = FitSettings.from_cfg(cfg, in_sweep=tracked.trial is not None)
    callbacks, resumable = build_callbacks(settings, plan, data, built, tracked, checkpoint)
    # a retried trial's state, checked against this model before anything of it is used
    point = resume_from(tracked, plan, built.model, resumable)
    if point is not None:  # the epochs trained before, each reported once
        resume.carry_over(point, checkpoint, tracked.run_id,
                          tracked.trial if settings.prune_on is not None else None,
                          settings.prune_on, plan.initial_epoch)
    run_fit(settings, plan, data, built, tracked, callbacks, resumable)
    history = resume.merged_history(resumable, built.model.history.history)
    try:
        losses = check_training(history, checkpoint, plan.monitor, settings.divergence_factor,
                                built.n_classes)
    except Exception:  # a failed fit's curve says why; a good one's waits for evaluation
        log_curves(history)  # (best_model: rendered for the trials that matter)
        raise
    return FitResult(history, losses, checkpoint)


def build_callbacks(settings: FitSettings, plan: RunPlan, data: Any, built: BuiltModel,
                    tracked: TrackedRun, checkpoint: Path
                    ) -> tuple[list[keras.callbacks.Callback], resume.ResumableState | None]:
    """The fit's callbacks in their order, and the resumable-state writer among them."""
    monitor = plan.monitor
    stateful: list[keras.callbacks.Callback] = [
        keras.callbacks.EarlyStopping(
            monitor=monitor, patience=settings.patience,
            min_delta=settings.min_delta, restore_best_weights=True,
        ),
        AtomicModelCheckpoint(checkpoint, monitor=monitor, save_best_only=True),
        *built.schedule.callbacks,
    ]
    resumable: resume.ResumableState | None = None
    if tracked.resume_plan is not None:  # after the callbacks it keeps, before those that report
        resumable = resume.ResumableState(
            tracked.resume_plan, stateful, checkpoint, int(data.steps_per_epoch),
            plan.max_epochs, {"run_id": tracked.run_id, "config_hash": tracked.config_hash})
    callbacks: list[keras.callbacks.Callback] = [
        keras.callbacks.TerminateOnNaN(), *stateful, LearningRateLogger(),
        *([resumable] if resumable is not None else []), EpochMetricsToMlflow(),
    ]
    if armed("mid_epoch") or armed("tracking_outage") or armed("preempt"):
        callbacks.append(FaultInEpoch())
    if settings.prune_on is not None:
        if settings.prune_on != monitor:
            log.info("pruning on %s (trainer.monitor=%s runs against objective=%s)",
                     settings.prune_on, monitor, settings.objective)
        # last: it reads the stop_training that EarlyStopping (above) set for this epoch
        callbacks.append(ReportToPruner(tracked.trial, settings.prune_on))
    return callbacks, resumable


def run_fit(settings: FitSettings, plan: RunPlan, data: Any, built: BuiltModel,
            tracked: TrackedRun, callbacks: list[keras.callbacks.Callback],
            resumable: resume.ResumableState | None) -> None:
    """`model.fit` from where the run starts; a pruned trial ends the run as PRUNED."""
    model, point = built.model, tracked.point
    try:
        memory_fault()
        model.fit(
            resume.resume_data(smooth_labels(data.train, built.smoothing), tracked.resume_plan,
                               plan.initial_epoch, int(data.steps_per_epoch)),
            steps_per_epoch=int(data.steps_per_epoch),
            # a state saved after early stopping: no epoch left, on_train_end restores
            epochs=tracked.start_epoch if point is not None and point.meta.get("stopped")
            else plan.max_epochs,
            initial_epoch=tracked.start_epoch,
            validation_data=data.val,
            shuffle=False,  # the tf.data pipeline shuffles (seeded); Keras would warn
            class_weight=data.class_weight,
            callbacks=callbacks,
            verbose=settings.verbose,
        )
    except optuna.TrialPruned:  # a normal end, not a failure: FINISHED, tagged PRUNED
        if resumable is not None:  # it records each epoch before the pruner decides
            history = resumable.history
            tracked.end_as_pruned(len(history.get("loss", [])))
        else:  # the pruner stops in on_epoch_end, before Keras' History records it
            history = model.history.history
            tracked.end_as_pruned(len(history.get("loss", [])) + 1)
        log_curves(history)
        raise
    except MemoryError as error:
        raise MemoryError(
            f"out of memory while training ({error or 'an allocation failed'}); lower "
            "data.batch_size, data.image_size or the model's size (model.base_filters, "
            "model.dense_units), or run fewer hydra.sweeper.n_jobs"
        ) from error


def check_training(history: dict[str, list[float]], checkpoint: Path, monitor: str,
                   divergence_factor: float, n_classes: int) -> list[float]:
    """Refuse a fit with a NaN/inf loss, no best checkpoint, or a diverged loss.

    Returns:
        The training losses, one per epoch.
    """
    losses = history.get("loss", [])
    if not losses or any(not math.isfinite(v) for v in losses):
        bad = next((i for i, v in enumerate(losses) if not math.isfinite(v)), 0)
        raise FloatingPointError(
            f"training loss became NaN/inf at epoch {bad + 1}; lower "
            "optimizer.learning_rate or enable a clipnorm (optimizer.clipnorm=1.0)"
        )
    if not checkpoint.exists():
        raise FloatingPointError(f"no finite {monitor} was seen, so no checkpoint was saved")
    check_divergence(losses, divergence_factor, n_classes)
    return losses
