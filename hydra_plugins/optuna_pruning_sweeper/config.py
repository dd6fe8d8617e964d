"""Typed configs of the Optuna pruning sweeper, registered in Hydra's ConfigStore.

Select the sweeper in a search-space file (``# @package _global_``)::

    defaults:
      - override /hydra/sweeper: optuna_pruning
      - override /hydra/sweeper/sampler: tpe       # tpe random cmaes gp nsgaii grid
      - override /hydra/sweeper/pruner: median  # percentile successive_halving hyperband nop

    hydra:
      sweeper:
        n_trials: 40
        n_jobs: 2
        direction: minimize
        storage: sqlite:///${hydra:runtime.cwd}/mlruns/optuna.db
        study_name: cnn_small
        warm_start:
          studies: [cnn_small_last_week]   # or {study_name: ..., storage: <URL>}
          top_k: 3
        params:
          optimizer: choice(adam, sgd)
          optimizer.lr: tag(log, interval(1e-4, 1e-1))
          model.depth: int(interval(2, 5))

This module is imported by Hydra's plugin scan in every Hydra process, so it stays light:
no Optuna import here.
"""

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

PROVIDER = "optuna_pruning_sweeper"


# --- samplers (group hydra/sweeper/sampler) -------------------------------------------------


@dataclass
class SamplerConfig:
    """Base of the sampler configs: a ``_target_`` and a seed.

    With a seed, every sweeper process that joins a study offsets it by its session index
    (0 for the first), so a resumed or a second concurrent sweep does not replay the
    first one's random draws.
    """

    _target_: str = MISSING
    seed: int | None = None


@dataclass
class TPESamplerConfig(SamplerConfig):
    """optuna.samplers.TPESampler (handles conditional / dynamic spaces)."""

    _target_: str = "optuna.samplers.TPESampler"
    # None = Optuna's default: multivariate for one objective, independent for several.
    multivariate: bool | None = None
    # Decompose a conditional space into groups (needs multivariate).
    group: bool = False
    n_startup_trials: int = 10
    n_ei_candidates: int = 24
    # Running trials count as bad so parallel workers spread out.
    constant_liar: bool = True


@dataclass
class RandomSamplerConfig(SamplerConfig):
    """optuna.samplers.RandomSampler."""

    _target_: str = "optuna.samplers.RandomSampler"


@dataclass
class CmaEsSamplerConfig(SamplerConfig):
    """optuna.samplers.CmaEsSampler (``cmaes`` is a project dependency; continuous params only:
    Optuna samples categorical ones independently, with a warning)."""

    _target_: str = "optuna.samplers.CmaEsSampler"
    x0: dict[str, Any] | None = None
    sigma0: float | None = None
    n_startup_trials: int = 1
    consider_pruned_trials: bool = False
    popsize: int | None = None
    use_separable_cma: bool = False
    with_margin: bool = False
    lr_adapt: bool = False


@dataclass
class GPSamplerConfig(SamplerConfig):
    """optuna.samplers.GPSampler (needs ``pip install torch``)."""

    _target_: str = "optuna.samplers.GPSampler"
    n_startup_trials: int = 10
    deterministic_objective: bool = False


@dataclass
class NSGAIISamplerConfig(SamplerConfig):
    """optuna.samplers.NSGAIISampler (multi-objective)."""

    _target_: str = "optuna.samplers.NSGAIISampler"
    population_size: int = 50
    mutation_prob: float | None = None
    crossover_prob: float = 0.9
    swapping_prob: float = 0.5


@dataclass
class GridSamplerConfig(SamplerConfig):
    """optuna.samplers.GridSampler: the grid is built from the choice()/range() params.

    ``n_trials`` is capped at the grid size; interval() params are refused.
    """

    _target_: str = "optuna.samplers.GridSampler"


# --- pruners (group hydra/sweeper/pruner) ---------------------------------------------------


