"""Register a run's model and decide champion or challenger on a fair, held-out comparison.

    python search/registry.py --sweep-run-id PARENT_RUN_ID   # the sweep's best trial
    python search/registry.py --run-id RUN_ID [--name pneumonia-cnn] [--metric roc_auc]

At the end of a sweep `promote_sweep_best` does the same for the best trial. Each call:

1. registers the run's logged model (its `best_model_uri` tag) as a new version of the
   registered model, with class names, preprocessing, threshold, config + hash, data
   fingerprint and run link as version tags (re-running reuses the run's existing version);
2. rebuilds the held-out split from the run's composed config (`data` with its `seed`; the
   config's *test* split, never used for tuning) and scores the new version and the current
   `@champion` on it, each at its own stored decision threshold (scikit-learn metrics);
3. under a lock, first holds the new version to the quality floor (`floor`,
   `registry.floor`): under it, the version stays registered for inspection with no alias;
   otherwise gives it the `champion` alias if it beats the champion on the metric (ROC AUC
   by default; sensitivity at the stored threshold breaks ties), else `challenger`. The
   first version becomes champion. Aliases only, never stages.

The gate itself (held-out scoring, comparison, lock) is `search.model_registry.champion`;
model URIs, downloads and safe loading are `search.model_registry.model_store`. Concurrency:
see `search.model_registry.champion`.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import sys
import time
from types import EllipsisType
from typing import Any

import mlflow
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf

from search.faults import fault_point
from search.model_registry import model_store
from search.model_registry.champion import (
    DEFAULT_METRIC,
    DEFAULT_TIE_BREAK,
    GATES,
    RANKING_METRICS,
    GateSpec,
    HeldOutEvaluator,
    HeldOutScore,
    NoHeldOutSplit,
    PromotionDecision,
    below_floor,
    check_metric,
    current_champion,
    decide_under_lock,
    promotion_lock,
)
from search.model_registry.model_store import run_model_metadata  # noqa: F401 - re-exported
from search.model_registry.promotion_record import record_decision
from search.model_registry.registry_settings import DEFAULTS
from search.tracking import descriptions
from search.tracking import tags as tag_keys

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = model_store.DEFAULT_MODEL_NAME


# ---------------------------------------------------------------------------------------------
# Registration


def run_config(client: MlflowClient, run_id: str) -> DictConfig:
    """The composed config a run logged as config/config.yaml."""
    text = model_store.run_config_text(client, run_id)
    if text is None:
        raise FileNotFoundError(
            f"run {run_id} has no config/config.yaml artifact; only runs of "
            "search/training/trainer.py "
            "can be promoted"
        )
    return OmegaConf.create(text)


def version_tags(run_id: str, metadata: dict[str, Any]) -> dict[str, str]:
    """Model-version tags: what a version needs to be used and traced without its run."""
    tags = {
        tag_keys.VERSION_CLASS_NAMES: json.dumps(list(metadata["class_names"])),
        tag_keys.VERSION_PREPROCESSING: json.dumps(metadata["preprocessing"], sort_keys=True),
        tag_keys.VERSION_THRESHOLD: json.dumps(metadata.get("threshold")),
        tag_keys.VERSION_THRESHOLD_RULE: str(metadata.get("threshold_rule")),
        tag_keys.VERSION_THRESHOLD_CHOSEN_ON: "val",
        tag_keys.VERSION_DATA_FINGERPRINT: str(metadata.get("data_fingerprint")),
        tag_keys.VERSION_CONFIG_HASH: str(metadata.get("config_hash")),
        tag_keys.VERSION_CALIBRATION: json.dumps(metadata.get("calibration"), sort_keys=True),
        # The whole YAML as a tag lost its newlines and flooded the tags table: the run's
        # artifact is the config, the tag points at it.
        tag_keys.VERSION_CONFIG_URI: f"runs:/{run_id}/config/config.yaml",
        tag_keys.VERSION_RUN_URI: f"runs:/{run_id}",
        tag_keys.VERSION_RUN_ID: run_id,
    }
    return tags


def existing_version(client: MlflowClient, name: str, run_id: str) -> ModelVersion | None:
    """A version of `name` already registered from this run (re-running promotion)."""
    try:
        found = client.search_model_versions(f"name='{name}' and run_id='{run_id}'")
    except MlflowException:
        return None
    return min(found, key=lambda v: int(v.version)) if found else None


def register_run_model(client: MlflowClient, run_id: str, model_name: str) -> ModelVersion:
    """Register the run's logged model as a version of `model_name` (idempotent per run)."""
    run = client.get_run(run_id)
    if run.info.status != "FINISHED":
        raise ValueError(f"run {run_id} is {run.info.status}, not FINISHED; nothing to register")
    model_uri = run.data.tags.get(tag_keys.BEST_MODEL_URI)
    if not model_uri:
        raise ValueError(
            f"run {run_id} has no best_model_uri tag: it logged no model "
            "(tracking.log_model=false, or it is not a search/training/trainer.py run)"
        )
    metadata = run_model_metadata(client, run_id)
    tags = version_tags(run_id, metadata)
    mv = existing_version(client, model_name, run_id)
    if mv is None:
        # MLflow 3: models:/<model_id> registers the LoggedModel; the version keeps the run id.
        # register_model prints "Successfully registered..." to stderr; our line says it.
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            mv = mlflow.register_model(model_uri, model_name, tags=tags)
        log.info("registered %s v%s (the model of run %s)", model_name, mv.version, run_id)
    else:
        log.info("run %s is already %s v%s; reusing it", run_id, model_name, mv.version)
        for key, value in tags.items():
            client.set_model_version_tag(model_name, mv.version, key, value)
    client.update_model_version(model_name, mv.version,
                                description=descriptions.version_description(run, metadata))
    return client.get_model_version(model_name, mv.version)


