"""Hydra Sweeper plugin: Optuna with pruning, worker processes, resume and shared studies.

Hydra instantiates ``OptunaPruningSweeper`` from ``hydra/sweeper: optuna_pruning`` (see
``config``); it keeps the typed config (``config.OptunaPruningSweeperConf``) and wires the
parts together for one sweep:

1. the search space from ``params`` and the command line (``_distributions``) and its
   conditional rule (``_conditions``);
2. the storage, the ask lock and the study, resumed or created (``_storage``, ``_study``),
   with the sampler and pruner (``_samplers``), or keras-tuner's oracle
   (``_keras_tuner_engine``);
3. the slot loop (``_loop``) over local worker processes or Ray tasks (``_executors``);
4. the summary (``_summary``), written to ``<hydra.sweep.dir>/optuna_summary.yaml``.

``hydra.sweeper.dry_run=N`` stops after step 1 (``_dry_run``).

For Hydra callbacks in the sweeper process: as soon as the study is open,
``OPTUNA_SWEEPER_STUDY`` and ``OPTUNA_SWEEPER_STORAGE`` are set in ``os.environ`` (the name
actually used, e.g. after ``new_study=true``); the summary is written before
``on_multirun_end``. Hydra calls ``on_multirun_start`` before it even builds the sweeper, so
a callback that must not act on a config the sweeper would refuse defines
``on_sweep_start(config=..., study_name=...)`` (``SWEEP_START_HOOK``): the sweeper calls it
once the search space, storage, study and executor are set up, before the first trial is
asked and before any worker starts (workers inherit what it puts in ``os.environ``). An
exception it raises stops the sweep there; a dry run never calls it.

Workers tell through a study loaded with a RandomSampler, so a sampler's ``after_trial``
hook does not run; Optuna's built-in samplers keep their state in the storage.

Hydra's plugin scan imports this module (and through it the private parts) in every Hydra
process: the parts keep Optuna, SQLAlchemy, Ray and keras-tuner imports inside their
functions.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
import warnings
from pathlib import Path
from typing import Any

from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

from . import _preemption as preemption
from . import _storage as st
from . import trial_context as tc
from ._conditions import ConditionResolver
from ._distributions import SearchSpace, config_key, params_to_overrides, parse_search_space
from ._dry_run import dry_run
from ._executors._local import (
    LocalProcessExecutor,
    available_cores,
    detect_gpus,
    worker_setup_common,
)
from ._executors._ray_cluster import RayExecutor, RaySettings, import_ray
from ._hooks import locate
from ._keras_tuner_engine import KerasTunerEngine, check_settings
from ._loop import SweepLoop, retry_settings
from ._samplers import (
    build_pruner,
    build_sampler,
    check_sampler_dependencies,
    grid_size,
    pruner_json,
    sampler_json,
    target_of,
)
from ._study import default_study_name, directions_of, open_study
from ._summary import sweep_summary, write_official_results, write_summary
from ._warm_start import request_from as warm_start_request
from .config import OptunaPruningSweeperConf

log = logging.getLogger(__name__)

# The Hydra callback method the sweeper calls once it accepted its config (see above).
SWEEP_START_HOOK = "on_sweep_start"


def validate(conf: OptunaPruningSweeperConf) -> None:
    """Refuse impossible settings before anything runs."""
    if conf.n_trials < 1 or conf.n_jobs < 1:
        raise ValueError(
            "hydra.sweeper.n_trials and hydra.sweeper.n_jobs must be >= 1, got "
            f"n_trials={conf.n_trials}, n_jobs={conf.n_jobs}"
        )
    if not 0.0 <= conf.max_failure_rate <= 1.0:
        raise ValueError(f"max_failure_rate must be in [0, 1], got {conf.max_failure_rate}")
    if conf.trials_per_worker is not None and conf.trials_per_worker < 0:
        raise ValueError(
            f"trials_per_worker must be >= 1 or null, got {conf.trials_per_worker}"
        )
    if conf.timeout is not None and conf.timeout <= 0:
        raise ValueError(f"hydra.sweeper.timeout must be > 0 seconds or null, got {conf.timeout}")
    directions_of(conf.direction)
    if conf.trial_storage and not str(conf.trial_storage).startswith("grpc://"):
        raise ValueError(f"hydra.sweeper.trial_storage={conf.trial_storage!r}: use "
                         "grpc://host:port (an Optuna gRPC storage proxy) or null")
    if conf.executor not in ("local", "ray"):
        raise ValueError(f"hydra.sweeper.executor={conf.executor!r}; use local or ray")
    retry = conf.retry
    if retry.count not in ("trials", "attempts"):
        raise ValueError(f"hydra.sweeper.retry.count={retry.count!r}; use trials or attempts")
    if retry.every_epochs < 1 or retry.preempt_grace < 0:
        raise ValueError("hydra.sweeper.retry.every_epochs must be >= 1 and "
                         f"retry.preempt_grace >= 0, got {retry.every_epochs} and "
                         f"{retry.preempt_grace}")
    if conf.engine == "keras_tuner":  # also for a dry run, which never builds the engine
        check_settings(OmegaConf.create(dict(conf.keras_tuner)) if isinstance(
            conf.keras_tuner, dict) else conf.keras_tuner)


def make_executor(conf: OptunaPruningSweeperConf, setup_common: dict[str, Any],
                  gpus: list[str], task_function: Any) -> Any:
    """The executor ``hydra.sweeper.executor`` names: local processes or Ray tasks."""
    if conf.executor == "local":
        return LocalProcessExecutor(setup_common, gpus, conf.trials_per_worker)
    import_ray()  # a clear error with the install command before anything else
    import cloudpickle  # comes with Ray (the local executor treats it as optional)

    settings = RaySettings(address=conf.ray.address, num_cpus=float(conf.ray.num_cpus),
                           num_gpus=None if conf.ray.num_gpus is None
                           else float(conf.ray.num_gpus),
                           trials_per_worker=conf.trials_per_worker)
    return RayExecutor(setup_common, settings, conf.n_jobs, cloudpickle.dumps(task_function))


def log_fixed(
    space: SearchSpace, resolver: ConditionResolver, swept: frozenset[str], arguments: list[str]
) -> None:
    """The start banner's lines for what the command line fixed or swept over the file."""
    dropped = resolver.dropped_by_fixed_groups()
    from_cli = {config_key(a.split("=", 1)[0]): a for a in arguments if "=" in a}
    for p in space.params.values():
        if p.key in from_cli:
            log.info("Searched as the command line says: %s%s", from_cli[p.key],
                     " (replaces hydra.sweeper.params)" if p.key in swept else "")
    for f in space.fixed.values():
        if f.key not in swept:
            continue
        gone = dropped.get(f.key, [])
        log.info(
            "Fixed on the command line: %s (taken out of the search%s)",
            f.line,
            f"; it has no {', '.join(gone)}" if gone else "",
        )


