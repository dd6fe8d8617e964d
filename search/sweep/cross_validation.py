"""`registry.cv_folds`: the champion's config re-trained on k folds of train + val.

One val split of a few hundred images gives one noisy number. After the gate, the
champion's logged config is trained again k times from scratch, each time with fold i of a
stratified, group-disjoint k-fold split of train + val as val (`data.cv_folds` /
`data.cv_fold`; the test split is untouched), as single runs under the sweep's parent run
(tagged `cv.fold`, `cv.of_run`; no model logged). The parent run gets
`cv_val_<metric>_mean` / `_std` for ROC AUC, accuracy, sensitivity, specificity and loss,
and the champion version a `cv.val_<metric>` tag (`<mean> ± <std> over k folds`). A version
the quality floor refused (`registry.floor`: registered, no alias) is cross-validated itself,
not the champion it could not replace.
"""

from __future__ import annotations

import logging
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf

from search import sweep_context
from search.faults import armed, signal_point
from search.model_registry.champion import current_champion
from search.model_registry.model_store import run_config_text
from search.model_registry.registry_settings import DEFAULTS
from search.sweep.final_stage import metrics_of, run_all, run_single
from search.tracking import tags as tag_keys

log = logging.getLogger(__name__)
METRICS = ("val_roc_auc", "val_accuracy", "val_sensitivity", "val_specificity", "val_loss",
           "val_macro_recall")


def cv_folds(config: DictConfig | dict | None) -> int:
    """`registry.cv_folds` (0 = off; otherwise >= 2)."""
    k = OmegaConf.select(OmegaConf.create(config or {}), "registry.cv_folds")
    k = int(DEFAULTS.cv_folds if k is None else k)  # absent or null: the YAML's default
    if k == 1 or k < 0:
        raise ValueError(f"registry.cv_folds={k} must be 0 (off) or >= 2")
    return k


def cv_target(client: MlflowClient, decision: Any) -> Any:
    """The version to cross-validate: the champion, or the sweep's own version when the
    quality floor refused it (its spread says whether the miss was noise)."""
    if getattr(decision, "below_floor", False):
        return client.get_model_version(decision.model_name, str(decision.version))
    return current_champion(client, decision.model_name)


def interrupt_point(client: MlflowClient, parent_run_id: str
                    ) -> Callable[[subprocess.Popen], None] | None:
    """The `cv_fold` fault point (SIGINT, as Ctrl-C), fired once a fold's MLflow run exists,
    so that the interrupt cuts a running fold; None unless `XRAY_FAULT` names it."""
    if not armed("cv_fold"):
        return None
    experiment = client.get_run(parent_run_id).info.experiment_id
    query = (f"tags.`{tag_keys.CV_FOLD}` != '' and "
             f"tags.`{tag_keys.PARENT_RUN_ID}` = '{parent_run_id}'")

    def fire(proc: subprocess.Popen) -> None:
        while proc.poll() is None and not client.search_runs([experiment], query, max_results=1):
            time.sleep(0.5)
        signal_point("cv_fold", signal.SIGINT)

    return fire


def run_cross_validation(config: DictConfig, parent_run_id: str, decision: Any
                         ) -> dict[str, Any] | None:
    """Train the champion's config on k folds; mean ± std on the parent and the version."""
    k = cv_folds(config)
    if k < 2 or decision is None:
        return None
    client = MlflowClient()
    champion = cv_target(client, decision)
    if champion is None or not champion.run_id:
        return None
    text = run_config_text(client, champion.run_id)
    if text is None:
        raise FileNotFoundError(f"the champion's run {champion.run_id} has no config to re-train")
    jobs, threads = sweep_context.sweep_jobs(config)
    log.info("Cross-validating %s (%s v%s) on %d folds of train + val",
             "the version the floor refused" if getattr(decision, "below_floor", False)
             else "the champion", decision.model_name, champion.version, k)
    work = Path(tempfile.mkdtemp(prefix="cv-"))
    tasks = [(i, [f"++data.cv_folds={k}", f"++data.cv_fold={i}", "tracking.uri=null",
                  "tracking.log_model=false", f"tracking.run_name='cv · fold {i + 1}/{k}'",
                  f"++tracking.tags={{{tag_keys.CV_FOLD}: '{i}', "
                  f"{tag_keys.CV_OF_RUN}: {champion.run_id}}}"],
              work / f"fold{i}") for i in range(k)]
    def one(task: tuple) -> tuple[Any, dict[str, float]]:
        i, overrides, folder = task
        proc = run_single(text, overrides, folder, parent_run_id, threads,
                          on_started=interrupt_point(client, parent_run_id))
        found = metrics_of(folder)
        log.info("cv fold %d/%d: val ROC AUC %s", i + 1, k, found.get("val_roc_auc", "n/a"))
        return proc, found

    try:  # an interrupt stops the folds still running (final_stage.run_all)
        results = run_all(one, tasks, jobs)
    finally:
        shutil.rmtree(work, ignore_errors=True)  # the folds' runs are in MLflow
    per_fold = []
    for (i, _, _), (proc, found) in zip(tasks, results, strict=True):
        if proc.returncode != 0 or not found:
            log.warning("cv fold %d failed: %s", i, proc.stderr.strip()[-300:])
            continue
        per_fold.append(found)
    summary: dict[str, Any] = {"folds": k, "completed": len(per_fold), "version": champion.version}
    for name in METRICS:
        values = [f[name] for f in per_fold if f.get(name) is not None]
        if len(values) < 2:
            continue
        mean, std = float(np.mean(values)), float(np.std(values, ddof=1))
        summary[name] = {"mean": mean, "std": std, "values": values}
        client.log_metric(parent_run_id, f"cv_{name}_mean", mean)
        client.log_metric(parent_run_id, f"cv_{name}_std", std)
        client.set_model_version_tag(decision.model_name, champion.version,
                                     f"{tag_keys.CV_METRIC_PREFIX}{name}",
                                     f"{mean:.4f} ± {std:.4f} over {len(values)} folds")
        log.info("cv %s: %.4f ± %.4f over %d folds", name, mean, std, len(values))
    client.log_dict(parent_run_id, summary, "cross_validation/summary.json")
    return summary