def register_and_promote(
    run_id: str,
    model_name: str = DEFAULT_MODEL_NAME,
    metric: str = DEFAULT_METRIC,
    parent_run_id: str | None = None,
    tie_break: str = DEFAULT_TIE_BREAK,
    gate: GateSpec | None = None,
    floor: float | None = None,
) -> PromotionDecision:
    """Register `run_id`'s model as a new version and give it @champion or @challenger.

    Args:
        run_id: A finished search/training/trainer.py run with a logged model.
        model_name: Registered model name.
        metric: Held-out metric that ranks models (higher is better).
        parent_run_id: Run that receives the decision (the sweep's parent run); default: the
            run's own parent, else the run itself.
        tie_break: Metric compared when `metric` ties (sensitivity at the stored threshold).
        gate: How the new version must win (paired bootstrap beyond noise by default).
        floor: The quality floor (`registry.floor`) on the held-out metric: a version under
            it gets no alias (decided under the lock, before any alias moves).

    Returns:
        The decision (also printed, logged to the parent run and to the version's tags).

    Uses the current tracking and registry URIs (`mlflow.set_tracking_uri`, or
    $MLFLOW_TRACKING_URI).
    """
    client = MlflowClient()
    metric, tie_break = check_metric(metric), check_metric(tie_break)
    gate = gate or GateSpec()
    evaluator = HeldOutEvaluator(run_config(client, run_id), metric, tie_break, gate)
    mv = register_run_model(client, run_id, model_name)
    fault_point("promotion")
    version = int(mv.version)
    warnings: list[str] = []
    new = _score_new_version(client, evaluator, model_name, version, warnings)

    registry_uri = mlflow.get_registry_uri()
    with promotion_lock(registry_uri) as locked:
        promoted, reason, champ_score, difference, alias = decide_under_lock(
            client, model_name, mv, evaluator, new, locked, floor
        )
    if champ_score is not None and new is not None and (
        champ_score.data_fingerprint != new.data_fingerprint
    ):
        warnings.append(
            f"training data fingerprints differ (new {str(new.data_fingerprint)[:12]}, champion "
            f"{str(champ_score.data_fingerprint)[:12]}): the champion may have trained on images "
            "of this held-out split, or on other data"
        )
    decision = _decision(model_name, version, run_id, (promoted, alias, reason), evaluator,
                         (metric, tie_break), new, champ_score, difference, warnings, gate)
    if floor is not None:
        decision.floor = float(floor)
        decision.below_floor = below_floor(new, floor) is not None
    record_decision(client, decision, parent_run_id or client.get_run(run_id).data.tags.get(
        tag_keys.PARENT_RUN_ID) or run_id)
    print(decision.summary())
    return decision


