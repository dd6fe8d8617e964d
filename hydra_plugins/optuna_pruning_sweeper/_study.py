"""The study: open or resume it, refuse a changed search space, count the budget, ask.

Counting rule for ``n_trials`` (``count_toward_budget``): COMPLETE + PRUNED + FAIL + RUNNING,
minus each FAIL trial that was re-queued as a retry (Optuna's
``RetryHeartbeatStaleTrialCallback`` system attrs name it). WAITING trials (queued retries)
do not count: the next ask runs them. The count and the ask happen under one ask lock
(``_storage.AskLock``), so several sweeper processes on one storage hold exactly ``n_trials``
counted trials in total.

The study is opened with a RandomSampler (the sweeper sets the configured sampler once the
session index is known, see ``open_study``); its search-space fingerprint and the list of
sweeper sessions are kept as study user attrs.

Optuna is imported inside the functions: the public ``sweeper`` imports this module at
Hydra's plugin scan, in every Hydra process, and a plain run should not pay for Optuna.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import socket
import warnings
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from ._storage import AskLock, redact

if TYPE_CHECKING:
    import optuna
    from optuna.trial import FrozenTrial

# Named as before the module went private, so its log lines read as they did.
log = logging.getLogger(__name__.replace("._", "."))

SPACE_ATTR = "sweeper_search_space"
SESSIONS_ATTR = "sweeper_sessions"
OVERRIDES_ATTR = "overrides"
COUNTED_STATE_NAMES = ("COMPLETE", "PRUNED", "FAIL", "RUNNING")


class SearchSpaceChangedError(RuntimeError):
    """The stored study was created with another search space."""


def retried_numbers(trials: Iterable[FrozenTrial]) -> set[int]:
    """Numbers of FAIL trials that were re-queued as a retry.

    Each retry copy carries ``retry_history`` (see
    ``RetryHeartbeatStaleTrialCallback.retry_history``): its last item is the trial it
    replaces.
    """
    import optuna

    out: set[int] = set()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        for t in trials:
            history = optuna.storages.RetryHeartbeatStaleTrialCallback.retry_history(t)
            if history:
                out.add(history[-1])
    return out


def count_toward_budget(trials: Sequence[FrozenTrial], attempts: bool = False) -> int:
    """Trials that use up ``n_trials``: finished or running, minus retried failures (with
    ``attempts``, ``hydra.sweeper.retry.count=attempts``: every attempt counts)."""
    retried = set() if attempts else retried_numbers(trials)
    return sum(
        1
        for t in trials
        if t.state.name in COUNTED_STATE_NAMES
        and not (t.state.name == "FAIL" and t.number in retried)
    )


def space_differences(stored: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Human-readable differences between two search-space fingerprints."""
    diffs: list[str] = []
    for section in ("params", "fixed"):
        old, new = stored.get(section, {}) or {}, current.get(section, {}) or {}
        for k in sorted(set(old) | set(new)):
            if k not in new:
                diffs.append(f"{section}: '{k}' removed (was {_short(old[k])})")
            elif k not in old:
                diffs.append(f"{section}: '{k}' added ({_short(new[k])})")
            elif old[k] != new[k]:
                diffs.append(f"{section}: '{k}' changed: {_short(old[k])} -> {_short(new[k])}")
    if stored.get("directions") and stored.get("directions") != current.get("directions"):
        diffs.append(f"directions changed: {stored['directions']} -> {current['directions']}")
    return diffs


def _short(value: Any) -> str:
    if isinstance(value, dict) and "distribution" in value:
        d = json.loads(value["distribution"])
        text = f"{d['name']}({', '.join(f'{k}={v}' for k, v in d['attributes'].items())})"
        return text + (f" when {value['when']}" if value.get("when") else "")
    return str(value)


def directions_of(direction: Any) -> list[str]:
    """``direction`` config (str or list) -> list of "minimize"/"maximize"."""
    if isinstance(direction, str):
        directions = [direction]
    elif isinstance(direction, Sequence | ListConfig):
        directions = [str(d) for d in direction]
    else:
        raise ValueError(f"hydra.sweeper.direction must be a string or a list, got {direction!r}")
    bad = [d for d in directions if d not in ("minimize", "maximize")]
    if bad or not directions:
        raise ValueError(
            f"hydra.sweeper.direction: expected 'minimize' or 'maximize' (or a list), got {bad}"
        )
    return directions


def default_study_name(config: DictConfig) -> str:
    """``<hydra.job.name>`` plus ``-<search_space choice>`` when that group is selected."""
    name = str(config.hydra.job.name)
    choice = OmegaConf.select(config, "hydra.runtime.choices.search_space")
    return f"{name}-{choice}" if choice else name


def open_study(
    storage: optuna.storages.RDBStorage,
    base_name: str,
    fingerprint: dict[str, Any],
    pruner: optuna.pruners.BasePruner,
    directions: list[str],
    new_study: bool,
) -> tuple[optuna.Study, int]:
    """Load or create the study (call under the ask lock); returns it and the session index."""
    import optuna

    existing = set(optuna.get_all_study_names(storage))
    name, k = base_name, 1
    while True:
        if name not in existing:
            study = optuna.create_study(
                storage=storage,
                study_name=name,
                directions=directions,
                sampler=optuna.samplers.RandomSampler(),
                pruner=pruner,
                load_if_exists=True,
            )
            study.set_user_attr(SPACE_ATTR, fingerprint)
            if name != base_name:
                log.warning("Started a new study '%s' (new_study=true)", name)
            break
        study = optuna.load_study(
            study_name=name,
            storage=storage,
            sampler=optuna.samplers.RandomSampler(),
            pruner=pruner,
        )
        stored = study.user_attrs.get(SPACE_ATTR)
        if stored is None:
            log.warning("Study '%s' has no stored search space; storing this one.", name)
            study.set_user_attr(SPACE_ATTR, fingerprint)
            stored = fingerprint
        stored_dirs = [d.name.lower() for d in study.directions]
        diffs = space_differences({**stored, "directions": stored_dirs}, fingerprint)
        if not diffs:
            break
        if not new_study:
            raise SearchSpaceChangedError(
                f"Study '{name}' in {redact(storage.url)} was created with another "
                "search space:\n  - " + "\n  - ".join(diffs) + "\nPass "
                "hydra.sweeper.new_study=true to start a new study next to it, or "
                "choose another hydra.sweeper.study_name (or restore the old space)."
            )
        k += 1
        name = f"{base_name}-{k}"
    sessions = list(study.user_attrs.get(SESSIONS_ATTR, []))
    study.set_user_attr(
        SESSIONS_ATTR,
        sessions + [{"host": socket.gethostname(), "pid": os.getpid(), "started": _now_iso()}],
    )
    return study, len(sessions)


def ask_within_budget(
    study: optuna.Study,
    storage: optuna.storages.RDBStorage,
    lock: AskLock,
    n_trials: int,
    heartbeat_interval: int | None,
    attempts: bool = False,
) -> optuna.trial.Trial | None:
    """Count, then ask if the budget allows (atomically across processes)."""
    with lock():
        trials = storage.get_all_trials(study._study_id, deepcopy=False)
        if count_toward_budget(trials, attempts) >= n_trials:
            return None
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Heartbeat of storage")
            trial = study.ask()
        if heartbeat_interval:
            # A beat right away: a crash before the worker starts is detectable too.
            storage.record_heartbeat(trial._trial_id)
    return trial


def _now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
