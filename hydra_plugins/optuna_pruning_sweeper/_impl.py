"""The sweep loop: study, ask lock, conditional sampling, worker slots, limits, summary.

Decides (Optuna, in this process) and runs (Hydra jobs, in worker processes) stay apart:
the sweeper asks a trial and samples its params here; a worker process runs the job and
tells the final state (see ``worker``).

Counting rule for ``n_trials`` (``count_toward_budget``): COMPLETE + PRUNED + FAIL + RUNNING,
minus each FAIL trial that was re-queued as a retry (Optuna's
``RetryHeartbeatStaleTrialCallback`` system attrs name it). WAITING trials (queued retries)
do not count: the next ask runs them. The count and the ask happen under one ask lock, so
several sweeper processes on one storage hold exactly ``n_trials`` counted trials in total.

Ask lock: SQLite -> ``fcntl.flock`` on ``<db>.ask.lock`` (same host or a filesystem with
working flock); PostgreSQL -> ``pg_advisory_lock``; MySQL -> ``GET_LOCK``; other URLs -> a
process-local lock only (best effort: concurrent sweepers may overshoot ``n_trials``).

Stale trials: at start and every ``heartbeat_interval`` seconds the sweeper runs
``optuna.storages.fail_stale_trials``: a RUNNING trial whose heartbeat stopped for
``grace_period`` seconds (its sweeper or machine died) becomes FAIL and a WAITING copy with
the same params is queued (up to ``max_retry`` times). A sweeper that has nothing left to
ask but sees other processes' RUNNING trials waits up to ``grace_period + 2 *
heartbeat_interval`` seconds for them to turn stale, so a re-run right after a crash ends
with the crashed trial retried and exactly ``n_trials`` counted (a live trial outlasts the
wait; its own sweeper finishes it). Ctrl-C: workers tell their trials FAIL and queue a
retry, so re-running the same command continues without losing or repeating a trial.

Workers tell through a study loaded with a RandomSampler, so a sampler's ``after_trial``
hook does not run; Optuna's built-in samplers keep their state in the storage.

For Hydra callbacks in the sweeper process: as soon as the study is open,
``OPTUNA_SWEEPER_STUDY`` and ``OPTUNA_SWEEPER_STORAGE`` are set in ``os.environ`` (the name
actually used, e.g. after ``new_study=true``); the summary is also written to
``<hydra.sweep.dir>/optuna_summary.yaml`` before ``on_multirun_end``.
"""

from __future__ import annotations

import collections
import contextlib
import datetime as dt
import fcntl
import hashlib
import json
import logging
import math
import multiprocessing
import os
import pickle
import shutil
import socket
import subprocess
import threading
import time
import warnings
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import yaml
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf
from optuna.distributions import CategoricalDistribution
from optuna.trial import FrozenTrial, TrialState

from . import trial_context as tc
from .distributions import (
    Param,
    SearchSpace,
    condition_parent,
    explicit_condition_holds,
    format_override,
    grid_values,
    params_to_overrides,
    parse_search_space,
    suggest,
)
from .worker import TrialOutcome, TrialTask, WorkerSetup, init_worker, run_trial

log = logging.getLogger(__name__)

SPACE_ATTR = "sweeper_search_space"
SESSIONS_ATTR = "sweeper_sessions"
OVERRIDES_ATTR = "overrides"
SUMMARY_FILE = "optuna_summary.yaml"
COUNTED_STATES = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL, TrialState.RUNNING)
# Optional dependencies of samplers: (module to import, pip hint).
SAMPLER_DEPENDENCIES = {
    "CmaEsSampler": [("cmaes", "pip install cmaes")],
    "GPSampler": [("torch", "pip install torch"), ("scipy", "pip install scipy")],
}


class SearchSpaceChangedError(RuntimeError):
    """The stored study was created with another search space."""


# --- pure helpers -----------------------------------------------------------------------------


def retried_numbers(trials: Iterable[FrozenTrial]) -> set[int]:
    """Numbers of FAIL trials that were re-queued as a retry.

    Each retry copy carries ``retry_history`` (see
    ``RetryHeartbeatStaleTrialCallback.retry_history``): its last item is the trial it
    replaces.
    """
    out: set[int] = set()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        for t in trials:
            history = optuna.storages.RetryHeartbeatStaleTrialCallback.retry_history(t)
            if history:
                out.add(history[-1])
    return out


