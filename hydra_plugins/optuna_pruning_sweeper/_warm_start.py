"""Warm start: a NEW study starts from what earlier studies learned (``hydra.sweeper.warm_start``).

For each source study (same or another storage; a name with ``*``/``?`` takes the newest
matching study with a finished trial), the COMPLETE trials whose params all fit the current
search space are copied in with Optuna's ``add_trials`` (values, params re-expressed in the
current distributions, intermediate values, user attrs), so the sampler learns from them; the
``top_k`` best of them (by this study's direction; the Pareto front for several objectives)
are queued first with ``enqueue_trial(skip_if_exists=True)``.

Rules that keep a warm start honest:

- Only a fresh study is warm-started (no trial of its own yet); the sources it took are kept
  in the study user attr ``SOURCES_ATTR`` and each copy names its origin in the trial user
  attr ``COPY_ATTR``, so a re-run adds nothing twice (also after a crash half-way).
- A source that does not exist, or has other directions or other objective names, is refused
  before any trial runs (``WarmStartError``, naming the study, its redacted storage and the
  setting).
- Copies are not this sweep's trials: ``own_trials`` leaves them out of the budget count,
  the epoch budget and the best trial. The enqueued top-k are this sweep's trials: they run,
  and count, as any other, except that the pruner never stops them (``never_pruned``): a
  Hyperband bracket had pruned a source's best configuration after 4 epochs, so the warm
  sweep never measured the best it was given (benchmarks/search_efficiency.py, warm).

Optuna is imported inside the functions (the plugin scan imports ``_study``, which imports
this module).
"""

from __future__ import annotations

import collections
import fnmatch
import json
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ._storage import absolute_sqlite, redact, storage_kwargs

if TYPE_CHECKING:
    import optuna
    from optuna.distributions import BaseDistribution
    from optuna.trial import FrozenTrial

log = logging.getLogger(__name__.replace("._", "."))

SETTING = "hydra.sweeper.warm_start"
COPY_ATTR = "warm_start_from"  # trial user attr of a copy: {study, storage, number}
TOP_ATTR = "warm_start_top"  # trial user attr of an enqueued top config: {study, storage, number}
SOURCES_ATTR = "sweeper_warm_start"  # study user attr: what each source gave


class WarmStartError(ValueError):
    """A warm-start source cannot be used (missing, other directions or objective)."""


@dataclass(frozen=True)
class Source:
    """One entry of ``hydra.sweeper.warm_start.studies``; ``url`` None = the sweep's storage."""

    study_name: str
    url: str | None = None

    @property
    def is_pattern(self) -> bool:
        return any(c in self.study_name for c in "*?[")


@dataclass(frozen=True)
class Request:
    """The validated setting, plus the objective names this sweep reports (may be empty)."""

    sources: tuple[Source, ...]
    top_k: int
    metric_names: tuple[str, ...] = ()


@dataclass
class _Plan:
    """A resolved source: its study, trials that fit (re-expressed) and the count left out."""

    source: Source
    study: optuna.Study
    url: str
    fits: list[FrozenTrial]
    left_out: collections.Counter[str]


def request_from(setting: Any, metric_names: Sequence[str] = (), engine: str = "optuna"
                 ) -> Request | None:
    """``hydra.sweeper.warm_start`` (``studies``, ``top_k``) -> a Request; None when empty.

    Raises:
        WarmStartError: a malformed entry, a negative ``top_k``, or the keras_tuner engine
            (its oracle cannot take Optuna's trials).
    """
    studies = list(getattr(setting, "studies", None) or [])
    if not studies:
        return None
    if engine != "optuna":
        raise WarmStartError(f"{SETTING} needs hydra.sweeper.engine=optuna (keras-tuner's "
                             f"oracle cannot take Optuna's trials); got engine={engine}")
    top_k = int(setting.top_k)
    if top_k < 0:
        raise WarmStartError(f"{SETTING}.top_k must be >= 0, got {top_k}")
    sources = tuple(dict.fromkeys(_source(entry) for entry in studies))  # each once
    return Request(sources, top_k, tuple(metric_names))