@dataclass
class MedianPrunerConfig:
    """optuna.pruners.MedianPruner: prune below the median of earlier trials at a step."""

    _target_: str = "optuna.pruners.MedianPruner"
    n_startup_trials: int = 5
    n_warmup_steps: int = 0
    interval_steps: int = 1
    n_min_trials: int = 1


@dataclass
class PercentilePrunerConfig(MedianPrunerConfig):
    """optuna.pruners.PercentilePruner: prune outside the best ``percentile`` % at a step
    (the median pruner is its 50 %: same other settings)."""

    _target_: str = "optuna.pruners.PercentilePruner"
    percentile: float = 25.0


@dataclass
class SuccessiveHalvingPrunerConfig:
    """optuna.pruners.SuccessiveHalvingPruner (asynchronous successive halving)."""

    _target_: str = "optuna.pruners.SuccessiveHalvingPruner"
    min_resource: Any = "auto"
    reduction_factor: int = 4
    min_early_stopping_rate: int = 0
    bootstrap_count: int = 0


@dataclass
class HyperbandPrunerConfig:
    """optuna.pruners.HyperbandPruner."""

    _target_: str = "optuna.pruners.HyperbandPruner"
    min_resource: int = 1
    max_resource: Any = "auto"
    reduction_factor: int = 3
    bootstrap_count: int = 0


@dataclass
class NopPrunerConfig:
    """optuna.pruners.NopPruner: never prune."""

    _target_: str = "optuna.pruners.NopPruner"


@dataclass
class KerasTunerConf:
    """``hydra.sweeper.keras_tuner.*``: keras-tuner's oracle, used when ``engine=keras_tuner``."""

    algorithm: str = "hyperband"  # hyperband | bayesian | random (keras-tuner's oracles)
    seed: int | None = None  # the oracle's seed; null = keras-tuner draws one
    # Hyperband: most epochs one model trains (>= factor, else there is no round to halve);
    # bayesian/random: every trial's max_epochs (>= 1). null = the composed trainer.max_epochs.
    # Every value is checked before any trial (_keras_tuner_engine.check_settings).
    max_epochs: int | None = None
    factor: int = 3  # Hyperband's reduction factor (>= 2)
    hyperband_iterations: int = 1  # Hyperband: times the whole bracket schedule runs (>= 1)
    num_initial_points: int | None = None  # bayesian: random trials first (>= 1); null = 3 x params
    # Where projects go; null = <hydra.sweep.dir>/keras_tuner (a new project every sweep).
    directory: str | None = None
    # The folder of an earlier search's project to continue (same params and algorithm);
    # null = a new project. An old project is never reused unless named here.
    resume: str | None = None


@dataclass
class RetryConf:
    """``hydra.sweeper.retry.*``: how a trial that was killed or preempted comes back.

    The number of restarts is ``hydra.sweeper.max_retry`` (the same for a dead worker, a
    dead sweeper's stale trial and a preempted trial's crash; a preemption itself never uses
    up a restart). These keys say how the retry starts and what it costs.
    """

    # true: a retry continues from its trial's last resumable state (weights, optimizer,
    # epoch, early-stopping/plateau state, data order); false: it starts from epoch 0.
    resume: bool = True
    # Epochs between two resumable states (1 = every epoch; benchmarks/resume_cost.py).
    every_epochs: int = 1
    # Where states live: null = the trial's output folder (one machine); a folder every
    # worker can reach (NFS, a shared disk) lets a trial started on box A resume on box B.
    state_dir: str | None = None
    # Seconds a trial has after SIGTERM (SLURM, Kubernetes, spot) to reach a resumable
    # state: it finishes the epoch when that fits, else stops at the next batch with the
    # previous epoch's state. A second SIGTERM or the end of this period exits at once.
    preempt_grace: float = 60.0
    # What uses up n_trials: "trials" (a retried attempt does not count, its retry does)
    # or "attempts" (every attempt counts: crashes eat the budget).
    count: str = "trials"


