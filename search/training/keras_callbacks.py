"""The Keras callbacks of a training run, and the divergence check after it.

Keras' own callbacks do the work (EarlyStopping, ModelCheckpoint, TerminateOnNaN, MLflow's
MlflowCallback); these subclasses only add what none of them does: the learning rate in the
epoch logs, no duplicate validation metrics in MLflow, a checkpoint that is never
half-written, and the fault tests' hooks.
"""

from __future__ import annotations

import errno
import math
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import keras
import mlflow
import optuna

from search.faults import fault_epoch, fault_point, fires, pause_point, signal_point

if TYPE_CHECKING:
    from search.sweep_context import SweepTrial


class LearningRateLogger(keras.callbacks.Callback):
    """Puts the optimizer's current learning rate into the epoch logs.

    Keras only adds `learning_rate` to the logs when a LR callback runs; with a
    LearningRateSchedule object nothing reports it, so the curve would be missing in MLflow.
    """

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if logs is not None and "learning_rate" not in logs:
            logs["learning_rate"] = float(
                keras.ops.convert_to_numpy(self.model.optimizer.learning_rate)
            )


class EpochMetricsToMlflow(mlflow.keras.MlflowCallback):
    """MLflow's Keras callback, minus its duplicates.

    During fit() the validation metrics already arrive as val_* in the epoch logs;
    MlflowCallback.on_test_end would add step-0 duplicates (validation_loss, ...) each epoch.
    Its on_train_begin logs the optimizer's config as `optimizer_*` params, next to the
    `optimizer.*` values the run already has: here that config is an artifact instead.
    """

    def on_train_begin(self, logs: dict | None = None) -> None:
        config = self.model.optimizer.get_config()
        mlflow.log_dict({k: v if isinstance(v, int | float | str | bool | None) else repr(v)
                         for k, v in config.items()}, "config/optimizer.json")
        lines: list[str] = []
        self.model.summary(print_fn=lambda line, *args, **kwargs: lines.append(line))
        mlflow.log_text("\n".join(lines), "model_summary.txt")

    def on_test_end(self, logs: dict | None = None) -> None:
        return None

    def set_model(self, model: keras.Model) -> None:
        super().set_model(model)
        self._local = not mlflow.get_tracking_uri().startswith(
            ("http://", "https://", "databricks"))

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        """Synchronous on a local store, asynchronous on a server (MLflow's choice).

        A local SQLite write takes milliseconds, while draining MLflow's async queue at the
        run's end waits for its logging thread's 1 s poll: a fixed ~0.5 s per trial
        (benchmarks/trial_overhead.py). A server keeps the async queue: latency stays off
        the training loop, and an outage does not stop training."""
        if not self._local:
            return super().on_epoch_end(epoch, logs)
        if self.log_every_epoch and logs is not None:
            mlflow.log_metrics(logs, step=epoch, synchronous=True, model_id=self.model_id)
        return None


class AtomicModelCheckpoint(keras.callbacks.ModelCheckpoint):
    """Keras' best-only checkpoint, written under a temporary name and renamed into place.

    A process killed while Keras writes the file leaves the previous best checkpoint intact
    (and a `.partial.keras` file), never a half-written `best.keras`.
    """

    def __init__(self, filepath: str | Path, **kwargs: Any) -> None:
        self.final_path = Path(filepath)
        super().__init__(self.final_path.with_suffix(".partial.keras"), **kwargs)

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        written = Path(self.filepath)
        try:
            if epoch >= 1 and fires("disk_full"):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(written))
            super().on_epoch_end(epoch, logs)
        except OSError as error:
            if error.errno != errno.ENOSPC:
                raise
            written.unlink(missing_ok=True)
            kept = (f"the previous best checkpoint {self.final_path} is intact"
                    if self.final_path.exists() else "no earlier checkpoint exists")
            raise OSError(errno.ENOSPC, f"no space left on the device writing the checkpoint "
                          f"{written}; {kept}; free space in the output folder") from error
        if written.exists():
            fault_point("checkpoint_write")
            os.replace(written, self.final_path)


class ReportToPruner(keras.callbacks.Callback):
    """Reports `monitor` to the sweep's trial every epoch; asks the pruner only where more
    epochs follow.

    optuna_integration's KerasPruningCallback asks after every epoch, the last included: the
    default Hyperband sweep pruned trials after their 10th and last epoch, throwing away
    fully trained models. Here an epoch after which training ends anyway (the last of
    `epochs`, or one where an earlier callback such as EarlyStopping set
    `model.stop_training`) is still reported (other trials' pruners compare against it),
    and the trial then completes and is evaluated. Append it after EarlyStopping.
    """

    def __init__(self, trial: SweepTrial, monitor: str) -> None:
        super().__init__()
        self.trial = trial
        self.monitor = monitor

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        value = (logs or {}).get(self.monitor)
        if value is None:
            warnings.warn(f"the pruning metric '{self.monitor}' is not in the epoch logs; "
                          "nothing was reported to the pruner", stacklevel=2)
            return
        self.trial.report(float(value), epoch)
        if not self.more_epochs_follow(epoch):
            return
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"Trial was pruned at epoch {epoch}.")

    def more_epochs_follow(self, epoch: int) -> bool:
        """Whether `model.fit` trains another epoch after `epoch` (0-based)."""
        if getattr(self.model, "stop_training", False):  # EarlyStopping, TerminateOnNaN
            return False
        epochs = (self.params or {}).get("epochs")
        return epochs is None or epoch + 1 < int(epochs)


class FaultInEpoch(keras.callbacks.Callback):
    """Fault tests only (search.faults): reach the mid-training points deterministically,
    in epoch ``XRAY_FAULT_EPOCH`` (0-based; default 1, the second epoch)."""

    def __init__(self) -> None:
        super().__init__()
        self.epoch = 0
        self.at = fault_epoch()

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self.epoch = epoch
        if epoch == self.at:
            pause_point("tracking_outage")

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        if self.epoch == self.at and batch == 1:
            fault_point("mid_epoch")
            signal_point("preempt")


class TrainingDiverged(FloatingPointError):
    """Training ran away: a finite but exploding loss."""


def check_divergence(losses: list[float], factor: float, n_classes: int) -> None:
    """Refuse a run whose training loss rose past `factor` times a uniform guess's loss.

    A learning rate of 1e3 gives a finite loss of ~1e22 and a model that predicts one class;
    without this check it would be reported as a normal run. The bound is `factor` times
    ln(n_classes), the loss of a uniform guess (0.69 for two classes): Keras' clipped
    cross-entropy stays below ~16 even with class weights, so only exploding weights get
    there, often within the first epoch. `factor` 0 = off.
    """
    if factor <= 0 or not losses:
        return
    bound = factor * math.log(max(n_classes, 2))
    worst = max(losses)
    if worst > bound:
        epoch = losses.index(worst) + 1
        raise TrainingDiverged(
            f"training diverged: loss reached {worst:.4g} at epoch {epoch}, above "
            f"trainer.divergence_factor={factor:g} x ln({max(n_classes, 2)}) = {bound:.3g}; "
            "lower optimizer.learning_rate or enable a clipnorm "
            "(optimizer.clipnorm=1.0)"
        )