def _source(entry: Any) -> Source:
    """``"name"`` or ``{study_name: name, storage: url}`` -> Source."""
    if isinstance(entry, str) and entry:
        return Source(entry)
    get = entry.get if hasattr(entry, "get") else None
    name = get("study_name") if get else None
    unknown = set(entry.keys()) - {"study_name", "storage"} if get else set()
    if not name or unknown:
        raise WarmStartError(
            f"{SETTING}.studies: each entry is a study name or {{study_name: <name>, "
            f"storage: <URL>}}; got {redact(str(entry))}")
    storage = get("storage")
    return Source(str(name), absolute_sqlite(str(storage)) if storage else None)


def is_copy(trial: FrozenTrial) -> bool:
    """Whether ``trial`` was added by a warm start (not run by this study)."""
    return COPY_ATTR in trial.user_attrs


def never_pruned(user_attrs: dict[str, Any]) -> bool:
    """Whether a trial (by its user attrs) is a warm start's enqueued top configuration: it
    trains to its end (it still reports, so other trials' pruners compare against it)."""
    return TOP_ATTR in user_attrs


def own_trials(trials: Iterable[FrozenTrial]) -> list[FrozenTrial]:
    """The trials this study ran or will run: every trial but the warm-start copies."""
    return [t for t in trials if not is_copy(t)]


def own_best(trials: Iterable[FrozenTrial], directions: Sequence[Any]) -> list[FrozenTrial]:
    """This study's best COMPLETE trial (one objective) or its Pareto front; [] before one.

    ``study.best_trial`` would also see the copies: their values came from another study
    (maybe other data) and no run of this sweep holds their model.
    """
    done = [t for t in own_trials(trials) if t.state.name == "COMPLETE"]
    signs = [1.0 if d.name == "MINIMIZE" else -1.0 for d in directions]
    if len(signs) == 1:
        return [min(done, key=lambda t: signs[0] * t.values[0])] if done else []
    return [t for t in done if not any(_dominates(o, t, signs) for o in done)]


def apply(study: optuna.Study, storage: optuna.storages.BaseStorage,
          request: Request | None, fingerprint: dict[str, Any]) -> None:
    """Warm-start ``study`` (call under the ask lock, right after opening it).

    Raises:
        WarmStartError: a source is missing or incompatible (nothing is added then).
    """
    if request is None:
        return
    done = {_source_key(s) for s in study.user_attrs.get(SOURCES_ATTR, [])}
    todo = [s for s in request.sources if _source_key(_described(s, storage)) not in done]
    if not todo:
        return
    trials = storage.get_all_trials(study._study_id, deepcopy=False)
    if not _fresh(trials):
        log.info("warm start: study '%s' already has trials of its own; %s seeds a new "
                 "study only (nothing added)", study.study_name, SETTING)
        return
    space = _space(fingerprint)
    # every source is opened and checked before the study changes at all
    plans = [(s, _plan(s, storage, study, request, space)) for s in todo]
    tops = [_top(p.fits, study.directions, request.top_k) if p else [] for _, p in plans]
    # Enqueue before adding: skip_if_exists also matches COMPLETE trials, so a top config
    # added first would never be queued to run again.
    for top in tops:
        for t in top:
            study.enqueue_trial(dict(t.params), user_attrs={TOP_ATTR: t.user_attrs[COPY_ATTR]},
                                skip_if_exists=True)
    have = {_origin(t) for t in trials if is_copy(t)}
    for (source, p), top in zip(plans, tops, strict=True):
        described = _described(source, storage)
        if p is not None:
            study.add_trials(t for t in p.fits if _origin(t) not in have)
            described.update(study=p.study.study_name, added=len(p.fits),
                             left_out=sum(p.left_out.values()), enqueued=len(top))
            _say(p, len(top), space)
        _record(study, described)


def _fresh(trials: Sequence[FrozenTrial]) -> bool:
    """No trial of its own: only copies and still-queued top configs (a half-done start)."""
    return all(is_copy(t) or (t.state.name == "WAITING" and TOP_ATTR in t.user_attrs)
               for t in trials)


def _space(fingerprint: dict[str, Any]) -> dict[str, BaseDistribution]:
    """Param name -> distribution of the current search space (from its fingerprint)."""
    from optuna.distributions import json_to_distribution

    return {name: json_to_distribution(entry["distribution"])
            for name, entry in (fingerprint.get("params") or {}).items()}