@dataclass
class RayConf:
    """``hydra.sweeper.ray.*``: the cluster and each trial's resources (``executor=ray``)."""

    # ray://head:10001 (Ray Client), auto (the cluster this machine joined with `ray
    # start`), or null: a local Ray instance on this machine.
    address: str | None = None
    num_cpus: float = 1.0  # CPUs per trial (also its TF/OpenMP threads)
    num_gpus: float | None = None  # GPUs per trial; null = 1 where the cluster has GPUs


@dataclass
class WarmStartConf:
    """``hydra.sweeper.warm_start.*``: earlier studies a NEW study starts from.

    Their COMPLETE trials that fit this search space are added to the new study (the
    sampler learns from them; they do not use up ``n_trials``), and the ``top_k`` best of
    each are queued to run first. A missing source, or one of other directions or objective,
    stops the sweep before any trial. A study that already has trials is never changed.
    """

    # Each entry: a study name in this sweep's storage, or {study_name: ..., storage: <URL>}
    # for another storage. A name with * or ? takes the newest matching earlier study with
    # a finished trial (none: a cold start, said once), e.g. "nightly-*".
    studies: list[Any] = field(default_factory=list)
    # The best distinct configs of each source (by this sweep's direction; the Pareto front
    # for several objectives) queued to run first, as this sweep's own trials; 0 = none.
    top_k: int = 3


# --- the sweeper (group hydra/sweeper) ------------------------------------------------------