def _score_new_version(client: MlflowClient, evaluator: HeldOutEvaluator, model_name: str,
                       version: int, warnings: list[str]) -> HeldOutScore | None:
    """The new version's held-out score (None without a held-out split, with a warning);
    the champion seen now is scored too, outside the lock."""
    new: HeldOutScore | None
    try:
        new = evaluator.score(client, model_name, version)
    except NoHeldOutSplit as error:
        new = None
        warnings.append(str(error))
    if new is not None and new.data_fingerprint != evaluator.fingerprint:
        warnings.append(
            f"the split rebuilt from the run's config has data fingerprint "
            f"{str(evaluator.fingerprint)[:12]}, the run logged {str(new.data_fingerprint)[:12]}"
            " (did the data change since?)"
        )
    # Evaluate the champion seen now outside the lock (slow); inside the lock it is re-read and
    # a different champion is evaluated there.
    seen = current_champion(client, model_name)
    if new is not None and seen is not None and int(seen.version) != version:
        evaluator.score(client, model_name, seen.version)
    return new


def _decision(model_name: str, version: int, run_id: str, verdict: tuple[bool, str, str],
              evaluator: HeldOutEvaluator, metrics: tuple[str, str], new: HeldOutScore | None,
              champ_score: HeldOutScore | None, difference: Any, warnings: list[str],
              gate: GateSpec) -> PromotionDecision:
    """The decision as it is recorded and printed; `verdict` is (promoted, alias, reason)."""
    metric, tie_break = metrics
    promoted, alias, reason = verdict
    return PromotionDecision(
        model_name=model_name,
        version=version,
        run_id=run_id,
        alias=alias,
        promoted=promoted,
        metric=evaluator.metric_name(metric),  # as the task names it (macro_* for K classes)
        tie_break=evaluator.metric_name(tie_break),
        reason=reason,
        new_score=None if new is None else new.metric,
        new_tie_break=None if new is None else new.tie_break,
        champion_version=None if champ_score is None else champ_score.version,
        champion_score=None if champ_score is None else champ_score.metric,
        champion_tie_break=None if champ_score is None else champ_score.tie_break,
        evaluation=evaluator.description() if evaluator.fingerprint else {},
        new_metrics={} if new is None else new.metrics,
        champion_metrics={} if champ_score is None else champ_score.metrics,
        warnings=warnings,
        difference=difference,
        new_intervals={} if new is None else new.intervals,
        champion_intervals={} if champ_score is None else champ_score.intervals,
        new_external={} if new is None else new.external,
        champion_external={} if champ_score is None else champ_score.external,
        gate=gate.rule,
    )


# ---------------------------------------------------------------------------------------------
# Entry points


def registry_options(config: DictConfig | dict | None) -> dict[str, Any]:
    """`registry.*` keys of a composed config with their defaults."""
    section = (config or {}).get("registry") or {}
    return {
        "enabled": bool(section.get("enabled", DEFAULTS.enabled)),
        "model_name": str(section.get("model_name") or DEFAULT_MODEL_NAME),
        "metric": str(section.get("metric") or DEFAULT_METRIC),
        "tie_break": str(section.get("tie_break") or DEFAULT_TIE_BREAK),
    }


def registry_floor(config: DictConfig | dict | None) -> float | None:
    """`registry.floor` of a composed config (None: no floor)."""
    floor = ((config or {}).get("registry") or {}).get("floor")
    return None if floor is None else float(floor)