def count_toward_budget(trials: Sequence[FrozenTrial]) -> int:
    """Trials that use up ``n_trials``: finished or running, minus retried failures."""
    retried = retried_numbers(trials)
    return sum(
        1
        for t in trials
        if t.state in COUNTED_STATES and not (t.state == TrialState.FAIL and t.number in retried)
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


def detect_gpus() -> list[str]:
    """GPU ids visible to workers, without importing a deep-learning framework.

    ``CUDA_VISIBLE_DEVICES`` when set (empty or -1 = none), else ``nvidia-smi -L``.
    """
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        ids = [x.strip() for x in visible.split(",") if x.strip()]
        return [] if not ids or ids[0] == "-1" else ids
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=20, check=True)
    except (OSError, subprocess.SubprocessError):
        return []
    return [
        line.split(":", 1)[0].split()[1]
        for line in out.stdout.splitlines()
        if line.startswith("GPU ")
    ]


def available_cores() -> int:
    """CPU cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def check_sampler_dependencies(target: str) -> None:
    """Raise a clear ImportError when a sampler's optional dependency is missing."""
    import importlib.util

    for module, hint in SAMPLER_DEPENDENCIES.get(target.rsplit(".", 1)[-1], []):
        if importlib.util.find_spec(module) is None:
            raise ImportError(
                f"{target} needs the '{module}' package, which is not installed: `{hint}` "
                "(or choose another hydra/sweeper/sampler)"
            )


