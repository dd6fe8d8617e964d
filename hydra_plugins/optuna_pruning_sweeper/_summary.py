"""The study summary, computed in one place for the sweeper and for the tracking callback.

``study_summary`` is the outcome of a study (trial counts by state, the best trial or the
Pareto front). ``sweep_summary`` adds what the sweeper knows about this session (storage,
sampler, pruner, budget, stop reason) and is written to
``<hydra.sweep.dir>/optuna_summary.yaml`` before Hydra's ``on_multirun_end``.

Optuna is imported inside the functions: the public ``sweeper`` imports this module at
Hydra's plugin scan, in every Hydra process, and a plain run should not pay for Optuna.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from ._storage import redact, redact_tree
from ._study import OVERRIDES_ATTR, count_toward_budget, retried_numbers
from ._warm_start import own_best

if TYPE_CHECKING:
    import optuna
    from optuna.trial import FrozenTrial

    from ._worker import TrialOutcome

# Named as before the module went private, so its log lines read as they did.
log = logging.getLogger(__name__.replace("._", "."))

SUMMARY_FILE = "optuna_summary.yaml"
OFFICIAL_FILE = "optimization_results.yaml"  # hydra-optuna-sweeper's result file


def counts_by_state(trials: Sequence[FrozenTrial]) -> dict[str, int]:
    """Number of trials in each state that occurs (COMPLETE, PRUNED, FAIL, ...)."""
    return dict(collections.Counter(t.state.name for t in trials))


def best_section(
    study: optuna.Study, trials: Sequence[FrozenTrial], with_overrides: bool
) -> dict[str, Any]:
    """``{"best": ...}`` (one objective) or ``{"pareto_front": [...]}``; {} before a result.

    ``with_overrides`` adds the best trial's override lines (the sweeper's summary file).
    """
    best_trials = own_best(trials, study.directions)  # never a warm-start copy
    if not best_trials:
        return {}
    if len(study.directions) == 1:
        best = best_trials[0]
        entry: dict[str, Any] = {
            "number": best.number,
            "value": float(best.value),
            "params": dict(best.params),
        }
        if with_overrides:
            entry["overrides"] = list(best.user_attrs.get(OVERRIDES_ATTR, []))
        return {"best": entry}
    return {
        "pareto_front": [
            {"number": t.number, "values": [float(v) for v in t.values], "params": dict(t.params)}
            for t in best_trials
        ]
    }


def study_summary(study: optuna.Study) -> dict[str, Any]:
    """Best trial (or Pareto front), counts by state and the study name."""
    trials = study.get_trials(deepcopy=False)
    summary: dict[str, Any] = {"study": study.study_name, "counts": counts_by_state(trials)}
    summary.update(best_section(study, trials, with_overrides=False))
    return redact_tree(summary)


def sweep_summary(
    study: optuna.Study,
    storage: optuna.storages.RDBStorage,
    storage_url: str,
    n_trials: int,
    outcomes: Sequence[TrialOutcome],
    stop_reason: str,
    elapsed: float,
) -> dict[str, Any]:
    """The sweeper's summary of this session: the study's outcome plus budget and limits."""
    from optuna.trial import TrialState

    trials = storage.get_all_trials(study._study_id, deepcopy=False)
    counts = counts_by_state(trials)
    summary: dict[str, Any] = {
        "study": study.study_name,
        "storage": redact(storage_url),
        "sampler": type(study.sampler).__name__,
        "pruner": type(study.pruner).__name__,
        "directions": [d.name.lower() for d in study.directions],
        "n_trials": n_trials,
        "counted": count_toward_budget(trials),
        "states": {s.name: counts.get(s.name, 0) for s in TrialState},
        "retried": len(retried_numbers(trials)),
        "this_session": dict(collections.Counter(o.state for o in outcomes)),
        "stop_reason": stop_reason,
        "elapsed_s": round(elapsed, 1),
    }
    summary.update(best_section(study, trials, with_overrides=True))
    return redact_tree(summary)  # the override lines may carry a URL with a password


def write_summary(summary: dict[str, Any], sweep_dir: Path) -> None:
    """Write ``optuna_summary.yaml`` into the sweep folder; log its gist in two lines (the
    whole YAML, ~50 lines with the best params twice, is in the file)."""
    text = yaml.safe_dump(redact_tree(summary), sort_keys=False)
    (sweep_dir / SUMMARY_FILE).write_text(text)
    states = summary.get("states", {})
    counts = " · ".join(f"{n} {s.lower()}" for s, n in states.items() if n)
    log.info("Sweep summary: %s of %s counted · %s · stopped by %s after %.0f s (%s)",
             summary.get("counted"), summary.get("n_trials"), counts or "no trials",
             summary.get("stop_reason"), summary.get("elapsed_s", 0.0), sweep_dir / SUMMARY_FILE)
    best = summary.get("best")
    if best:
        overrides = best.get("overrides") or [f"{k}={v}" for k, v in best["params"].items()]
        log.info("Best: trial %d = %.6g with %s", best["number"], best["value"],
                 " ".join(overrides))
    elif summary.get("pareto_front"):
        log.info("Pareto front: %d trial(s) (in the file)", len(summary["pareto_front"]))


def official_results(study: optuna.Study) -> dict[str, Any] | None:
    """The official plugin's ``optimization_results.yaml`` content (None: nothing complete).

    ``name: optuna`` with ``best_params`` / ``best_value``, or ``solutions`` (the Pareto
    front's ``params`` and ``values``) for several objectives, as hydra-optuna-sweeper writes.
    """
    best_trials = own_best(study.get_trials(deepcopy=False), study.directions)
    if not best_trials:
        return None
    if len(study.directions) == 1:
        best = best_trials[0]
        return {"name": "optuna", "best_params": dict(best.params), "best_value": best.value}
    return {
        "name": "optuna",
        "solutions": [
            {"params": dict(t.params), "values": list(t.values)} for t in best_trials
        ],
    }


def write_official_results(study: optuna.Study, sweep_dir: Path) -> None:
    """Write ``optimization_results.yaml`` beside the summary, when a trial completed."""
    results = official_results(study)
    if results is None:
        log.warning("No COMPLETE trial: %s is not written", OFFICIAL_FILE)
        return
    (sweep_dir / OFFICIAL_FILE).write_text(yaml.safe_dump(redact_tree(results), sort_keys=False))