def promote_sweep_best(
    config: DictConfig, parent_run_id: str, best_run_id: str | None | EllipsisType = ...
) -> PromotionDecision | None:
    """Register and promote the sweep's best trial (the sweep's end: `search.sweep.pipeline`).

    Args:
        config: The composed sweep config (reads `registry.enabled/model_name/metric/tie_break`
            and `registry.floor`).
        parent_run_id: The sweep's parent run (receives the decision).
        best_run_id: The best trial's run, as the sweep's end found it (None: the sweep has
            none). Left out: the parent run's `best_run_id` tag, for a caller that holds only
            the parent run.

    Returns:
        The decision, or None when the registry is disabled, the sweep has no best run or the
        best run logged no model (a `promotion.skipped` tag on the parent run says why).

    Raises:
        Whatever registration or evaluation raised, after tagging the parent run with
        `promotion.error` (the sweep's own results are already logged by then).
    """
    options = registry_options(config)
    if not options["enabled"]:
        log.info("registry.enabled=false: best trial not registered")
        return None
    client = MlflowClient()
    if best_run_id is ...:  # not given: the parent run's tag says which run was best
        best_run_id = client.get_run(parent_run_id).data.tags.get(tag_keys.BEST_RUN_ID)
    skipped = None
    if not best_run_id:
        skipped = "the sweep has no best_run_id (no finished trial?)"
    elif not client.get_run(best_run_id).data.tags.get(tag_keys.BEST_MODEL_URI):
        skipped = f"best run {best_run_id} logged no model (tracking.log_model=false?)"
    if skipped:
        log.warning("nothing registered: %s", skipped)
        client.set_tag(parent_run_id, tag_keys.PROMOTION_SKIPPED, skipped)
        return None
    gate = GateSpec.from_config((config or {}).get("registry"))
    try:
        decision = register_and_promote(
            best_run_id, model_name=options["model_name"], metric=options["metric"],
            parent_run_id=parent_run_id, tie_break=options["tie_break"], gate=gate,
            floor=registry_floor(config),
        )
    except Exception as error:
        client.set_tag(parent_run_id, tag_keys.PROMOTION_ERROR,
                       f"{type(error).__name__}: {error}"[:5000])
        raise
    return decision


def main(argv: list[str] | None = None) -> int:
    from search.tracking.mlflow_runs import TrackingError, open_store, setup_cli

    parser = argparse.ArgumentParser(
        description="Register a finished run's model (or a sweep's best trial) and decide "
                    "champion/challenger on its held-out split."
    )
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--run-id", help="a finished search/training/trainer.py run")
    which.add_argument("--sweep-run-id", help="a sweep's parent run (uses its best_run_id tag)")
    parser.add_argument("--name", default=DEFAULT_MODEL_NAME, help="registered model name")
    parser.add_argument("--metric", default=DEFAULT_METRIC, choices=RANKING_METRICS)
    parser.add_argument("--tie-break", default=DEFAULT_TIE_BREAK, choices=RANKING_METRICS)
    parser.add_argument("--gate", default=DEFAULTS.gate, choices=GATES,
                        help="paired_bootstrap: promote only when better beyond noise (default); "
                             "point: a higher point value is enough")
    parser.add_argument("--min-per-class", type=int, default=DEFAULTS.min_per_class,
                        help="fewer images of a class in the compared split: too small to decide")
    parser.add_argument("--compare-on", default=DEFAULTS.compare_on,
                        help="test, or the name of one of the run's evaluation.external sets")
    parser.add_argument("--floor", type=float, default=None,
                        help="quality floor on the held-out metric: a version under it is "
                             "registered for inspection and gets no alias")
    parser.add_argument("--tracking-uri", default=None,
                        help="default: $MLFLOW_TRACKING_URI, else sqlite:///<repo>/mlruns/mlflow.db")
    args = parser.parse_args(argv)
    try:
        open_store(setup_cli(args.tracking_uri))  # it writes versions and aliases: proved now
    except TrackingError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    client = MlflowClient()
    run_id, parent = args.run_id, None
    if args.sweep_run_id:
        parent = args.sweep_run_id
        run_id = client.get_run(parent).data.tags.get(tag_keys.BEST_RUN_ID)
        if not run_id:
            print(f"error: sweep run {parent} has no best_run_id tag (did the sweep finish a "
                  "trial?)", file=sys.stderr)
            return 2
    start = time.time()
    gate = GateSpec(args.gate, args.min_per_class, args.compare_on)
    decision = register_and_promote(run_id, model_name=args.name, metric=args.metric,
                                    parent_run_id=parent, tie_break=args.tie_break, gate=gate,
                                    floor=args.floor)
    log.info("promotion took %.1f s", time.time() - start)
    return 1 if decision.below_floor else 0


if __name__ == "__main__":
    sys.exit(main())
