"""`registry.ensemble.top_k`: the sweep's k best distinct trials as one registered model.

At the end of a sweep (after its best trial was registered), the k COMPLETE trials with the
best objective and distinct configs (`config_hash`) are loaded from their logged models and
averaged (`models.ensemble.build_ensemble`). The ensemble gets its own MLflow run under the
sweep's parent, evaluated exactly like a trial
(`search.evaluation.evaluate_run.evaluate_and_log`: threshold chosen on val, held-out test and
external sets with intervals), logged as an MLflow Keras model, registered as its own version
and put through the same champion gate. Its gain over the best single trial, on the same
held-out images, is logged on the parent run.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
from pathlib import Path
from typing import Any

import mlflow
from hydra.utils import instantiate
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf

from search import sweep_context
from search.model_registry import model_store
from search.model_registry.champion import GateSpec
from search.model_registry.registration import (
    register_and_promote,
    registry_floor,
    registry_options,
    run_config,
    run_model_metadata,
)
from search.model_registry.registry_settings import DEFAULTS
from search.tracking import descriptions, mlflow_runs
from search.tracking import tags as tag_keys

log = logging.getLogger(__name__)


def ensemble_top_k(config: DictConfig | dict | None) -> int:
    """`registry.ensemble.top_k` (0 or 1: no ensemble)."""
    value = OmegaConf.select(OmegaConf.create(config or {}), "registry.ensemble.top_k")
    k = int(DEFAULTS.ensemble.top_k if value is None else value)  # absent or null: default
    if k < 0:
        raise ValueError(f"registry.ensemble.top_k={k} must be >= 0 (0 = no ensemble)")
    return k


def top_runs(client: MlflowClient, parent_run_id: str, k: int, maximize: bool) -> list[Any]:
    """The k best COMPLETE trial runs of a sweep with a logged model, one per config."""
    parent = client.get_run(parent_run_id)
    runs = client.search_runs(
        [parent.info.experiment_id],
        f"tags.{tag_keys.PARENT_RUN_ID} = '{parent_run_id}' and attributes.status = 'FINISHED'",
        max_results=5000,
    )
    runs = [r for r in runs if r.data.tags.get(tag_keys.OPTUNA_TRIAL_STATE) == "COMPLETE"
            and r.data.tags.get(tag_keys.BEST_MODEL_URI) and "objective" in r.data.metrics]
    runs.sort(key=lambda r: r.data.metrics["objective"], reverse=maximize)
    chosen, seen = [], set()
    for run in runs:
        key = run.data.params.get("config_hash") or run.info.run_id
        if key not in seen:  # a repeated config is the same model again, not a second opinion
            seen.add(key)
            chosen.append(run)
        if len(chosen) == k:
            break
    return chosen


def _check_compatible(metadata: list[dict[str, Any]]) -> None:
    for field in ("class_names", "preprocessing", "data_fingerprint"):
        values = {repr(m.get(field)) for m in metadata}
        if len(values) > 1:
            raise ValueError(f"the top trials differ in {field} ({sorted(values)}): an ensemble "
                             "needs one task, one input and one data split")


def build_ensemble_run(config: DictConfig, parent_run_id: str, k: int) -> str | None:
    """Build, evaluate and log the ensemble of the sweep's top-k trials; its run id, or None
    when fewer than two distinct COMPLETE trials logged a model."""
    # inside: Keras and TensorFlow (which these import) load only when an ensemble is built;
    # the sweeper process imports this module at start-up and otherwise never loads them
    import keras

    from models.ensemble import build_ensemble
    from search.evaluation.evaluate_run import evaluate_and_log
    from search.tracking.model_logging import log_keras_model

    client = MlflowClient()
    runs = _members_or_none(client, config, parent_run_id, k)
    if runs is None:
        return None
    ids = [r.info.run_id for r in runs]
    metadata = [run_model_metadata(client, run_id) for run_id in ids]
    _check_compatible(metadata)
    cfg = run_config(client, ids[0])  # the best member's: same data, split and evaluation
    log.info("Ensemble of the top %d trials (%s)", len(runs),
             ", ".join(f"trial {r.data.tags.get(tag_keys.OPTUNA_TRIAL_NUMBER)}" for r in runs))
    data = instantiate(cfg.data, seed=int(cfg.seed), _convert_="all")
    binary = len(data.class_names) == 2
    members = _load_members(runs)
    keras.utils.set_random_seed(int(cfg.seed))
    model = build_ensemble(members, name=f"ensemble_top{len(members)}")
    model.compile(loss="binary_crossentropy" if binary else "sparse_categorical_crossentropy")
    members_hash = hashlib.sha256(" ".join(m.get("config_hash") or "" for m in metadata)
                                  .encode()).hexdigest()[:16]
    study = runs[0].data.tags.get(tag_keys.OPTUNA_STUDY, "sweep")
    params = {k_: v for k_, v in runs[0].data.params.items()
              if k_ == "data" or k_.startswith("data.") or k_ in ("seed",)}
    with mlflow.start_run(run_name=f"ensemble · top {len(ids)} of {study}",
                          parent_run_id=parent_run_id, nested=True,  # the sweep's is active
                          experiment_id=client.get_run(parent_run_id).info.experiment_id,
                          tags=_run_tags(runs)) as run:
        mlflow_runs.log_run_context(cfg, params={**params, tag_keys.ENSEMBLE_K: len(ids),
                                              "model.n_params": model.count_params(),
                                              "config_hash": members_hash})
        results = evaluate_and_log(cfg, model, data, binary)
        calibrated = all(m.get("calibration") for m in metadata)
        log_keras_model(cfg, model, data, results, extra_metadata={
            "config_hash": members_hash, "ensemble_members": ids,
            "calibration": {"method": "members"} if calibrated else None})
        mlflow.set_tag(tag_keys.MLFLOW_NOTE, descriptions.run_description(
            list(data.class_names), data.source_info, tuple(data.input_shape), data.fingerprint,
            results, threshold_rule=str(cfg.evaluation.threshold_rule))
            + f"\n\n**Ensemble** of runs {', '.join(f'`{i}`' for i in ids)} (averaged "
              "probabilities).")
    return run.info.run_id


def _members_or_none(client: MlflowClient, config: DictConfig, parent_run_id: str,
                     k: int) -> list[Any] | None:
    """The ensemble's member runs; None (with an `ensemble.skipped` tag on the parent) when
    fewer than two distinct COMPLETE trials logged a model."""
    runs = top_runs(client, parent_run_id, k, sweep_context.maximizes(config))
    if len(runs) < 2:
        reason = f"registry.ensemble.top_k={k}: only {len(runs)} distinct COMPLETE trial(s)"
        log.info("no ensemble: %s", reason)
        client.set_tag(parent_run_id, tag_keys.ENSEMBLE_SKIPPED, reason)
        return None
    return runs


def _load_members(runs: list[Any]) -> list[Any]:
    """The members' Keras models, from their runs' logged models."""
    with tempfile.TemporaryDirectory() as tmp:
        members = []
        for i, run in enumerate(runs):
            folder = mlflow.artifacts.download_artifacts(run.data.tags[tag_keys.BEST_MODEL_URI],
                                                         dst_path=str(Path(tmp) / str(i)))
            members.append(model_store.load_keras_safely(folder))
    return members


def _run_tags(runs: list[Any]) -> dict[str, str]:
    """The ensemble run's tags: its members (run ids, trial numbers) and the process."""
    ids = [r.info.run_id for r in runs]
    return {tag_keys.ENSEMBLE_MEMBERS: ",".join(ids), tag_keys.ENSEMBLE_K: str(len(ids)),
            tag_keys.ENSEMBLE_TRIALS: ",".join(r.data.tags.get(tag_keys.OPTUNA_TRIAL_NUMBER, "?")
                                        for r in runs),
            tag_keys.MODEL_BUILDER: "build_ensemble", **mlflow_runs.process_tags()}


