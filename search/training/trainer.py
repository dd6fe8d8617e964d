"""Train one model from a composed config: data → model → fit → evaluate → track.

`train(cfg)` is what `search/run.py` runs for every job, single run or sweep trial. It returns
the configured objective so a Hydra sweeper can optimise it.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import tempfile
from pathlib import Path
from typing import Any

import keras
import mlflow
import numpy as np
import optuna
import tensorflow as tf
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from models.fused_batch_norm import fuse_batch_norm
from models.precision import as_float32, dtype_policy, resolve_precision
from search import sweep_context
from search.config_checks import (
    check_run_config,
    check_task_metrics,
    check_threshold_rule,
    pruning_metric,
)
from search.evaluation import metrics as ev
from search.evaluation.evaluate_run import (  # noqa: F401 - evaluate_and_log re-exported
    NOT_LOGGED,
    bootstrap_spec,
    evaluate_and_log,
    external_sets,
    log_figure,
)
from search.evaluation.keras_metrics import multiclass_metrics
from search.faults import armed, fault_point, memory_fault
from search.quiet_start import quiet_native_start
from search.tracking import descriptions, mlflow_runs, run_names
from search.tracking.model_logging import config_hash, log_keras_model
from search.training import resume
from search.training.keras_callbacks import (
    AtomicModelCheckpoint,
    EpochMetricsToMlflow,
    FaultInEpoch,
    LearningRateLogger,
    check_divergence,
)

log = logging.getLogger(__name__)



def configure_runtime(seed: int, deterministic: bool, threads: int | None) -> None:
    """Seed Python/NumPy/TF, size TF's thread pools and let GPUs allocate memory lazily."""
    threads = threads or sweep_context.thread_budget()
    if threads:
        # Must precede TF's first op; raises once the runtime is initialised (then keep as is).
        try:
            tf.config.threading.set_intra_op_parallelism_threads(threads)
            tf.config.threading.set_inter_op_parallelism_threads(max(1, min(2, threads)))
        except RuntimeError:
            log.debug("TF runtime already initialised; thread pools unchanged")
    with quiet_native_start():  # the first device query: cuInit's line on a CPU machine
        gpus = tf.config.list_physical_devices("GPU")
    for gpu in gpus:
        with contextlib.suppress(RuntimeError):
            tf.config.experimental.set_memory_growth(gpu, True)
    keras.utils.set_random_seed(seed)
    if deterministic:
        tf.config.experimental.enable_op_determinism()


def compile_model(model: keras.Model, optimizer: keras.optimizers.Optimizer | str, binary: bool,
                  class_names: list[str] | None = None) -> None:
    """Loss and per-epoch indicator metrics matching the output head.

    K classes: accuracy, `auc` (one-vs-rest, macro) and `recall_<class>` for every class,
    as the binary head has precision/recall/auc.
    """
    if binary:
        loss = "binary_crossentropy"
        metrics = [
            keras.metrics.BinaryAccuracy(name="accuracy"),
            keras.metrics.Precision(name="precision"),
            keras.metrics.Recall(name="recall"),
            keras.metrics.AUC(name="auc"),
        ]
    else:
        loss = "sparse_categorical_crossentropy"
        k = int(model.output_shape[-1])
        metrics = multiclass_metrics(list(class_names or [f"class_{i}" for i in range(k)]))
    model.compile(optimizer=optimizer, loss=loss, metrics=metrics)