class OptunaPruningSweeper(Sweeper):
    """Sweeper whose config keys are documented on ``config.OptunaPruningSweeperConf``."""

    def __init__(self, **config: Any) -> None:
        self.conf = OptunaPruningSweeperConf(**config)
        validate(self.conf)
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None
        self.task_function: TaskFunction | None = None

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        self.config = config
        self.hydra_context = hydra_context
        self.task_function = task_function

    def _param_lines(self) -> tuple[list[str], dict[str, Any]]:
        params = self.conf.params
        plain = (
            OmegaConf.to_container(params, resolve=False)
            if isinstance(params, DictConfig)
            else dict(params or {})
        )
        assert isinstance(plain, dict)
        unknown = [k for k in self.conf.exclude if k not in plain]
        if unknown:
            raise ValueError(
                f"hydra.sweeper.exclude={list(self.conf.exclude)}: {unknown} not in "
                f"hydra.sweeper.params (its keys: {sorted(plain)})"
            )
        return params_to_overrides(
            {k: v for k, v in plain.items() if k not in set(self.conf.exclude)}
        )

    def swept_in_file(self) -> frozenset[str]:
        """Config keys that ``hydra.sweeper.params`` itself sweeps (before the command line)."""
        param_lines, conditions = self._param_lines()
        return frozenset(p.key for p in parse_search_space(param_lines, conditions).params.values())

    def search_space(self, arguments: list[str]) -> SearchSpace:
        """``hydra.sweeper.params`` plus the command line's sweep overrides."""
        param_lines, conditions = self._param_lines()
        space = parse_search_space([*param_lines, *arguments], conditions)
        if not space.params and not self.conf.custom_search_space:
            # As the official plugin: n_trials jobs of the same config (e.g. seeds, timing).
            log.warning(
                "The search space is empty (no hydra.sweeper.params, no choice()/interval() "
                "override, no custom_search_space): each of the %d trials runs the same "
                "config", self.conf.n_trials,
            )
        return space

    def sweep(self, arguments: list[str]) -> dict[str, Any]:
        """Run the sweep; returns the summary also written to optuna_summary.yaml."""
        assert self.config is not None and self.hydra_context is not None
        assert self.task_function is not None
        t0 = time.monotonic()
        config = self.config
        directions = directions_of(self.conf.direction)
        metric_names = self._metric_names(directions)
        space = self.search_space(arguments)
        resolver = ConditionResolver(
            space, self.hydra_context.config_loader, config, self.swept_in_file()
        )
        resolver.check_keys_exist()
        log_fixed(space, resolver, self.swept_in_file(), arguments)
        custom = locate(self.conf.custom_search_space, "custom_search_space")
        conf = self._capped_to_grid(space)
        sweep_dir = Path(str(config.hydra.sweep.dir))
        if conf.dry_run:
            return dry_run(
                conf.dry_run, resolver, conf.sampler, directions, config,
                self.hydra_context.config_loader, custom,
                locate(conf.dry_run_check, "dry_run_check"),
            )

        url = st.absolute_sqlite(conf.storage or st.default_storage(sweep_dir))
        st.check_url(url)
        st.check_shareable(url)
        base_name = conf.study_name or default_study_name(config)
        fingerprint = {**space.fingerprint(), "directions": directions}
        engine = None
        if conf.engine == "keras_tuner":
            engine = keras_tuner_engine(conf, resolver, space, fingerprint, directions,
                                        metric_names, base_name, sweep_dir, config)
            base_name = engine.study_name  # its own study: never mixed with Optuna's trials
            # keras-tuner decides budgets (Hyperband) and retries; no pruner, no re-queue
            conf = dataclasses.replace(conf, pruner=None, max_retry=0)
        elif conf.engine != "optuna":
            raise ValueError(f"hydra.sweeper.engine={conf.engine!r}; use optuna or keras_tuner")
        pruner = build_pruner(conf.pruner)
        warm = warm_start_request(conf.warm_start, metric_names, conf.engine)
        lock = st.AskLock(url, base_name)
        storage, study, session = open_under_lock(conf, lock, url, base_name, fingerprint,
                                                  pruner, directions, warm)
        if metric_names and study.metric_names != metric_names:
            set_metric_names(study, metric_names)
        sampler_name = set_sampler(study, conf, space, session, engine)
        os.environ[tc.ENV_STUDY] = study.study_name
        os.environ[tc.ENV_STORAGE] = url
        os.environ[tc.ENV_SAMPLER] = sampler_name

        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(config, sweep_dir / "multirun.yaml")
        executor = self._start_executor(conf, study, url, sampler_name, pruner, directions,
                                        session, engine)
        conf = dataclasses.replace(conf, n_jobs=getattr(executor, "slots", conf.n_jobs))
        loop = SweepLoop(conf, study, storage, lock, resolver, executor, t0, config, custom,
                         engine)
        try:
            announce_sweep_start(self.hydra_context, config, study.study_name, executor)
            stop_reason = loop.run()
        finally:
            lock.close()
        return finish(loop, stop_reason, storage, url, sweep_dir, engine, t0)

    def _metric_names(self, directions: list[str]) -> list[str]:
        """``hydra.sweeper.metric_names``, refused unless one per direction."""
        metric_names = [str(n) for n in self.conf.metric_names or ()]
        if metric_names and len(metric_names) != len(directions):
            raise ValueError(
                f"hydra.sweeper.metric_names has {len(metric_names)} name(s) for "
                f"{len(directions)} direction(s): {metric_names} vs {directions}"
            )
        return metric_names

    def _capped_to_grid(self, space: SearchSpace) -> OptunaPruningSweeperConf:
        """The config with the sampler's dependencies checked and, for the grid sampler,
        ``n_trials`` capped at the grid size."""
        target = target_of(self.conf.sampler)
        check_sampler_dependencies(target)
        n_trials = self.conf.n_trials
        if target.endswith("GridSampler"):
            size = grid_size(space)
            if size < n_trials:
                log.info("Grid sampler: n_trials %d -> %d (the grid size)", n_trials, size)
                n_trials = size
        return dataclasses.replace(self.conf, n_trials=n_trials)

    def _start_executor(self, conf: OptunaPruningSweeperConf, study: Any, url: str,
                        sampler_name: str, pruner: Any, directions: list[str], session: int,
                        engine: Any) -> Any:
        """Log the start banner and start the executor the trials run on."""
        assert self.config is not None and self.hydra_context is not None
        gpus = detect_gpus()
        threads = conf.threads_per_worker or max(1, available_cores() // conf.n_jobs)
        log_start(conf, study, url, sampler_name, pruner, directions, session, gpus, threads)
        setup_common = worker_setup_common(
            self.hydra_context,
            self.task_function,
            self.config,
            url=conf.trial_storage or url,
            study_name=study.study_name,
            sampler_name=sampler_name,
            pruner_json=pruner_json(conf.pruner),
            sampler_json=sampler_json(conf.sampler) if engine is None else None,
            threads=threads,
            n_objectives=len(directions),
            # through a proxy (no heartbeat API) the sweeper's own beat keeps trials alive
            heartbeat_interval=None if conf.trial_storage else conf.heartbeat_interval,
            max_retry=conf.max_retry,
            retry_json=json.dumps(retry_settings(conf)),
        )
        return make_executor(conf, setup_common, gpus, self.task_function)


def announce_sweep_start(hydra_context: HydraContext, config: DictConfig, study_name: str,
                         executor: Any) -> None:
    """Call ``on_sweep_start`` on each of this run's Hydra callbacks that defines it.

    Hydra's own ``Callbacks`` object (the one that called ``on_multirun_start``) travels in
    the ``HydraContext``; its ``_notify`` would turn an exception into a warning and sweep
    on, so the hooks are called here, where an exception stops the sweep (and the executor,
    which has started no trial yet).
    """
    callbacks = getattr(getattr(hydra_context, "callbacks", None), "callbacks", None) or []
    try:
        for callback in callbacks:
            hook = getattr(callback, SWEEP_START_HOOK, None)
            if callable(hook):
                hook(config=config, study_name=study_name)
    except BaseException:
        executor.shutdown()
        raise


def open_under_lock(conf: OptunaPruningSweeperConf, lock: st.AskLock, url: str,
                    base_name: str, fingerprint: dict[str, Any], pruner: Any,
                    directions: list[str], warm: Any = None) -> tuple[Any, Any, int]:
    """The storage and the study, created or resumed (and warm-started when ``warm`` names
    earlier studies); returns (storage, study, session)."""
    with lock():  # also serializes table creation in a fresh database
        storage = st.make_storage(
            url, conf.heartbeat_interval, conf.grace_period, conf.max_retry
        )
        study, session = open_study(
            storage, base_name, fingerprint, pruner, directions, conf.new_study, warm
        )
    return storage, study, session


def set_sampler(study: Any, conf: OptunaPruningSweeperConf, space: SearchSpace, session: int,
                engine: Any) -> str:
    """Give the study its sampler (seed offset by the session); returns the name runs show."""
    if engine is None:
        study.sampler = build_sampler(conf.sampler, space, seed_offset=session)
        return type(study.sampler).__name__
    import optuna  # heavy: only once a sweep runs, never at the plugin scan

    # every trial arrives enqueued with the oracle's values
    study.sampler = optuna.samplers.RandomSampler(seed=conf.keras_tuner.seed)
    return engine.label


def log_start(conf: OptunaPruningSweeperConf, study: Any, url: str, sampler_name: str,
              pruner: Any, directions: list[str], session: int, gpus: list[str],
              threads: int) -> None:
    """The start banner, and a warning when slots outnumber GPUs or cores."""
    log.info(
        "Optuna sweeper: study '%s' in %s | sampler %s | pruner %s | %s | n_trials %d | "
        "%s | n_jobs %d | %d threads/worker | GPUs %s | session %d",
        study.study_name,
        st.redact(url),
        sampler_name,
        type(pruner).__name__,
        "/".join(directions),
        conf.n_trials,
        f"no new trial after {conf.timeout:.0f} s" if conf.timeout else "no timeout",
        conf.n_jobs,
        threads,
        gpus or "none",
        session,
    )
    if gpus and conf.n_jobs > len(gpus):
        log.warning("%d slots share %d GPUs", conf.n_jobs, len(gpus))
    elif not gpus and conf.n_jobs > available_cores() and conf.executor == "local":
        log.warning(
            "hydra.sweeper.n_jobs=%d is more than the %d CPU cores here: trials will run "
            "slower each, not faster in total", conf.n_jobs, available_cores())


def finish(loop: SweepLoop, stop_reason: str, storage: Any, url: str, sweep_dir: Path,
           engine: Any, t0: float) -> dict[str, Any]:
    """Write the summaries; raise when the sweep stopped on failures or a SIGTERM."""
    study = loop.study
    summary = sweep_summary(
        study, storage, url, loop.conf.n_trials, loop.outcomes, stop_reason,
        time.monotonic() - t0,
    )
    if engine is not None:
        summary["sampler"] = engine.label
        summary["keras_tuner"] = engine.summary()
        log.info("keras-tuner %s: %s; best %s (trial %s); project %s", engine.algorithm,
                 summary["keras_tuner"]["states"], summary["keras_tuner"]["best_score"],
                 summary["keras_tuner"]["best_optuna_trial"], engine.project_dir)
    write_summary(summary, sweep_dir)
    write_official_results(study, sweep_dir)
    if stop_reason == "failure_rate":
        raise RuntimeError(loop.failure_message())
    if stop_reason == "interrupted":  # no report, no promotion: the study is not done
        saved = sum(1 for o in loop.outcomes if o.state == "INTERRUPTED")
        log.warning("Sweep interrupted by SIGTERM: %d trial(s) stopped at a resumable "
                    "state and were re-queued; re-run the same command to resume them "
                    "in study '%s'.", saved, study.study_name)
        raise SystemExit(preemption.EXIT_CODE)
    return summary


def keras_tuner_engine(conf: OptunaPruningSweeperConf, resolver: ConditionResolver,
                       space: SearchSpace, fingerprint: dict[str, Any], directions: list[str],
                       metric_names: list[str], base_name: str, sweep_dir: Path,
                       config: DictConfig) -> Any:
    """keras-tuner's oracle over this search space (``engine=keras_tuner``)."""
    if len(directions) != 1:
        raise ValueError("hydra.sweeper.engine=keras_tuner optimises one objective; this "
                         f"sweep has {len(directions)} directions")
    if conf.custom_search_space:
        raise ValueError("hydra.sweeper.custom_search_space suggests on an Optuna trial; it "
                         "cannot run with engine=keras_tuner")
    fixed = space.fixed.get("trainer.max_epochs")
    epochs = (fixed.line.split("=", 1)[1] if fixed is not None
              else OmegaConf.select(config, "trainer.max_epochs", default=10))
    return KerasTunerEngine(
        conf.keras_tuner, resolver, objective=(metric_names or ["objective"])[0],
        direction=directions[0], fingerprint=fingerprint, base_name=base_name,
        sweep_dir=sweep_dir, n_trials=conf.n_trials, default_epochs=int(epochs))


def set_metric_names(study: Any, names: list[str]) -> None:
    """Name the objective values in the study (optuna-dashboard and Optuna's plots)."""
    import optuna  # heavy: only once a sweep runs, never at the plugin scan

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(names)