def promote_ensemble(config: DictConfig, parent_run_id: str, best_decision: Any) -> Any:
    """Build the ensemble run, register it and put it through the gate; tags on the parent."""
    k = ensemble_top_k(config)
    if k < 2 or not registry_options(config)["enabled"]:
        return None
    options = registry_options(config)
    gate = GateSpec.from_config((config or {}).get("registry"))
    client = MlflowClient()
    try:
        run_id = build_ensemble_run(config, parent_run_id, k)
        if run_id is None:
            return None
        decision = register_and_promote(run_id, model_name=options["model_name"],
                                        metric=options["metric"], parent_run_id=run_id,
                                        tie_break=options["tie_break"], gate=gate,
                                        floor=registry_floor(config))
    except Exception as error:  # noqa: BLE001 - the best trial is registered already
        log.warning("the ensemble failed (%s: %s); the best trial's registration stands",
                    type(error).__name__, error)
        client.set_tag(parent_run_id, tag_keys.ENSEMBLE_ERROR,
                       mlflow_runs.redact_uri(f"{type(error).__name__}: {error}")[:5000])
        return None
    client.set_tag(parent_run_id, tag_keys.ENSEMBLE_RUN_ID, run_id)
    client.set_tag(parent_run_id, tag_keys.ENSEMBLE_VERSION, str(decision.version))
    client.set_tag(parent_run_id, tag_keys.ENSEMBLE_ALIAS, decision.alias)
    client.set_tag(parent_run_id, tag_keys.ENSEMBLE_REASON, decision.reason)
    metric = decision.metric
    new = decision.new_metrics.get(metric)
    best = (best_decision.new_metrics or {}).get(metric) if best_decision else None
    if new is not None:
        client.log_metric(parent_run_id, f"ensemble_{metric}", float(new))
    if new is not None and best is not None:  # the same held-out images, the same metric
        client.log_metric(parent_run_id, f"ensemble_gain_{metric}", float(new) - float(best))
        log.info("ensemble held-out %s %.4f vs best trial %.4f (gain %+.4f)", metric, new, best,
                 new - best)
    return decision
