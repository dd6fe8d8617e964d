"""Where a promotion decision is written: version tags, the deciding run and descriptions.

The decision (`search.model_registry.champion.PromotionDecision`) goes to the new version's tags
(`promotion.*`), to a run (the sweep's parent: tags, params, metrics with the intervals and
the paired difference, `promotion/decision.json`), and into the descriptions people read on
the version's and the registered model's pages.
"""

from __future__ import annotations

import math

import mlflow
from mlflow.tracking import MlflowClient

from search.model_registry.champion import BELOW_FLOOR, PromotionDecision
from search.model_registry.model_store import run_model_metadata
from search.tracking import descriptions
from search.tracking import tags as tag_keys


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def record_decision(client: MlflowClient, decision: PromotionDecision, target_run_id: str) -> None:
    """Decision → version tags, and params/metrics/tags + promotion/decision.json on a run."""
    name, version = decision.model_name, str(decision.version)
    version_tags = {
        # under the floor: registered for inspection, no alias moved (champion.below_floor)
        tag_keys.PROMOTION_DECISION: BELOW_FLOOR if decision.below_floor else decision.alias,
        tag_keys.PROMOTION_REASON: decision.reason,
        tag_keys.PROMOTION_METRIC: decision.metric,
        tag_keys.PROMOTION_SCORE: str(decision.new_score),
        tag_keys.PROMOTION_COMPARED_WITH: (
            f"v{decision.champion_version}" if decision.champion_version is not None else "none"
        ),
        tag_keys.PROMOTION_CHAMPION_SCORE: str(decision.champion_score),
        tag_keys.PROMOTION_EVAL_SPLIT: str(decision.evaluation.get("description", "none")),
    }
    if decision.difference.get("text"):
        version_tags[tag_keys.PROMOTION_DIFFERENCE] = decision.difference["text"]
    if decision.floor is not None:
        version_tags[tag_keys.PROMOTION_FLOOR] = f"{decision.floor:.4f}"
    if decision.warnings:
        version_tags[tag_keys.PROMOTION_WARNING] = " | ".join(decision.warnings)
    for key, value in version_tags.items():
        client.set_model_version_tag(name, version, key, value)

    run_tags = {
        tag_keys.PROMOTION_MODEL_NAME: name,
        tag_keys.PROMOTION_VERSION: version,
        tag_keys.PROMOTION_ALIAS: decision.alias,
        tag_keys.PROMOTION_PROMOTED: str(decision.promoted).lower(),
        tag_keys.PROMOTION_REASON: decision.reason,
        tag_keys.PROMOTION_METRIC: decision.metric,
        tag_keys.PROMOTION_COMPARED_WITH: version_tags[tag_keys.PROMOTION_COMPARED_WITH],
        tag_keys.PROMOTION_MODEL_URI: f"models:/{name}/{version}",
    }
    if decision.warnings:
        run_tags[tag_keys.PROMOTION_WARNING] = " | ".join(decision.warnings)
    if decision.floor is not None:
        run_tags[tag_keys.PROMOTION_FLOOR] = version_tags[tag_keys.PROMOTION_FLOOR]
    for key, value in run_tags.items():
        client.set_tag(target_run_id, key, value)
    metrics = {
        f"promotion_new_{decision.metric}": decision.new_score,
        f"promotion_new_{decision.tie_break}": decision.new_tie_break,
        f"promotion_champion_{decision.metric}": decision.champion_score,
        f"promotion_champion_{decision.tie_break}": decision.champion_tie_break,
    }
    for who, found in (("new", decision.new_intervals), ("champion", decision.champion_intervals)):
        for metric in (decision.metric, decision.tie_break):
            low, high = (found.get(metric) or [None, None])[:2]
            metrics[f"promotion_{who}_{metric}_ci_low"] = low
            metrics[f"promotion_{who}_{metric}_ci_high"] = high
    if decision.difference.get("metric"):
        diff = decision.difference
        for key in ("difference", "low", "high"):
            metrics[f"promotion_difference_{diff['metric']}"
                    + ("" if key == "difference" else f"_ci_{key}")] = diff[key]
    for who, found in (("new", decision.new_external), ("champion", decision.champion_external)):
        for set_name, ext in found.items():
            metrics[f"promotion_{who}_ext_{set_name}_{decision.metric}"] = \
                ext["metrics"].get(decision.metric)
    for key, value in metrics.items():
        if _finite(value):
            client.log_metric(target_run_id, key, float(value))
    # Params are immutable: set them once; a later promotion into the same run keeps the first.
    existing = client.get_run(target_run_id).data.params
    # promotion.metric is a param as well as a tag: one key for both.
    params = {"promotion.registered_model": name, tag_keys.PROMOTION_METRIC: decision.metric,
              "promotion.tie_break": decision.tie_break, "promotion.gate": decision.gate}
    for key, value in params.items():
        if key not in existing:
            client.log_param(target_run_id, key, value)
    from search.evaluation.metrics import json_ready

    client.log_dict(target_run_id, json_ready(decision.to_dict()), "promotion/decision.json")
    # Where people look: the version's page says how it fared, the model's who is champion.
    run = client.get_run(decision.run_id)
    client.update_model_version(name, version, description=descriptions.version_description(
        run, run_model_metadata(client, decision.run_id), decision.to_dict()))
    client.update_registered_model(name, description=descriptions.model_description(
        name, decision.to_dict(), mlflow.get_tracking_uri()))