@dataclass
class OptunaPruningSweeperConf:
    """Config of ``hydra/sweeper: optuna_pruning``; every key is ``hydra.sweeper.<key>``."""

    _target_: str = "hydra_plugins.optuna_pruning_sweeper.sweeper.OptunaPruningSweeper"
    # The sweeper builds sampler and pruner itself (seed offsets, grid space, clear errors).
    _recursive_: bool = False
    defaults: list[Any] = field(
        default_factory=lambda: [{"sampler": "tpe"}, {"pruner": "median"}, "_self_"]
    )

    sampler: Any = MISSING
    pruner: Any = MISSING
    # "minimize" / "maximize", or a list of them for multi-objective.
    direction: Any = "minimize"
    # Names of the objective values (one per direction), shown by optuna-dashboard and
    # Optuna's plots instead of "Objective 0"; null = unnamed.
    metric_names: Any = None  # Any: an interpolation (the search spaces derive it) merges
    # Any RDB URL; null = a study private to this sweep: sqlite:///<hydra.sweep.dir>/optuna.db
    # (the official plugin's null is in memory; worker processes need a file to tell).
    storage: str | None = None
    # null = "<hydra.job.name>" plus "-<search_space choice>" when that group is selected.
    study_name: str | None = None
    # Counted trials the study should hold in total (a resumed study continues to this).
    n_trials: int = 20
    # Concurrent trials of this sweeper process (each in its own worker process).
    n_jobs: int = 1
    # Seconds after which no new trial is asked; running ones finish. null = no limit.
    timeout: float | None = None
    # No new trial once the study's trials have trained this many epochs in total (every
    # per-epoch value a trial reports counts one); running ones finish. null = no limit. Makes
    # samplers, pruners and engines comparable at equal compute.
    max_epochs_total: int | None = None
    # Stop asking and exit non-zero (RuntimeError) when FAIL / finished > this, counted over
    # this sweeper process's trials once enough of them finished.
    max_failure_rate: float = 0.5
    # Finished trials needed before the failure rate applies; null = max(3, n_jobs).
    failure_rate_min_trials: int | None = None
    # Trials a worker process runs before it is replaced; 1 = fresh process per trial (for
    # tasks that leak memory, e.g. TF: the project's search spaces set it), null = reuse the
    # worker for the whole sweep (cheap trials run at the speed of the official plugin).
    trials_per_worker: int | None = None
    # OMP/TF threads per worker; null = cores // n_jobs.
    threads_per_worker: int | None = None
    # Seconds between heartbeats of a running trial; null disables stale-trial detection.
    heartbeat_interval: int | None = 30
    # Seconds without heartbeat before a RUNNING trial is failed; null = 2 * interval.
    grace_period: int | None = None
    # Times a stale (killed) trial is re-queued with the same params; null = unlimited.
    max_retry: int | None = 3
    # True: when the stored study has another search space, start "<name>-<k>" instead of
    # refusing.
    new_study: bool = False
    # Search space: key -> override grammar string (choice/range/interval/int/tag), or
    # {values: <grammar>, when: {other_key: [allowed values]}} for an explicit condition.
    params: dict[str, Any] | None = None
    # Keys of ``params`` to leave out (a dotted key such as model.depth cannot be deleted
    # with ~hydra.sweeper.params... on the command line: Hydra reads its dots as nesting).
    exclude: list[str] = field(default_factory=list)
    # The official plugin's hook: dotpath of a function (cfg, trial) -> None that suggests
    # extra params on the trial after ``params`` were sampled (same sampler, same trial).
    custom_search_space: str | None = None
    # N > 0: sample N trials on a throw-away in-memory study, compose and check each (see
    # ``dry_run_check``), print a verdict and exit (non-zero if any would fail). 0 = sweep.
    dry_run: int = 0
    # Dotpath of a function (cfg) -> None called on each dry-run trial's composed config;
    # it raises on a trial that would fail (e.g. builds the model without training).
    dry_run_check: str | None = None
    # Who chooses the trials: "optuna" (sampler + pruner above) or "keras_tuner" (one of
    # keras-tuner's oracles, see ``keras_tuner``; runs and tracking stay the same).
    engine: str = "optuna"
    keras_tuner: KerasTunerConf = field(default_factory=KerasTunerConf)
    # grpc://host:port of an Optuna gRPC storage proxy (optuna.storages.run_grpc_proxy_server
    # in front of ``storage``): trial processes report, prune and tell through it, so many
    # workers share the proxy's database connections; the sweeper still counts and asks on
    # ``storage`` under its lock, and beats the trials' heartbeats. null = ``storage``.
    trial_storage: str | None = None
    # Where trials run: "local" (worker processes on this machine) or "ray" (Ray tasks on
    # a cluster, see ``ray``; concurrency = the cluster's room for them, capped at n_jobs).
    executor: str = "local"
    ray: RayConf = field(default_factory=RayConf)
    # Resume, state folder, preemption grace and budget rule of retried trials.
    retry: RetryConf = field(default_factory=RetryConf)
    # Earlier studies a new study starts from (their fitting trials, their best configs first).
    warm_start: WarmStartConf = field(default_factory=WarmStartConf)


def register_configs() -> None:
    """Store the sweeper, sampler and pruner configs in Hydra's ConfigStore."""
    cs = ConfigStore.instance()
    cs.store(
        group="hydra/sweeper",
        name="optuna_pruning",
        node=OptunaPruningSweeperConf,
        provider=PROVIDER,
    )
    samplers = {
        "tpe": TPESamplerConfig,
        "random": RandomSamplerConfig,
        "cmaes": CmaEsSamplerConfig,
        "gp": GPSamplerConfig,
        "nsgaii": NSGAIISamplerConfig,
        "grid": GridSamplerConfig,
    }
    for name, node in samplers.items():
        cs.store(group="hydra/sweeper/sampler", name=name, node=node, provider=PROVIDER)
    pruners = {
        "median": MedianPrunerConfig,
        "percentile": PercentilePrunerConfig,
        "successive_halving": SuccessiveHalvingPrunerConfig,
        "hyperband": HyperbandPrunerConfig,
        "nop": NopPrunerConfig,
        "none": NopPrunerConfig,
    }
    for name, node in pruners.items():
        cs.store(group="hydra/sweeper/pruner", name=name, node=node, provider=PROVIDER)


register_configs()
