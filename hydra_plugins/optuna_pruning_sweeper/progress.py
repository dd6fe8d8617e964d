"""Progress lines of a sweep: one when a trial starts, one when it ends (state, value, best).

Hydra imports this module in every Hydra process (plugin scan): nothing heavy here.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .study import count_toward_budget

if TYPE_CHECKING:
    import optuna
    from optuna.trial import FrozenTrial

    from .worker import TrialOutcome

log = logging.getLogger(__name__)


def trial_started(
    number: int, slot: int, gpu: str | None, params: dict[str, Any], elapsed: float
) -> None:
    """``[trial N] started slot S [gpu G] | params | elapsed``."""
    log.info(
        "[trial %d] started  slot %d%s | %s | elapsed %s",
        number,
        slot,
        f" gpu {gpu}" if gpu is not None else "",
        " ".join(f"{k}={_fmt(v)}" for k, v in params.items()),
        _hms(elapsed),
    )


def trial_finished(
    o: TrialOutcome,
    trials: Sequence[FrozenTrial],
    study: optuna.Study,
    n_trials: int,
    elapsed: float,
) -> None:
    """``[trial N] STATE value | best | duration | elapsed | counted/n_trials | reason``."""
    counted = count_toward_budget(trials)
    if o.values is not None:
        value = " ".join(f"{v:.6g}" for v in o.values)
    elif o.state == "PRUNED":
        t = next((t for t in trials if t.number == o.number), None)
        value = f"{t.value:.6g} (last report)" if t is not None and t.value is not None else "-"
    else:
        value = "-"
    best = best_text(trials, study)
    reason = f" | {o.reason[:200]}" if o.reason else ""
    log.info(
        "[trial %d] %-8s value %s | best %s | %.1fs | elapsed %s | %d/%d counted%s",
        o.number,
        o.state,
        value,
        best,
        o.duration_s,
        _hms(elapsed),
        counted,
        n_trials,
        reason,
    )


def best_text(trials: Sequence[FrozenTrial], study: optuna.Study) -> str:
    """The best value so far (or the Pareto front's size), "-" before any COMPLETE trial."""
    done = [t for t in trials if t.state.name == "COMPLETE"]
    if not done:
        return "-"
    if len(study.directions) > 1:
        return f"pareto front of {len(study.best_trials)}"
    best = study.best_trial
    return f"{best.value:.6g} (#{best.number})"


def _hms(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}"


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
