"""The study: open or resume it, refuse a changed search space, count the budget, ask.

Counting rule for ``n_trials`` (``count_toward_budget``): COMPLETE + PRUNED + FAIL + RUNNING
of this study's own trials (never a warm-start copy: another study ran it, see
``_warm_start.own_trials``), minus each FAIL trial that was re-queued as a retry (Optuna's
``RetryHeartbeatStaleTrialCallback`` system attrs name it). WAITING trials (queued retries)
do not count: the next ask runs them. The count and the reservation of the trial (a queued
one, or a new row and its number) happen under one ask lock (``_storage.AskLock``), so several
sweeper processes on one storage hold exactly ``n_trials`` counted trials in total; building
the ``Trial`` and all sampling happen after the lock (``ask_within_budget``).

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
from ._warm_start import COPY_ATTR, own_trials

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
        for t in own_trials(trials)  # warm-start copies were run by another study
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
    warm_start: Any = None,
) -> tuple[optuna.Study, int]:
    """Load or create the study (call under the ask lock); returns it and the session index.

    A fresh study is warm-started from ``warm_start`` (a ``_warm_start.Request``; see
    ``_warm_start.apply``: an unusable source raises ``WarmStartError`` here, before any
    trial).
    """
    import optuna

    from ._warm_start import apply as apply_warm_start

    # Optuna's "A new study created in RDB with name: ..." says, in its own format, what the
    # sweeper's banner says next (study, storage, session); its warnings still show.
    optuna.logging.set_verbosity(optuna.logging.WARNING)
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
    apply_warm_start(study, storage, warm_start, fingerprint)
    sessions = list(study.user_attrs.get(SESSIONS_ATTR, []))
    study.set_user_attr(
        SESSIONS_ATTR,
        sessions + [{"host": socket.gethostname(), "pid": os.getpid(), "started": _now_iso()}],
    )
    return study, len(sessions)


def _state_counts(storage: Any, study_id: int, attempts: bool) -> tuple[int, int]:
    """``(counted, waiting)`` of the stored study from SQL counts, loading no trial.

    The ask lock serialises every worker's ask: reading and rebuilding every trial there
    (``get_all_trials``) grew with the study and with the number of waiting workers
    (benchmarks/scale_workers.py). One GROUP BY gives the states; only a study with failures
    reads the retry copies' ``retry_history`` (few rows) to apply the count rule. A storage
    that is not an RDBStorage (no SQL tables) is counted from its trials, as before.
    """
    import optuna
    from optuna.trial import TrialState

    if not isinstance(storage, optuna.storages.RDBStorage):
        trials = storage.get_all_trials(study_id, deepcopy=False)
        return (count_toward_budget(trials, attempts),
                sum(t.state == TrialState.WAITING for t in trials))
    from optuna.storages._rdb import models
    from sqlalchemy import func

    trials, attrs = models.TrialModel, models.TrialSystemAttributeModel
    user = models.TrialUserAttributeModel  # warm-start copies (COPY_ATTR) were run elsewhere
    session = storage.scoped_session()
    try:
        by_state = dict(session.query(trials.state, func.count(trials.trial_id))
                        .filter(trials.study_id == study_id).group_by(trials.state).all())
        retried_fails = 0
        if by_state.get(TrialState.FAIL) and not attempts:
            histories = session.query(attrs.value_json).join(
                trials, trials.trial_id == attrs.trial_id).filter(
                trials.study_id == study_id, attrs.key == "retry_history").all()
            retried = {json.loads(v)[-1] for (v,) in histories if json.loads(v)}
            failed = {n for (n,) in session.query(trials.number).filter(
                trials.study_id == study_id, trials.state == TrialState.FAIL)}
            retried_fails = len(failed & retried)
        copies = session.query(func.count(user.trial_id)).join(
            trials, trials.trial_id == user.trial_id).filter(
            trials.study_id == study_id, user.key == COPY_ATTR).scalar() or 0
        session.commit()  # a read: ends the transaction the queries opened
    finally:
        session.close()
    counted = sum(by_state.get(TrialState[s], 0) for s in COUNTED_STATE_NAMES)
    return counted - retried_fails - copies, by_state.get(TrialState.WAITING, 0)


def counted_in_storage(storage: Any, study_id: int, attempts: bool = False) -> int:
    """``count_toward_budget`` of the stored study, from SQL counts (``_state_counts``)."""
    return _state_counts(storage, study_id, attempts)[0]


def reserve_trial(study: optuna.Study, storage: Any, lock: AskLock, n_trials: int,
                  attempts: bool = False) -> int | None:
    """Under the ask lock, only what must be serialised: count, then take a queued (WAITING)
    trial or create one (its number). Returns its storage id, or None at ``n_trials``."""
    with lock():
        counted, waiting = _state_counts(storage, study._study_id, attempts)
        if counted >= n_trials:
            return None
        # as study.ask(): queued retries first
        trial_id = study._pop_waiting_trial_id() if waiting else None
        if trial_id is None:  # through the study's storage: Optuna's trial cache learns it
            trial_id = study._storage.create_new_trial(study._study_id)
        return trial_id


def ask_within_budget(
    study: optuna.Study,
    storage: optuna.storages.RDBStorage,
    lock: AskLock,
    n_trials: int,
    heartbeat_interval: int | None,
    attempts: bool = False,
) -> optuna.trial.Trial | None:
    """Count, then ask if the budget allows (atomically across processes).

    The trial is reserved under the lock (``reserve_trial``); the rest of what ``study.ask()``
    does, building the ``Trial`` (the sampler's ``before_trial``) and everything the sampler
    does later when parameters are suggested (``_loop.sample_trial``), runs after it."""
    import optuna

    trial_id = reserve_trial(study, storage, lock, n_trials, attempts)
    if trial_id is None:
        return None
    if heartbeat_interval:
        # A beat right away: a crash before the worker starts is detectable too.
        storage.record_heartbeat(trial_id)
    study._thread_local.cached_all_trials = None  # as study.ask(): sync the trials once
    return optuna.Trial(study, trial_id)


def _now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