def _plan(source: Source, storage: optuna.storages.BaseStorage, study: optuna.Study,
          request: Request, space: dict[str, BaseDistribution]) -> _Plan | None:
    """Open and check one source; None for a pattern that matches no earlier study."""
    url = source.url or storage.url
    src_storage = storage if source.url in (None, storage.url) else _open(url)
    name = _resolve(source, src_storage, url, study) if source.is_pattern else source.study_name
    if name is None:
        return None
    if name == study.study_name and src_storage is storage:
        raise WarmStartError(f"{SETTING}: study '{name}' is the study being started "
                             f"({redact(url)}); name an earlier one")
    src = _load(name, src_storage, url)
    _check_compatible(src, study, request, url)
    fits, left_out = _fitting(src, space, {"study": name, "storage": redact(url)})
    return _Plan(source, src, url, fits, left_out)


def _open(url: str) -> optuna.storages.RDBStorage:
    """A source storage, read as it is: a missing SQLite file is refused, never created."""
    import optuna
    from sqlalchemy.engine import make_url

    if url.startswith("sqlite"):
        db = make_url(url).database
        if db and db != ":memory:" and not os.path.exists(db):
            raise WarmStartError(f"{SETTING}: storage {redact(url)} does not exist (no such "
                                 "SQLite file); fix the entry's storage URL")
    try:
        return optuna.storages.RDBStorage(url, **storage_kwargs(url), skip_table_creation=True)
    except Exception as error:  # noqa: BLE001 - any driver error: Optuna wraps SQLAlchemy's
        cause = error.__cause__ or error
        raise WarmStartError(f"{SETTING}: storage {redact(url)} cannot be opened: "
                             f"{redact(str(cause).splitlines()[0])}") from None


def _resolve(source: Source, storage: optuna.storages.BaseStorage, url: str,
             study: optuna.Study) -> str | None:
    """The newest study matching the pattern (not this one) with a COMPLETE trial."""
    from optuna.trial import TrialState

    found = [s for s in storage.get_all_studies()
             if fnmatch.fnmatchcase(s.study_name, source.study_name)
             and not (s.study_name == study.study_name and s._study_id == study._study_id)]
    for s in sorted(found, key=lambda s: s._study_id, reverse=True):
        if storage.get_all_trials(s._study_id, deepcopy=False, states=(TrialState.COMPLETE,)):
            log.info("warm start: '%s' -> '%s' (the newest matching study with a finished "
                     "trial in %s)", source.study_name, s.study_name, redact(url))
            return s.study_name
    log.info("warm start: no earlier study matching '%s' with a finished trial in %s: a cold "
             "start", source.study_name, redact(url))
    return None


def _load(name: str, storage: optuna.storages.BaseStorage, url: str) -> optuna.Study:
    """The source study; a missing one is refused with the names that do exist."""
    import optuna

    try:
        names = [s.study_name for s in storage.get_all_studies()]
    except Exception as error:  # noqa: BLE001 - any driver error: not a readable study store
        raise WarmStartError(f"{SETTING}: storage {redact(url)} holds no Optuna studies "
                             f"({redact(type(error).__name__)})") from None
    if name not in names:
        listed = ", ".join(sorted(names)[:10]) or "none"
        raise WarmStartError(
            f"{SETTING}: study '{name}' does not exist in {redact(url)} (studies there: "
            f"{listed}); fix the name or its storage, or drop the entry")
    return optuna.load_study(study_name=name, storage=storage,
                             sampler=optuna.samplers.RandomSampler())


def _check_compatible(src: optuna.Study, study: optuna.Study, request: Request,
                      url: str) -> None:
    """Same directions and (where both are named) the same objectives, else refuse."""
    mine = [d.name.lower() for d in study.directions]
    theirs = [d.name.lower() for d in src.directions]
    problem = None
    if theirs != mine:
        problem = f"directions {theirs}, this sweep's are {mine}"
    elif request.metric_names and src.metric_names and \
            list(src.metric_names) != list(request.metric_names):
        problem = f"objective {src.metric_names}, this sweep's is {list(request.metric_names)}"
    if problem:
        raise WarmStartError(
            f"{SETTING}: study '{src.study_name}' in {redact(url)} has {problem}: its values "
            "cannot inform this sweep; drop the entry or warm-start from a study of the same "
            "objective")


def _fitting(src: optuna.Study, space: dict[str, BaseDistribution], origin: dict[str, Any]
             ) -> tuple[list[FrozenTrial], collections.Counter[str]]:
    """The source's COMPLETE trials that fit ``space``, as copies; the reasons of the rest."""
    from optuna.trial import TrialState

    fits: list[FrozenTrial] = []
    left_out: collections.Counter[str] = collections.Counter()
    for t in src.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        copy_or_reason = _copy(t, space, {**origin, "number": t.number})
        if isinstance(copy_or_reason, str):
            left_out[copy_or_reason] += 1
        else:
            fits.append(copy_or_reason)
    return fits, left_out


