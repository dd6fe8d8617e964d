"""Train one model from a composed config: data → model → fit → evaluate → track.

`train(cfg)` is what `search/run.py` runs for every job, single run or sweep trial. It returns
the configured objective so a Hydra sweeper can optimise it. Its stages live beside it: the
run's plan (`run_plan`), the model (`model_setup`), the MLflow run's lifecycle (`lifecycle`),
the fit and its callbacks (`fit`), and the best checkpoint's evaluation (`best_model`).
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from pathlib import Path
from typing import Any

import keras
import tensorflow as tf
from hydra.utils import instantiate
from omegaconf import DictConfig

from search import sweep_context
from search.config_checks import (
    check_run_config,
    check_task_metrics,
    check_threshold_rule,
    check_val_split,
)
from search.evaluation.evaluate_run import bootstrap_spec, evaluate_and_log, external_sets
from search.faults import fault_point
from search.quiet_start import quiet_native_start
from search.tracking import mlflow_runs
from search.tracking.model_logging import config_hash, log_keras_model
from search.training import feature_cache, lifecycle
from search.training.best_model import evaluate_best, objective_values, record_objective
from search.training.fit import fit_model, log_curves, smooth_labels
from search.training.lifecycle import run_tags
from search.training.model_setup import build_model, check_label_smoothing, compile_model
from search.training.run_plan import RunPlan, plan_run

# Imported from here by tests, benchmarks and the dry run (search/training/preflight.py).
__all__ = [
    "bootstrap_spec", "check_label_smoothing", "compile_model", "config_hash",
    "configure_runtime", "evaluate_and_log", "load_data", "log_curves", "log_keras_model",
    "output_directory", "prepare_run", "run_tags", "smooth_labels", "train",
]

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


def output_directory() -> Path:
    """Hydra's job output folder, or a temporary one when called outside Hydra."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return Path(HydraConfig.get().runtime.output_dir)
    except ValueError:
        return Path(tempfile.mkdtemp(prefix="xray-run-"))


def prepare_run(cfg: DictConfig, output_dir: Path | None) -> RunPlan:
    """Check the config and the tracking store, then plan the run and set up TF's runtime."""
    objectives = check_run_config(cfg)  # before any data is loaded
    bootstrap_spec(cfg)
    mlflow_runs.setup_tracking(cfg.tracking)  # an unusable store fails now, not after training
    output_dir = Path(output_dir) if output_dir else output_directory()
    output_dir.mkdir(parents=True, exist_ok=True)
    plan = plan_run(cfg, objectives, output_dir)
    configure_runtime(plan.train_seed, plan.deterministic, plan.threads)
    return plan


def load_data(cfg: DictConfig, plan: RunPlan) -> Any:
    """Build the data splits; the checks that need the class names fail before training."""
    log.info("Loading data (%s)", cfg.data.source)
    fault_point("data_loading")
    data = instantiate(cfg.data, seed=plan.data_seed, _convert_="all")
    check_threshold_rule(cfg, list(data.class_names))  # before any training
    check_task_metrics(cfg, list(data.class_names))
    check_val_split(cfg, data)  # what evaluation fits on val (threshold, calibration)
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
    return data


def train(cfg: DictConfig, output_dir: Path | None = None) -> float | list[float]:
    """Train and evaluate one model; track everything in MLflow.

    Returns:
        The objective value (a list for several objectives), from the best checkpoint's
        evaluation on the validation split.
    """
    plan = prepare_run(cfg, output_dir)
    data = load_data(cfg, plan)
    built = build_model(cfg, data, plan)
    with lifecycle.tracked_run(cfg, plan, built.precision) as tracked:
        describe = lifecycle.log_run_inputs(cfg, tracked, data, built.model)
        fit_on = feature_cache.route(cfg, plan, data, built)  # a frozen backbone: its features
        with fit_on.assembled(lifecycle.best_checkpoint(plan)):  # the full image model after
            fitted = fit_model(cfg, plan, fit_on.data, fit_on.built, tracked)
        results = evaluate_best(cfg, plan, data, built, fitted, describe,
                                tracked.config_hash)
        tracked.values = objective_values(plan.objectives, results)
        record_objective(plan.objectives, tracked.values, data.n_val)
    values = tracked.values
    log.info("Objective %s = %s", plan.objectives, values)
    return values[0] if len(values) == 1 else values
