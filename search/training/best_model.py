"""After the fit: the best checkpoint evaluated and logged, and the objective read from it."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import keras
import mlflow
import numpy as np
from omegaconf import DictConfig, OmegaConf

from models.precision import as_float32
from search import sweep_context
from search.evaluation.evaluate_run import Figures, evaluate_and_log
from search.evaluation.evaluation_settings import DEFAULTS
from search.tracking import tags as tag_keys
from search.tracking.model_logging import log_keras_model
from search.training.fit import FitResult, log_curves
from search.training.model_setup import BuiltModel
from search.training.run_plan import RunPlan

# train()'s own logger: its lines keep the name the terminal and the sweep's console show.
log = logging.getLogger("search.training.trainer")


def evaluate_best(cfg: DictConfig, plan: RunPlan, data: Any, built: BuiltModel,
                  fitted: FitResult, describe: Callable[..., str],
                  hashed: str) -> dict[str, float]:
    """Evaluate the best checkpoint, log it as the run's model and write `metrics.yaml`
    (`hashed`: the run's `config_hash`, computed once when the run started).

    Returns:
        The evaluated metrics, with `n_params`, `epochs_trained` and `best_epoch`.
    """
    # Without its training metrics: evaluation needs only the loss, and the logged model
    # then loads anywhere without this package's metric classes.
    best = keras.models.load_model(fitted.checkpoint, safe_mode=True, compile=False)
    best = as_float32(best)  # evaluated, logged and served in float32
    best.compile(loss=built.model.loss)
    figures = Figures()
    results = evaluate_and_log(cfg, best, data, built.binary, figures)
    render_figures(cfg, plan.objectives, results, figures, fitted.history)
    mlflow.set_tag(tag_keys.MLFLOW_NOTE, describe(results))
    history, losses, monitor = fitted.history, fitted.losses, plan.monitor
    results["n_params"] = float(best.count_params())
    results["epochs_trained"] = float(len(losses))
    results["best_epoch"] = float(plan.initial_epoch + (int(np.argmin(history[monitor])) + 1
                                                        if monitor in history else len(losses)))
    mlflow.log_metrics({k: results[k] for k in ("epochs_trained", "best_epoch")})
    if cfg.tracking.get("log_model", True):
        try:
            log_keras_model(cfg, best, data, results, hashed=hashed)
        except Exception as error:
            raise RuntimeError(
                f"logging the model to MLflow failed ({type(error).__name__}: {error}); "
                f"the trained best checkpoint is kept at {fitted.checkpoint}"
            ) from error
    (plan.output_dir / "metrics.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(results)))
    return results


def figures_top_k(cfg: DictConfig) -> int | None:
    """`evaluation.figures_top_k`, raised to the sweep's other top k (ensemble members and
    final-stage trials keep their figures whatever it says); None: every trial renders."""
    k = OmegaConf.select(cfg, "evaluation.figures_top_k", default=DEFAULTS.figures_top_k)
    if k is None:
        return None
    others = [OmegaConf.select(cfg, key) for key in ("registry.ensemble.top_k",
                                                     "registry.final_stage.top_k")]
    return max([int(k)] + [int(v) for v in others if v is not None])


def figures_skipped(cfg: DictConfig, objectives: list[str],
                    results: dict[str, float]) -> str | None:
    """Why a sweep trial's figures are not rendered, or None to render them.

    A trial renders when fewer than k distinct COMPLETE trials of its study beat it as it
    ends (its running top k): every trial of the sweep's final top k (registry candidates,
    ensemble members) did, since only trials ended before it could beat it then. A single
    run, or a trial whose objective is unreadable (it fails next, with its reason), renders."""
    trial, k = sweep_context.current_trial(), figures_top_k(cfg)
    if trial is None or k is None or any(name not in results for name in objectives):
        return None
    values = objective_values(objectives, results)
    if not all(math.isfinite(v) for v in values):
        return None
    try:
        beaten = trial.beaten_by(values)
    except Exception as error:  # the study unreadable now: render, as before this choice
        log.warning("figures rendered: the study's trials could not be read (%s)",
                    sweep_context.error_text(error))
        return None
    if beaten < k:
        return None
    return (f"{beaten} distinct COMPLETE trial(s) of study {trial.study} were better when "
            f"trial {trial.number} ended: outside the running top {k} "
            "(evaluation.figures_top_k), so no confusion, ROC/PR, calibration or curve PNGs; "
            "its metrics, per-epoch series and JSON artifacts are all logged")


def render_figures(cfg: DictConfig, objectives: list[str], results: dict[str, float],
                   figures: Figures, history: dict[str, list[float]]) -> None:
    """Render the evaluation's figures and the curve, or tag the run with why not."""
    reason = figures_skipped(cfg, objectives, results)
    if reason is not None:
        mlflow.set_tag(tag_keys.FIGURES_SKIPPED, reason)
        log.info("figures not rendered: %s", reason)
        return
    figures.render()
    log_curves(history)


def objective_values(objectives: list[str], results: dict[str, float]) -> list[float]:
    """The objective values among `results` (a run whose objective cannot be read fails)."""
    missing = [name for name in objectives if name not in results]
    if missing:  # a run whose objective cannot be read is not FINISHED
        raise KeyError(f"objective {missing} not among the evaluated metrics: "
                       f"{sorted(results)}")
    return [float(results[name]) for name in objectives]


def record_objective(objectives: list[str], values: list[float], n_val: int) -> None:
    """Refuse a non-finite objective, else log it under one stable name."""
    bad = [n for n, v in zip(objectives, values, strict=True) if not math.isfinite(v)]
    if bad:  # a NaN told to the sampler would rank as nothing; fail with the reason
        raise FloatingPointError(
            f"objective {bad} is not finite on the val split (e.g. ROC AUC needs both "
            f"classes in val: n_val={n_val}); choose another objective, or more data")
    # One stable name for the value the sweeper optimises, whatever `objective` is.
    mlflow.log_metrics({"objective" if len(values) == 1 else f"objective_{i}": v
                        for i, v in enumerate(values) if math.isfinite(v)})