def _copy(trial: FrozenTrial, space: dict[str, BaseDistribution],
          origin: dict[str, Any]) -> FrozenTrial | str:
    """``trial`` re-expressed in the current distributions, or why it does not fit.

    Params keep their values but take the current distributions: Optuna refuses a
    categorical whose choices differ from the study's, and the sampler reads them as this
    space's. System attrs are dropped (a source's retry history or pruner rungs name trial
    numbers of the source study, not of this one).
    """
    from optuna.trial import FrozenTrial

    params: dict[str, Any] = {}
    for name, value in trial.params.items():
        dist = space.get(name)
        if dist is None:
            return f"param '{name}' not in the current space"
        try:
            internal = dist.to_internal_repr(value)
            fits = dist._contains(internal)
        except (ValueError, TypeError):
            fits = False
        if not fits:
            return f"param '{name}' outside the current space"
        params[name] = dist.to_external_repr(internal)
    return FrozenTrial(
        number=0, trial_id=0, state=trial.state, value=None, values=list(trial.values),
        datetime_start=trial.datetime_start, datetime_complete=trial.datetime_complete,
        params=params, distributions={n: space[n] for n in params},
        user_attrs={**trial.user_attrs, COPY_ATTR: origin}, system_attrs={},
        intermediate_values=dict(trial.intermediate_values),
    )


def _top(fits: Sequence[FrozenTrial], directions: Sequence[Any], k: int) -> list[FrozenTrial]:
    """The ``k`` best distinct configs: by value, or the Pareto front for several objectives."""
    signs = [1.0 if d.name == "MINIMIZE" else -1.0 for d in directions]
    ranked = sorted(fits, key=lambda t: [s * v for s, v in zip(signs, t.values, strict=True)])
    if len(signs) > 1:
        ranked = [t for t in ranked if not any(_dominates(o, t, signs) for o in ranked)]
    out: list[FrozenTrial] = []
    seen: set[str] = set()
    for t in ranked:
        key = json.dumps(t.params, sort_keys=True, default=str)
        if key not in seen and len(out) < k:
            seen.add(key)
            out.append(t)
    return out


def _dominates(a: FrozenTrial, b: FrozenTrial, signs: Sequence[float]) -> bool:
    """Whether ``a`` is at least as good as ``b`` in every objective and better in one."""
    pairs = [(s * x, s * y) for s, x, y in zip(signs, a.values, b.values, strict=True)]
    return all(x <= y for x, y in pairs) and any(x < y for x, y in pairs)


def _origin(trial: FrozenTrial) -> tuple[Any, ...]:
    """(storage, study, number) a copy came from."""
    o = trial.user_attrs[COPY_ATTR]
    return o.get("storage"), o.get("study"), o.get("number")


def _described(source: Source, storage: optuna.storages.BaseStorage) -> dict[str, Any]:
    """The entry as recorded in ``SOURCES_ATTR`` (its storage redacted)."""
    return {"entry": source.study_name, "storage": redact(source.url or storage.url)}


def _source_key(described: dict[str, Any]) -> tuple[Any, Any]:
    return described.get("entry"), described.get("storage")


def _record(study: optuna.Study, described: dict[str, Any]) -> None:
    """Append one source's outcome to the study's ``SOURCES_ATTR``."""
    sources = list(study.user_attrs.get(SOURCES_ATTR, []))
    study.set_user_attr(SOURCES_ATTR, sources + [described])


def _say(plan: _Plan, enqueued: int, space: dict[str, BaseDistribution]) -> None:
    """One line per source: added, left out (with the commonest reasons), queued first."""
    left = sum(plan.left_out.values())
    why = "; ".join(f"{n}x {r}" if len(plan.left_out) > 1 else r
                    for r, n in plan.left_out.most_common(3))
    seen = {n for t in plan.fits for n in t.params}
    new = sorted(set(space) - seen) if plan.fits else []
    log.info(
        "warm start: %d trials from '%s' added, %d left out%s; %d best queued first%s",
        len(plan.fits), plan.study.study_name, left, f" ({why})" if why else "", enqueued,
        f"; not in its trials (sampled afresh): {', '.join(new)}" if new else "",
    )