def build_sampler(
    sampler_cfg: Any, space: SearchSpace, seed_offset: int = 0
) -> optuna.samplers.BaseSampler:
    """Sampler from its ``_target_`` config; the grid sampler gets the grid of ``space``."""
    spec = _to_dict(sampler_cfg)
    target = spec.get("_target_", "")
    check_sampler_dependencies(target)
    if spec.get("seed") is not None:
        spec["seed"] = int(spec["seed"]) + seed_offset
    if target.endswith("GridSampler"):
        spec["search_space"] = {name: grid_values(p) for name, p in space.params.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return instantiate(spec)


def build_pruner(pruner_cfg: Any) -> optuna.pruners.BasePruner:
    """Pruner from its ``_target_`` config (None -> NopPruner)."""
    return tc.build_pruner(json.dumps(_to_dict(pruner_cfg)) if pruner_cfg else None)


def grid_size(space: SearchSpace) -> int:
    """Number of grid points of ``space``."""
    return math.prod(len(grid_values(p)) for p in space.params.values())


def _to_dict(cfg: Any) -> dict[str, Any]:
    if cfg is None:
        return {}
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    return dict(cfg)


def _has_key(cfg: Any, dotted: str) -> bool:
    """Whether ``dotted`` exists in ``cfg`` (MISSING / unresolved values count as present)."""
    node = cfg
    for part in dotted.split("."):
        if isinstance(node, DictConfig):
            if part not in node.keys():  # noqa: SIM118 - `in node` is False for ???
                return False
            node = node._get_node(part)
        elif isinstance(node, ListConfig) and part.isdigit() and int(part) < len(node):
            node = node._get_node(int(part))
        else:
            return False
    return True


# --- ask lock ---------------------------------------------------------------------------------


class AskLock:
    """Makes count-then-ask (and study creation) atomic across sweeper processes."""

    def __init__(self, url: str, study_name: str) -> None:
        self.url = url
        self.study_name = study_name
        self._local = threading.Lock()
        self._file: Any = None
        self._engine: Any = None
        self.kind = "local"
        if url.startswith("sqlite"):
            from sqlalchemy.engine import make_url

            db = make_url(url).database
            if db and db != ":memory:":
                self.path = Path(db).with_name(Path(db).name + ".ask.lock")
                self.kind = "flock"
        elif url.startswith(("postgresql", "postgres")):
            self.kind = "postgresql"
        elif url.startswith("mysql"):
            self.kind = "mysql"
        else:
            log.warning(
                "No cross-process ask lock for storage %s: several sweepers on this study may "
                "overshoot n_trials (use SQLite, PostgreSQL or MySQL).",
                url.split(":", 1)[0],
            )

    def _key(self) -> int:
        digest = hashlib.sha256(f"optuna-sweeper:{self.study_name}".encode()).digest()
        return int.from_bytes(digest[:8], "big", signed=True)

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        with self._local:
            if self.kind == "flock":
                if self._file is None:
                    self.path.parent.mkdir(parents=True, exist_ok=True)
                    self._file = open(self.path, "a+")  # noqa: SIM115 - kept for the sweep
                fcntl.flock(self._file.fileno(), fcntl.LOCK_EX)
                try:
                    yield
                finally:
                    fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
            elif self.kind in ("postgresql", "mysql"):
                import sqlalchemy

                if self._engine is None:
                    self._engine = sqlalchemy.create_engine(
                        self.url, poolclass=sqlalchemy.pool.NullPool
                    )
                with self._engine.connect() as conn:
                    if self.kind == "postgresql":
                        lock = "SELECT pg_advisory_lock(:k)"
                        unlock = "SELECT pg_advisory_unlock(:k)"
                        args: dict[str, Any] = {"k": self._key()}
                    else:
                        lock, unlock = "SELECT GET_LOCK(:k, -1)", "SELECT RELEASE_LOCK(:k)"
                        args = {"k": f"optuna-sweeper:{self.study_name}"[:64]}
                    conn.execute(sqlalchemy.text(lock), args)
                    try:
                        yield
                    finally:
                        conn.execute(sqlalchemy.text(unlock), args)
                        conn.commit()
            else:
                yield

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None


# --- conditional params -----------------------------------------------------------------------


class ConditionResolver:
    """Decides which params and fixed overrides apply, given the options chosen so far."""

    def __init__(self, space: SearchSpace, config_loader: Any, master_config: DictConfig) -> None:
        self.space = space
        self.config_loader = config_loader
        self.master_config = master_config
        repo = getattr(config_loader, "repository", None)
        self.groups: dict[str, Param] = {}  # config key -> swept group param
        for p in space.params.values():
            if isinstance(p.distribution, CategoricalDistribution) and repo is not None:
                group_path = p.key.replace(".", "/")
                if repo.group_exists(group_path):
                    self._check_options(repo, group_path, p)
                    self.groups[p.key] = p
        self._parents = {
            key: condition_parent(key, list(self.groups))
            for key in [p.key for p in space.params.values()] + list(space.fixed)
        }
        self._base_lines = [f.line for f in space.fixed.values() if self._parents[f.key] is None]
        self._composed: dict[tuple[str, Any], Any] = {}

    @staticmethod
    def _check_options(repo: Any, group_path: str, p: Param) -> None:
        assert isinstance(p.distribution, CategoricalDistribution)
        missing = [c for c in p.distribution.choices if not repo.config_exists(f"{group_path}/{c}")]
        if missing:
            raise ValueError(
                f"hydra.sweeper.params.{p.name}: option(s) {missing} not found in config group "
                f"'{group_path}' (available: {repo.get_group_options(group_path)})"
            )

    def order(self) -> list[Param]:
        """Params in sampling order: parents (shallow keys) first, explicit conditions last."""
        return sorted(
            self.space.params.values(),
            key=lambda p: (p.when is not None, p.key.count("."), p.name),
        )

    def parent(self, key: str) -> Param | None:
        """The swept group a key depends on (None for unconditional keys)."""
        g = self._parents.get(key)
        return self.groups[g] if g is not None else None

    def is_active(
        self, key: str, when: dict[str, list[str]] | None, chosen: dict[str, Any]
    ) -> bool:
        """Whether a param / fixed override with ``key`` applies to this trial."""
        if when is not None:
            return explicit_condition_holds(when, chosen)
        group = self.parent(key)
        if group is None:
            return True
        if group.name not in chosen:  # its group was not sampled itself
            return False
        return self.option_has_key(group, chosen[group.name], key)

    def option_has_key(self, group: Param, option: Any, key: str) -> bool:
        """Whether ``key`` exists when ``group`` is set to ``option``."""
        cache_key = (group.name, option)
        if cache_key not in self._composed:
            self._composed[cache_key] = self._compose(group, option)
        return _has_key(self._composed[cache_key], key)

    def _compose(self, group: Param, option: Any) -> Any:
        line = format_override(group.name, option)
        try:
            return self.config_loader.load_sweep_config(
                self.master_config, [*self._base_lines, line]
            )
        except Exception as compose_error:  # noqa: BLE001 - fall back to the option's own file
            repo = self.config_loader.repository
            group_path = group.key.replace(".", "/")
            result = repo.load_config(f"{group_path}/{option}")
            if result is None:
                raise RuntimeError(
                    f"cannot tell which keys option '{option}' of swept group '{group.name}' "
                    f"has: composing with {line!r} failed ({compose_error}) and "
                    f"'{group_path}/{option}' was not found"
                ) from compose_error
            log.debug("compose with %s failed (%s); using the option file", line, compose_error)
            # Keys of the option file are relative to the group's package.
            return _nest(group.key, result.config if result.config is not None else {})


def _nest(dotted: str, cfg: Any) -> DictConfig:
    root: dict[str, Any] = {}
    node = root
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = cfg
    return OmegaConf.create(root)


# --- the sweeper ------------------------------------------------------------------------------


@dataclass
class _InFlight:
    trial_id: int
    number: int
    slot: int
    started: float


class OptunaPruningSweeperImpl(Sweeper):
    """Optuna sweeper with pruning, worker processes, resume and shared studies."""

    def __init__(
        self,
        sampler: Any,
        pruner: Any,
        direction: Any,
        storage: str | None,
        study_name: str | None,
        n_trials: int,
        n_jobs: int,
        timeout: float | None,
        max_failure_rate: float,
        failure_rate_min_trials: int | None,
        trials_per_worker: int | None,
        threads_per_worker: int | None,
        heartbeat_interval: int | None,
        grace_period: int | None,
        max_retry: int | None,
        new_study: bool,
        params: Any,
    ) -> None:
        if n_trials < 0 or n_jobs < 1:
            raise ValueError(f"need n_trials >= 0 and n_jobs >= 1, got {n_trials}, {n_jobs}")
        if not 0.0 <= max_failure_rate <= 1.0:
            raise ValueError(f"max_failure_rate must be in [0, 1], got {max_failure_rate}")
        if trials_per_worker is not None and trials_per_worker < 0:
            raise ValueError(f"trials_per_worker must be >= 1 or null, got {trials_per_worker}")
        self.sampler_cfg = sampler
        self.pruner_cfg = pruner
        self.directions = directions_of(direction)
        self.storage_url = storage
        self.study_name = study_name
        self.n_trials = n_trials
        self.n_jobs = n_jobs
        self.timeout = timeout
        self.max_failure_rate = max_failure_rate
        self.failure_rate_min_trials = failure_rate_min_trials
        self.trials_per_worker = trials_per_worker or None  # 0 / null = reuse
        self.threads_per_worker = threads_per_worker
        self.heartbeat_interval = heartbeat_interval
        self.grace_period = grace_period
        self.max_retry = max_retry
        self.new_study = new_study
        self.params = params
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None
        self.task_function: TaskFunction | None = None

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        self.config = config
        self.hydra_context = hydra_context
        self.task_function = task_function

    # -- study -------------------------------------------------------------------------------

    def _default_storage(self) -> str:
        assert self.config is not None
        cwd = self.config.hydra.runtime.cwd
        return f"sqlite:///{Path(cwd, 'mlruns', 'optuna.db')}"

    def _default_study_name(self) -> str:
        assert self.config is not None
        name = str(self.config.hydra.job.name)
        choice = OmegaConf.select(self.config, "hydra.runtime.choices.search_space")
        return f"{name}-{choice}" if choice else name

    def _make_storage(self, url: str) -> optuna.storages.RDBStorage:
        if url.startswith("sqlite"):
            from sqlalchemy.engine import make_url

            db = make_url(url).database
            if db and db != ":memory:":
                Path(db).parent.mkdir(parents=True, exist_ok=True)
        callback = None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            if self.heartbeat_interval:
                callback = optuna.storages.RetryHeartbeatStaleTrialCallback(
                    max_retry=self.max_retry
                )
            return optuna.storages.RDBStorage(
                url,
                **tc.storage_kwargs(url),
                heartbeat_interval=self.heartbeat_interval or None,
                grace_period=self.grace_period if self.heartbeat_interval else None,
                heartbeat_stale_trial_callback=callback,
            )

    def _open_study(
        self,
        storage: optuna.storages.RDBStorage,
        base_name: str,
        fingerprint: dict[str, Any],
        pruner: optuna.pruners.BasePruner,
    ) -> tuple[optuna.Study, int]:
        """Load or create the study (under the ask lock); returns it and the session index."""
        existing = set(optuna.get_all_study_names(storage))
        name, k = base_name, 1
        while True:
            if name not in existing:
                study = optuna.create_study(
                    storage=storage,
                    study_name=name,
                    directions=self.directions,
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
            if not self.new_study:
                raise SearchSpaceChangedError(
                    f"Study '{name}' in {_redact(storage.url)} was created with another "
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

    # -- sampling -------------------------------------------------------------------------------

    def _ask(
        self, study: optuna.Study, storage: optuna.storages.RDBStorage, lock: AskLock
    ) -> optuna.trial.Trial | None:
        """Count, then ask if the budget allows (atomically across processes)."""
        with lock():
            trials = storage.get_all_trials(study._study_id, deepcopy=False)
            if count_toward_budget(trials) >= self.n_trials:
                return None
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Heartbeat of storage")
                trial = study.ask()
            if self.heartbeat_interval:
                # A beat right away: a crash before the worker starts is detectable too.
                storage.record_heartbeat(trial._trial_id)
        return trial

    def _sample(
        self, trial: optuna.trial.Trial, resolver: ConditionResolver
    ) -> tuple[dict[str, Any], list[str]]:
        """Sample the active params of ``trial``; returns (params, override lines)."""
        chosen: dict[str, Any] = {}
        for p in resolver.order():
            if resolver.is_active(p.key, p.when, chosen):
                chosen[p.name] = suggest(trial, p)
        lines = [
            f.line for f in resolver.space.fixed.values() if resolver.is_active(f.key, None, chosen)
        ]
        lines += [format_override(name, value) for name, value in chosen.items()]
        return chosen, lines

    # -- sweep ----------------------------------------------------------------------------------

    def sweep(self, arguments: list[str]) -> dict[str, Any]:
        assert self.config is not None and self.hydra_context is not None
        assert self.task_function is not None
        t0 = time.monotonic()
        config = self.config

        param_lines, conditions = params_to_overrides(
            OmegaConf.to_container(self.params, resolve=False)
            if isinstance(self.params, DictConfig)
            else self.params
        )
        space = parse_search_space([*param_lines, *arguments], conditions)
        if not space.params:
            raise ValueError(
                "The Optuna sweeper has nothing to sample: set hydra.sweeper.params "
                "(e.g. in a search_space file) or pass choice()/interval() overrides."
            )
        resolver = ConditionResolver(space, self.hydra_context.config_loader, config)
        target = str(_to_dict(self.sampler_cfg).get("_target_", ""))
        check_sampler_dependencies(target)
        n_trials = self.n_trials
        if target.endswith("GridSampler"):
            size = grid_size(space)
            if size < n_trials:
                log.info("Grid sampler: n_trials %d -> %d (the grid size)", n_trials, size)
                n_trials = size
        self.n_trials = n_trials

        url = _absolute_sqlite(self.storage_url or self._default_storage())
        if url.startswith("sqlite") and (":memory:" in url or url.rstrip("/") == "sqlite:"):
            raise ValueError(
                f"hydra.sweeper.storage={url!r} cannot be shared with worker processes: "
                "use a SQLite file (sqlite:///path/optuna.db) or a database server URL"
            )
        base_name = self.study_name or self._default_study_name()
        fingerprint = {**space.fingerprint(), "directions": self.directions}
        pruner = build_pruner(self.pruner_cfg)
        pruner_json = json.dumps(_to_dict(self.pruner_cfg)) if self.pruner_cfg else None
        lock = AskLock(url, base_name)
        with lock():  # also serializes table creation in a fresh database
            storage = self._make_storage(url)
            study, session = self._open_study(storage, base_name, fingerprint, pruner)
        study.sampler = build_sampler(self.sampler_cfg, space, seed_offset=session)
        os.environ[tc.ENV_STUDY] = study.study_name
        os.environ[tc.ENV_STORAGE] = url
        os.environ[tc.ENV_SAMPLER] = type(study.sampler).__name__

        sweep_dir = Path(str(config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(config, sweep_dir / "multirun.yaml")

        gpus = detect_gpus()
        threads = self.threads_per_worker or max(1, available_cores() // self.n_jobs)
        log.info(
            "Optuna sweeper: study '%s' in %s | sampler %s | pruner %s | %s | n_trials %d | "
            "n_jobs %d | %d threads/worker | GPUs %s | session %d",
            study.study_name,
            _redact(url),
            type(study.sampler).__name__,
            type(pruner).__name__,
            "/".join(self.directions),
            n_trials,
            self.n_jobs,
            threads,
            gpus or "none",
            session,
        )
        if gpus and self.n_jobs > len(gpus):
            log.warning("%d slots share %d GPUs", self.n_jobs, len(gpus))

        loop = _SweepLoop(
            sweeper=self,
            study=study,
            storage=storage,
            lock=lock,
            resolver=resolver,
            setup_common=self._worker_setup_common(url, study.study_name, pruner_json, threads),
            gpus=gpus,
            t0=t0,
        )
        try:
            stop_reason = loop.run()
        finally:
            lock.close()
        summary = self._summary(study, storage, loop, stop_reason, time.monotonic() - t0)
        self._write_summary(summary, sweep_dir)
        if stop_reason == "failure_rate":
            raise RuntimeError(loop.failure_message())
        return summary

    def _worker_setup_common(
        self, url: str, study_name: str, pruner_json: str | None, threads: int
    ) -> dict[str, Any]:
        assert self.task_function is not None and self.hydra_context is not None
        from hydra.core.singleton import Singleton

        fn = self.task_function
        payload = _pickle_payload(
            self.hydra_context.config_loader,
            self.hydra_context.callbacks,
            self.config,
            Singleton.get_state(),
        )
        env = {
            "OMP_NUM_THREADS": str(threads),
            "TF_NUM_INTRAOP_THREADS": str(threads),
            "TF_NUM_INTEROP_THREADS": str(threads),
            tc.ENV_THREADS: str(threads),
            tc.ENV_STUDY: study_name,
            tc.ENV_STORAGE: url,
            tc.ENV_SAMPLER: os.environ[tc.ENV_SAMPLER],
        }
        return {
            "payload": payload,
            "env": env,
            "parent_pid": os.getpid(),
            "task_module": fn.__module__,
            "task_qualname": fn.__qualname__,
            "storage_url": url,
            "study_name": study_name,
            "pruner_json": pruner_json,
            "n_objectives": len(self.directions),
            "heartbeat_interval": self.heartbeat_interval or None,
            "max_retry": self.max_retry,
        }

    def _summary(
        self,
        study: optuna.Study,
        storage: optuna.storages.RDBStorage,
        loop: _SweepLoop,
        stop_reason: str,
        elapsed: float,
    ) -> dict[str, Any]:
        trials = storage.get_all_trials(study._study_id, deepcopy=False)
        counts = collections.Counter(t.state.name for t in trials)
        summary: dict[str, Any] = {
            "study": study.study_name,
            "storage": _redact(loop.setup_common["storage_url"]),
            "sampler": type(study.sampler).__name__,
            "pruner": type(study.pruner).__name__,
            "directions": list(self.directions),
            "n_trials": self.n_trials,
            "counted": count_toward_budget(trials),
            "states": {s.name: counts.get(s.name, 0) for s in TrialState},
            "retried": len(retried_numbers(trials)),
            "this_session": dict(collections.Counter(o.state for o in loop.outcomes)),
            "stop_reason": stop_reason,
            "elapsed_s": round(elapsed, 1),
        }
        done = [t for t in trials if t.state == TrialState.COMPLETE]
        if len(self.directions) == 1:
            if done:
                best = study.best_trial
                summary["best"] = {
                    "number": best.number,
                    "value": float(best.value),
                    "params": dict(best.params),
                    "overrides": list(best.user_attrs.get(OVERRIDES_ATTR, [])),
                }
        elif done:
            summary["pareto_front"] = [
                {
                    "number": t.number,
                    "values": [float(v) for v in t.values],
                    "params": dict(t.params),
                }
                for t in study.best_trials
            ]
        return summary

    @staticmethod
    def _write_summary(summary: dict[str, Any], sweep_dir: Path) -> None:
        text = yaml.safe_dump(summary, sort_keys=False)
        (sweep_dir / SUMMARY_FILE).write_text(text)
        log.info("Sweep summary (%s):\n%s", sweep_dir / SUMMARY_FILE, text)


class _SweepLoop:
    """Keeps every slot busy: a new trial is submitted as soon as any slot frees."""

    def __init__(
        self,
        sweeper: OptunaPruningSweeperImpl,
        study: optuna.Study,
        storage: optuna.storages.RDBStorage,
        lock: AskLock,
        resolver: ConditionResolver,
        setup_common: dict[str, Any],
        gpus: list[str],
        t0: float,
    ) -> None:
        self.s = sweeper
        self.study = study
        self.storage = storage
        self.lock = lock
        self.resolver = resolver
        self.setup_common = setup_common
        self.gpus = gpus
        self.t0 = t0
        self.executors: dict[int, ProcessPoolExecutor] = {}
        self.slot_tasks: dict[int, int] = {}
        self.in_flight: dict[Future, _InFlight] = {}
        self.outcomes: list[TrialOutcome] = []
        self.min_finished = (
            sweeper.failure_rate_min_trials
            if sweeper.failure_rate_min_trials is not None
            else max(3, sweeper.n_jobs)
        )

    # -- slots --------------------------------------------------------------------------------

    def _gpu_of(self, slot: int) -> str | None:
        return self.gpus[slot % len(self.gpus)] if self.gpus else None

    def _slot_env(self, slot: int) -> dict[str, str]:
        env = dict(self.setup_common["env"])
        gpu = self._gpu_of(slot)
        if gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = gpu
        return env

    def _executor(self, slot: int) -> ProcessPoolExecutor:
        """The slot's single-process executor; replaced after ``trials_per_worker`` trials.

        The sweeper recycles workers itself (rather than ``max_tasks_per_child``, whose
        replacement process is spawned by the executor's thread at any moment) so that
        every worker is spawned here, in ``submit``, under the slot's environment.
        """
        limit = self.s.trials_per_worker
        if slot in self.executors and limit is not None and self.slot_tasks[slot] >= limit:
            self.executors.pop(slot).shutdown(wait=True)  # idle: the slot is free
        if slot not in self.executors:
            setup = WorkerSetup(**{**self.setup_common, "env": self._slot_env(slot)})
            self.executors[slot] = ProcessPoolExecutor(
                max_workers=1,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=init_worker,
                initargs=(setup,),
            )
            self.slot_tasks[slot] = 0
        return self.executors[slot]

    def _submit_to_slot(self, slot: int, task: TrialTask) -> Future:
        # A new worker is spawned inside submit(): it inherits the slot's environment from
        # process start, before the main script (and numpy / TF) is imported.
        for attempt in (1, 2):
            executor = self._executor(slot)
            try:
                with _environ(self._slot_env(slot)):
                    fut = executor.submit(run_trial, task)
            except BrokenProcessPool:
                self.executors.pop(slot, None)
                if attempt == 2:
                    raise
                continue
            self.slot_tasks[slot] += 1
            return fut
        raise AssertionError("unreachable")

    def _shutdown(self) -> None:
        for ex in self.executors.values():
            ex.shutdown(wait=True, cancel_futures=True)
        self.executors.clear()

    # -- loop -----------------------------------------------------------------------------------

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def run(self) -> str:
        """Run until the budget is used, the timeout passes or failures exceed the limit."""
        try:
            return self._run()
        except KeyboardInterrupt:
            log.warning(
                "Interrupted: waiting for %d running trial(s) to be told FAIL and re-queued "
                "(re-run the same command to continue the study).",
                len(self.in_flight),
            )
            raise
        finally:
            self._shutdown()

    def _run(self) -> str:
        s = self.s
        free = list(range(s.n_jobs))
        stop_reason: str | None = None
        last_stale_check = -math.inf
        idle_since: float | None = None
        poll = 1.0
        while True:
            beat = s.heartbeat_interval
            if beat and time.monotonic() - last_stale_check >= min(beat, 10):
                self._fail_stale()
                self._beat_own()
                last_stale_check = time.monotonic()
            if stop_reason is None:
                stop_reason = self._limit_reached()
            while free and stop_reason is None:
                trial = s._ask(self.study, self.storage, self.lock)
                if trial is None:
                    break
                self._submit(trial, free.pop(0))
            if not self.in_flight:
                if stop_reason is not None:
                    return stop_reason
                if beat and self._foreign_running():
                    # Another process's trial may be dead: it turns stale within the grace
                    # period and is re-queued for us. A live one outlasts this wait.
                    idle_since = time.monotonic() if idle_since is None else idle_since
                    grace = s.grace_period or 2 * beat
                    if time.monotonic() - idle_since <= grace + 2 * beat:
                        time.sleep(min(beat, 2))
                        continue
                return "n_trials"
            idle_since = None
            done, _ = wait(list(self.in_flight), timeout=poll, return_when=FIRST_COMPLETED)
            for fut in done:
                info = self.in_flight.pop(fut)
                self._collect(fut, info)
                free.append(info.slot)
            free.sort()

    def _limit_reached(self) -> str | None:
        if self.s.timeout is not None and self.elapsed() >= self.s.timeout:
            log.info("Timeout of %ss reached: no new trials.", self.s.timeout)
            return "timeout"
        finished = len(self.outcomes)
        fails = sum(1 for o in self.outcomes if o.state == "FAIL")
        if finished >= self.min_finished and fails / finished > self.s.max_failure_rate:
            log.error(self.failure_message())
            return "failure_rate"
        return None

    def failure_message(self) -> str:
        finished = len(self.outcomes)
        fails = [o for o in self.outcomes if o.state == "FAIL"]
        reasons = collections.Counter(o.reason or "?" for o in fails).most_common(3)
        listed = "\n".join(f"  {n}x {r[:300]}" for r, n in reasons)
        return (
            f"Sweep stopped: {len(fails)} of {finished} finished trials failed "
            f"({len(fails) / max(finished, 1):.0%} > max_failure_rate "
            f"{self.s.max_failure_rate:.0%}) in study '{self.study.study_name}'. "
            f"Most common fail reasons:\n{listed}\n"
            "Fix the cause (see each trial's log in the sweep dir), or raise "
            "hydra.sweeper.max_failure_rate."
        )

    def _submit(self, trial: optuna.trial.Trial, slot: int) -> None:
        try:
            params, lines = self.s._sample(trial, self.resolver)
        except Exception as e:
            info = _InFlight(trial._trial_id, trial.number, slot, time.monotonic())
            self._tell_fail(info, f"sampling failed: {type(e).__name__}: {e}")
            raise
        trial.set_user_attr(OVERRIDES_ATTR, lines)
        task = TrialTask(trial_id=trial._trial_id, number=trial.number, overrides=lines)
        fut = self._submit_to_slot(slot, task)
        self.in_flight[fut] = _InFlight(trial._trial_id, trial.number, slot, time.monotonic())
        gpu = self._gpu_of(slot)
        log.info(
            "[trial %d] started  slot %d%s | %s | elapsed %s",
            trial.number,
            slot,
            f" gpu {gpu}" if gpu is not None else "",
            " ".join(f"{k}={_fmt(v)}" for k, v in params.items()),
            _hms(self.elapsed()),
        )

    def _collect(self, fut: Future, info: _InFlight) -> None:
        try:
            outcome: TrialOutcome = fut.result()
        except BaseException as e:  # noqa: BLE001 - the worker could not tell: tell here
            if isinstance(e, BrokenProcessPool):
                reason = "worker process died abruptly (killed by a signal or out of memory?)"
                self.executors.pop(info.slot, None)
            else:
                reason = f"{type(e).__name__}: {e}"
            outcome = TrialOutcome(
                number=info.number,
                state="FAIL",
                values=None,
                reason=reason,
                duration_s=time.monotonic() - info.started,
                pid=-1,
            )
            self._tell_fail(info, reason)
        self.outcomes.append(outcome)
        self._progress(outcome)

    def _tell_fail(self, info: _InFlight, reason: str) -> None:
        with contextlib.suppress(Exception):
            self.storage.set_trial_user_attr(info.trial_id, "fail_reason", reason)
        try:
            self.study.tell(info.number, state=TrialState.FAIL, skip_if_finished=True)
        except Exception:  # noqa: BLE001 - storage trouble: stale detection will fail it
            log.exception("Could not tell trial %d as FAIL", info.number)

    def _progress(self, o: TrialOutcome) -> None:
        trials = self.storage.get_all_trials(self.study._study_id, deepcopy=False)
        counted = count_toward_budget(trials)
        if o.values is not None:
            value = " ".join(f"{v:.6g}" for v in o.values)
        elif o.state == "PRUNED":
            t = next((t for t in trials if t.number == o.number), None)
            value = f"{t.value:.6g} (last report)" if t is not None and t.value is not None else "-"
        else:
            value = "-"
        best = self._best_text(trials)
        reason = f" | {o.reason[:200]}" if o.reason else ""
        log.info(
            "[trial %d] %-8s value %s | best %s | %.1fs | elapsed %s | %d/%d counted%s",
            o.number,
            o.state,
            value,
            best,
            o.duration_s,
            _hms(self.elapsed()),
            counted,
            self.s.n_trials,
            reason,
        )

    def _best_text(self, trials: Sequence[FrozenTrial]) -> str:
        done = [t for t in trials if t.state == TrialState.COMPLETE]
        if not done:
            return "-"
        if len(self.s.directions) > 1:
            return f"pareto front of {len(self.study.best_trials)}"
        best = self.study.best_trial
        return f"{best.value:.6g} (#{best.number})"

    def _fail_stale(self) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            try:
                optuna.storages.fail_stale_trials(self.study)
            except Exception:  # noqa: BLE001 - retried next interval
                log.warning("fail_stale_trials failed", exc_info=True)

    def _beat_own(self) -> None:
        """Beat for own trials too (covers a worker still starting up)."""
        for info in self.in_flight.values():
            with contextlib.suppress(Exception):
                self.storage.record_heartbeat(info.trial_id)

    def _foreign_running(self) -> bool:
        own = {i.trial_id for i in self.in_flight.values()}
        trials = self.storage.get_all_trials(
            self.study._study_id, deepcopy=False, states=(TrialState.RUNNING,)
        )
        return any(t._trial_id not in own for t in trials)


# --- small helpers ----------------------------------------------------------------------------


@contextlib.contextmanager
def _environ(env: dict[str, str]) -> Iterator[None]:
    """Set environment variables for the duration of the block (main thread only)."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _pickle_payload(config_loader: Any, callbacks: Any, config: Any, state: Any) -> bytes:
    """Pickle Hydra's state for spawned workers (cloudpickle: resolvers are lambdas)."""
    try:
        import cloudpickle as cp
    except ImportError:  # plain pickle: workers keep their own OmegaConf resolvers
        cp = None
        state = {**state, "omegaconf_resolvers": None}
    dumps = cp.dumps if cp is not None else pickle.dumps
    try:
        dumps(callbacks)
    except Exception as e:  # noqa: BLE001 - workers re-create callbacks from the config
        log.info("Hydra callbacks are not picklable (%s); workers re-create them.", e)
        callbacks = None
    return dumps((config_loader, callbacks, config, state))


def _absolute_sqlite(url: str) -> str:
    """SQLite URL with an absolute path: jobs may chdir, the study must not move."""
    if not url.startswith("sqlite"):
        return url
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    db = parsed.database
    if not db or db == ":memory:" or db.startswith("file:") or os.path.isabs(db):
        return url
    return parsed.set(database=os.path.abspath(db)).render_as_string(hide_password=False)


def _redact(url: str) -> str:
    """Storage URL without its password."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - not a SQLAlchemy URL
        return url


def _now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def _hms(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}"


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