def check_label_smoothing(value: Any, n_classes: int) -> float:
    """`trainer.label_smoothing` as a float in [0, 1); K classes refuse a non-zero value."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value < 1.0:
        raise ValueError(f"trainer.label_smoothing={value!r} is not valid; allowed: "
                         "a number in [0, 1) (0 = off)")
    if value and n_classes > 2:
        # K-class labels are class indices for sparse_categorical_crossentropy, which has no
        # label smoothing in Keras (only the one-hot CategoricalCrossentropy has).
        raise ValueError(
            f"trainer.label_smoothing={value} works with two classes only: the "
            f"{n_classes}-class sparse_categorical_crossentropy has no label smoothing in "
            "Keras; set trainer.label_smoothing=0")
    return float(value)


def smooth_labels(dataset: tf.data.Dataset, eps: float) -> tf.data.Dataset:
    """Train targets pulled to eps/2 and 1 - eps/2, as Keras' `BinaryCrossentropy(
    label_smoothing=eps)` does, but in the train batches only: the loss object would smooth
    val too, and val_loss (objective, pruning, early stopping) must stay comparable across
    trials with and without smoothing."""
    if not eps:
        return dataset
    return dataset.map(lambda x, y: (x, y * (1.0 - eps) + 0.5 * eps),
                       num_parallel_calls=tf.data.AUTOTUNE)


def output_directory() -> Path:
    """Hydra's job output folder, or a temporary one when called outside Hydra."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return Path(HydraConfig.get().runtime.output_dir)
    except ValueError:
        return Path(tempfile.mkdtemp(prefix="xray-run-"))


def run_tags(cfg: DictConfig, info: dict[str, Any] | None) -> dict[str, str]:
    """Tags that let the MLflow UI filter and group runs."""
    tags = {"model.builder": str(cfg.model.get("_target_", "?")).rsplit(".", 1)[-1]}
    tags.update({str(k): str(v) for k, v in (cfg.tracking.get("tags") or {}).items()})
    if info:
        tags.update({
            "optuna.study": str(info["study"]),
            "optuna.trial_number": str(info["trial_number"]),
            "optuna.sampler": str(info["sampler"]),
            "optuna.pruner": str(info["pruner"]),
            "optuna.trial_state": "RUNNING",
        })
    return tags


def train(cfg: DictConfig, output_dir: Path | None = None) -> float | list[float]:
    """Train and evaluate one model; track everything in MLflow.

    Returns:
        The objective value (a list for several objectives), from the best checkpoint's
        evaluation on the validation split.
    """
    objectives = check_run_config(cfg)  # before any data is loaded
    bootstrap_spec(cfg)
    mlflow_runs.setup_tracking(cfg.tracking)  # an unusable store fails now, not after training
    output_dir = Path(output_dir) if output_dir else output_directory()
    output_dir.mkdir(parents=True, exist_ok=True)
    # trainer.seed: weights and dropout only; the data split and its order follow `seed`.
    train_seed = int(cfg.trainer.get("seed") if cfg.trainer.get("seed") is not None
                     else cfg.seed)
    configure_runtime(train_seed, bool(cfg.trainer.deterministic), cfg.trainer.threads)

    log.info("Loading data (%s)", cfg.data.source)
    fault_point("data_loading")
    data = instantiate(cfg.data, seed=int(cfg.seed), _convert_="all")
    n_classes = len(data.class_names)
    binary = n_classes == 2
    check_threshold_rule(cfg, list(data.class_names))  # before any training
    check_task_metrics(cfg, list(data.class_names))
    sets = external_sets(cfg, list(data.class_names))  # bad paths or labels fail before training
    if sets:
        loaded = sets.at(data.preprocessing["image_size"], data.preprocessing["channels"])
        log.info("External sets (scored, never used for selection): %s",
                 ", ".join(f"{s.spec.name} ({len(s.y)} images)" for s in loaded))
    log.info(
        "Data: %d train / %d val / %d test, classes %s, input %s, fingerprint %s",
        data.n_train, data.n_val, data.n_test, data.class_names, data.input_shape,
        data.fingerprint[:12],
    )

    keras.backend.clear_session()  # a sweep worker may train several models in one process
    # Re-seed after data building so weight init does not depend on how much RNG it used.
    keras.utils.set_random_seed(train_seed)
    build = functools.partial(instantiate, cfg.model, input_shape=tuple(data.input_shape),
                              num_classes=n_classes)
    has_gpu = bool(tf.config.list_logical_devices("GPU"))
    precision = resolve_precision(str(cfg.trainer.get("precision") or "float32"), has_gpu,
                                  int(data.input_shape[0]))
    with dtype_policy(precision):
        model = build()
    fuse_batch_norm(model)  # the same maths in one kernel: models/fused_batch_norm.py
    schedule = instantiate(
        cfg.lr_schedule,
        initial_learning_rate=float(cfg.optimizer.learning_rate),
        steps_per_epoch=int(data.steps_per_epoch),
        epochs=int(cfg.trainer.get("schedule_epochs") or cfg.trainer.max_epochs),
    )
    optimizer = instantiate(cfg.optimizer, learning_rate=schedule.learning_rate)
    compile_model(model, optimizer, binary, list(data.class_names))
    smoothing = check_label_smoothing(cfg.trainer.get("label_smoothing") or 0.0, n_classes)
    init_weights = cfg.trainer.get("init_weights")
    first_epoch = initial_epoch = int(cfg.trainer.get("initial_epoch") or 0)
    if init_weights:  # weights only, as keras-tuner continues a model: a fresh optimizer
        model.set_weights(keras.models.load_model(
            str(init_weights), safe_mode=True, compile=False).get_weights())
        log.info("Starting from %s at epoch %d", init_weights, initial_epoch)

    trial = sweep_context.current_trial()
    info = trial.info if trial is not None else None
    # A retried trial continues from its last resumable state (search/training/resume.py).
    plan = resume.plan_for_trial(trial, output_dir, config_hash(cfg))
    point = plan.point if plan is not None else None
    parent = sweep_context.parent_run_id()
    run_name = run_names.initial_name(cfg, info["trial_number"] if info else None)
    tags = {**run_tags(cfg, info), **mlflow_runs.process_tags(), "precision": precision,
            **(trial.engine_tags() if trial is not None else {})}
    run = mlflow.start_run(run_name=run_name, parent_run_id=parent,
                           tags={**tags, **resume.run_tags(point)})
    if point is not None:
        initial_epoch = point.epoch
        log.info("Resuming after epoch %d of %d in MLflow run %s", point.epoch,
                 int(cfg.trainer.max_epochs), run.info.run_id)
        if trial is not None:
            trial.trial.set_user_attr("resumed_from_epoch", point.epoch)
    log.info("MLflow run %s (%s)", run.info.run_id, mlflow.get_tracking_uri())
    if trial is not None:  # optuna-dashboard shows user attrs: the trial links to its run
        trial.trial.set_user_attr("mlflow_run_id", run.info.run_id)
        url = mlflow_runs.run_url(run.info.experiment_id, run.info.run_id)
        if url:
            trial.trial.set_user_attr("mlflow_run_url", url)
    status, state, values, epochs_run = "FAILED", "FAIL", None, None
    resumable: resume.ResumableState | None = None
    try:
        mlflow_runs.log_run_context(cfg)
        mlflow.log_params({
            "data.fingerprint": data.fingerprint,
            "data.n_train": data.n_train,
            "data.n_val": data.n_val,
            "data.n_test": data.n_test,
            "model.n_params": model.count_params(),
            "config_hash": config_hash(cfg),
        })
        mlflow.log_dict(data.source_info, "data/source_info.json")
        describe = functools.partial(
            descriptions.run_description, list(data.class_names), data.source_info,
            tuple(data.input_shape), data.fingerprint,
            threshold_rule=str(cfg.evaluation.threshold_rule))
        mlflow.set_tag("mlflow.note.content", describe())

        checkpoint = output_dir / "checkpoints" / "best.keras"
        checkpoint.parent.mkdir(parents=True, exist_ok=True)
        monitor = str(cfg.trainer.monitor)
        stateful: list[keras.callbacks.Callback] = [
            keras.callbacks.EarlyStopping(
                monitor=monitor, patience=int(cfg.trainer.patience),
                min_delta=float(cfg.trainer.min_delta), restore_best_weights=True,
            ),
            AtomicModelCheckpoint(checkpoint, monitor=monitor, save_best_only=True),
            *schedule.callbacks,
        ]
        if plan is not None:  # after the callbacks it keeps, before those that report
            resumable = resume.ResumableState(
                plan, stateful, checkpoint, int(data.steps_per_epoch),
                int(cfg.trainer.max_epochs), {"run_id": run.info.run_id,
                                              "config_hash": config_hash(cfg)})
        callbacks: list[keras.callbacks.Callback] = [
            keras.callbacks.TerminateOnNaN(), *stateful, LearningRateLogger(),
            *([resumable] if resumable is not None else []), EpochMetricsToMlflow(),
        ]
        if armed("mid_epoch") or armed("tracking_outage") or armed("preempt"):
            callbacks.append(FaultInEpoch())
        prune_on = pruning_metric(cfg) if trial is not None else None
        if prune_on is not None:
            from optuna_integration import KerasPruningCallback

            if prune_on != monitor:
                log.info("pruning on %s (trainer.monitor=%s runs against objective=%s)",
                         prune_on, monitor, cfg.objective)
            callbacks.append(KerasPruningCallback(trial.trial, prune_on))
        if point is not None:  # the epochs trained before, each reported once
            resume.carry_over(point, checkpoint, run.info.run_id,
                              trial if prune_on is not None else None, prune_on, first_epoch)

        try:
            memory_fault()
            model.fit(
                resume.resume_data(smooth_labels(data.train, smoothing), plan, first_epoch,
                                   int(data.steps_per_epoch)),
                steps_per_epoch=int(data.steps_per_epoch),
                # a state saved after early stopping: no epoch left, on_train_end restores
                epochs=initial_epoch if point is not None and point.meta.get("stopped")
                else int(cfg.trainer.max_epochs),
                initial_epoch=initial_epoch,
                validation_data=data.val,
                shuffle=False,  # the tf.data pipeline shuffles (seeded); Keras would warn
                class_weight=data.class_weight,
                callbacks=callbacks,
                verbose=int(cfg.trainer.verbose),
            )
        except optuna.TrialPruned:  # a normal end, not a failure: FINISHED, tagged PRUNED
            state, status = "PRUNED", "FINISHED"
            if resumable is not None:  # it records each epoch before the pruner decides
                epochs_run = len(resumable.history.get("loss", []))
                log_curves(resumable.history)
            else:  # the pruner stops in on_epoch_end, before Keras' History records it
                epochs_run = len(model.history.history.get("loss", [])) + 1
                log_curves(model.history.history)
            raise
        except MemoryError as error:
            raise MemoryError(
                f"out of memory while training ({error or 'an allocation failed'}); lower "
                "data.batch_size, data.image_size or the model's size (model.base_filters, "
                "model.dense_units), or run fewer hydra.sweeper.n_jobs"
            ) from error
        history = resume.merged_history(resumable, model.history.history)
        log_curves(history)
        losses = history.get("loss", [])
        if not losses or any(not math.isfinite(v) for v in losses):
            bad = next((i for i, v in enumerate(losses) if not math.isfinite(v)), 0)
            raise FloatingPointError(
                f"training loss became NaN/inf at epoch {bad + 1}; lower "
                "optimizer.learning_rate or enable a clipnorm (optimizer.clipnorm=1.0)"
            )
        if not checkpoint.exists():
            raise FloatingPointError(f"no finite {monitor} was seen, so no checkpoint was saved")
        check_divergence(losses, float(cfg.trainer.get("divergence_factor") or 0), n_classes)
        # Without its training metrics: evaluation needs only the loss, and the logged model
        # then loads anywhere without this package's metric classes.
        best = keras.models.load_model(checkpoint, safe_mode=True, compile=False)
        best = as_float32(best)  # evaluated, logged and served in float32
        best.compile(loss=model.loss)
        results = evaluate_and_log(cfg, best, data, binary)
        mlflow.set_tag("mlflow.note.content", describe(results))
        results["n_params"] = float(best.count_params())
        results["epochs_trained"] = float(len(losses))
        results["best_epoch"] = float(first_epoch + (int(np.argmin(history[monitor])) + 1
                                                       if monitor in history else len(losses)))
        mlflow.log_metrics({k: results[k] for k in ("epochs_trained", "best_epoch")})
        if cfg.tracking.get("log_model", True):
            try:
                log_keras_model(cfg, best, data, results)
            except Exception as error:
                raise RuntimeError(
                    f"logging the model to MLflow failed ({type(error).__name__}: {error}); "
                    f"the trained best checkpoint is kept at {checkpoint}"
                ) from error
        (output_dir / "metrics.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(results)))
        missing = [name for name in objectives if name not in results]
        if missing:  # a run whose objective cannot be read is not FINISHED
            raise KeyError(f"objective {missing} not among the evaluated metrics: "
                           f"{sorted(results)}")
        values = [float(results[name]) for name in objectives]
        bad = [n for n, v in zip(objectives, values, strict=True) if not math.isfinite(v)]
        if bad:  # a NaN told to the sampler would rank as nothing; fail with the reason
            raise FloatingPointError(
                f"objective {bad} is not finite on the val split (e.g. ROC AUC needs both "
                f"classes in val: n_val={data.n_val}); choose another objective, or more data")
        # One stable name for the value the sweeper optimises, whatever `objective` is.
        mlflow.log_metrics({"objective" if len(values) == 1 else f"objective_{i}": v
                            for i, v in enumerate(values) if math.isfinite(v)})
        status, state = "FINISHED", "COMPLETE"
    except (KeyboardInterrupt, sweep_context.TrialInterrupted):
        status, state = "KILLED", "INTERRUPTED"  # the retry resumes from the saved state
        raise
    finally:
        if status != "KILLED":  # ended for good: its resumable state is not needed
            resume.remove_state(plan)
        # No flush here: end_run drains MLflow's async queue itself, and each drain waits for
        # its logging thread's 1 s poll to lapse (benchmarks/trial_overhead.py measures it).
        if info:
            mlflow.set_tag("optuna.trial_state", state)
        if not cfg.tracking.get("run_name"):  # a name the user gave stays as given
            try:  # the name says how it ended; never let a rename hide the trial's outcome
                mlflow.MlflowClient().update_run(run.info.run_id, name=run_names.final_name(
                    run_name, state, objectives[0], values[0] if values else None, epochs_run))
            except Exception:  # noqa: BLE001
                log.warning("could not rename run %s", run.info.run_id, exc_info=True)
        mlflow.end_run(status=status)

    log.info("Objective %s = %s", objectives, values)
    return values[0] if len(values) == 1 else values


def log_curves(history: dict[str, list[float]]) -> None:
    """The loss/accuracy curve figure (also for pruned or stopped trials)."""
    if history.get("loss"):
        log_figure(ev.history_figure(history), "curves/loss_accuracy.png")
