"""The one seam between search/ and the sweeper plugin: what a job knows about its sweep.

This is the only module under search/ that imports ``hydra_plugins.*``, and the only one
that reads the sweep's environment variables. Training gets the trial's handle
(``current_trial()``: report, should-prune, trial number, study, thread budget, parent run);
the sweep callback gets the study (``sweep_study()``), its summary (``study_summary``) and
sets the parent run that trial jobs attach to (``set_parent_run_id``); the runs after the
sweep (final stage, cross-validation) get their environment (``single_run_env``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from hydra_plugins.optuna_pruning_sweeper import (
    _keras_tuner_engine,
    _preemption,
    _storage,
    _summary,
    _warm_start,
)
from hydra_plugins.optuna_pruning_sweeper import sweeper as _sweeper
from hydra_plugins.optuna_pruning_sweeper import trial_context as _tc

if TYPE_CHECKING:
    import optuna

# The sweep callback exports its parent run id here; trial workers inherit it.
PARENT_RUN_ENV = "MLFLOW_PARENT_RUN_ID"
# Raised by a trial that stopped for a preemption (SIGTERM): the worker records it
# "interrupted" and re-queues it (see hydra_plugins/.../_preemption.py).
TrialInterrupted = _preemption.TrialInterrupted
# The trial's user attr naming its resumable-state folder (search.training.resume writes it; the
# sweeper removes the folder of a trial that will not be retried).
RESUME_DIR_ATTR = _tc.RESUME_DIR_ATTR
# In that folder, the mark of a damaged state set aside (``<name>.damaged-<time>``): the
# sweeper keeps such entries when it removes the folder of a trial that is not retried.
SET_ASIDE_MARK = _tc.SET_ASIDE_MARK
remove_state_folder = _tc.remove_state_folder  # removes the rest of that folder
# Where the sweeper names its study (for messages).
STUDY_ENV_NAMES = (_tc.ENV_STUDY, _tc.ENV_STORAGE)
# The sweeper's summary file in the sweep folder (the nightly table reads it).
SUMMARY_FILE = _summary.SUMMARY_FILE
# Prefix of keras-tuner's facts in a trial's user attrs, copied to its run tags (the same
# prefix as search.tracking.tags.KERAS_TUNER_PREFIX, which this module sits below).
KERAS_TUNER_ATTR_PREFIX = _keras_tuner_engine.TAG
# The one redaction of secrets that every output calls (a password in any URL, credentials the
# process holds in its environment), on a string or on every string of a nested value; and the
# command line's URLs with passwords moved into the environment (search/run.py, before Hydra).
redact = _storage.redact
redact_tree = _storage.redact_tree
secrets_out_of_overrides = _storage.secrets_out_of_overrides
error_text = _storage.error_text  # a driver's message on one line, redacted
# The sweeper's per-trial variables: a run started after the sweep (a final-stage repeat, a
# cross-validation fold) drops them, so that it never attaches itself to an Optuna trial.
TRIAL_ENV_NAMES = (_tc.ENV_STORAGE, _tc.ENV_STUDY, _tc.ENV_TRIAL_ID, _tc.ENV_TRIAL_NUMBER,
                   _tc.ENV_SAMPLER, _tc.ENV_PRUNER, _tc.ENV_SAMPLER_CONFIG)


@dataclass(frozen=True)
class SweepTrial:
    """The Optuna trial a job runs for, as the task sees it."""

    trial: optuna.trial.Trial  # Optuna's own trial (user attrs, suggest calls)
    number: int
    study: str
    sampler: str
    pruner: str

    @property
    def info(self) -> dict[str, Any]:
        """``{study, trial_number, sampler, pruner}`` (for run tags)."""
        return {
            "study": self.study,
            "trial_number": self.number,
            "sampler": self.sampler,
            "pruner": self.pruner,
        }

    def engine_tags(self) -> dict[str, str]:
        """keras-tuner's facts about the trial when its oracle chose it (bracket, round,
        epochs, the trial it continues), as run tags."""
        return {k: str(v) for k, v in self.trial.user_attrs.items()
                if k.startswith(KERAS_TUNER_ATTR_PREFIX)}

    def report(self, value: float, step: int) -> None:
        """Report an intermediate objective value (the pruner decides on these)."""
        self.trial.report(value, step)

    def beaten_by(self, values: list[float]) -> int:
        """How many distinct configurations among the study's own COMPLETE trials beat
        ``values`` (this trial's objectives) now: strictly better with one objective,
        dominating with several. Warm-start copies do not count (no run of this sweep holds
        their model), and repeats of one configuration count once, as the top-k ensemble
        picks (so a trial of the sweep's final top k always counted fewer than k here)."""
        import optuna

        signs = [1.0 if d == optuna.study.StudyDirection.MINIMIZE else -1.0
                 for d in self.trial.study.directions]
        mine = [s * float(v) for s, v in zip(signs, values, strict=True)]
        better = set()
        for other in _warm_start.own_trials(self.trial.study.get_trials(
                deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))):
            theirs = [s * float(v) for s, v in zip(signs, other.values, strict=True)]
            if all(t <= m for t, m in zip(theirs, mine, strict=True)) and theirs != mine:
                better.add(tuple(sorted(other.params.items(), key=lambda kv: kv[0])))
        return len(better)

    def should_prune(self) -> bool:
        """Whether the pruner wants this trial stopped (raise ``optuna.TrialPruned``).

        Ask only where more epochs would follow: a trial that trained its last epoch (or was
        early-stopped) completes instead (search/training/keras_callbacks.ReportToPruner). A
        warm start's top configuration is never pruned: it was queued to be measured."""
        if _warm_start.never_pruned(self.trial.user_attrs):
            return False
        return self.trial.should_prune()


def current_trial() -> SweepTrial | None:
    """The trial this job runs for, or None outside a sweep (a plain run, tests)."""
    trial = _tc.current_trial()
    if trial is None:
        return None
    info = _tc.trial_info()
    if info is None:
        return None
    return SweepTrial(
        trial=trial,
        number=int(info["trial_number"]),
        study=str(info["study"]),
        sampler=str(info["sampler"]),
        pruner=str(info["pruner"]),
    )


def retry_policy() -> dict[str, Any] | None:
    """``hydra.sweeper.retry`` (resume, every_epochs, state_dir, preempt_grace, count) of the
    sweep this job runs in; None outside a sweep."""
    return _tc.retry_policy()


def preemption_deadline() -> float | None:
    """When this worker's SIGTERM grace period ends (``time.monotonic()``), None when no
    preemption was asked for."""
    return _preemption.deadline()


def thread_budget() -> int | None:
    """TF threads the sweeper granted this worker (None outside a sweep)."""
    return int(os.environ.get(_tc.ENV_THREADS, "0")) or None


def sweep_jobs(config: Any) -> tuple[int, int]:
    """(concurrent jobs, TF threads each) for the runs that follow a sweep (final stage,
    cross-validation): the sweeper's own rule, `threads_per_worker` else cores // n_jobs."""
    from omegaconf import OmegaConf

    from hydra_plugins.optuna_pruning_sweeper._executors._local import available_cores

    sweeper = OmegaConf.select(OmegaConf.create(config), "hydra.sweeper") or {}
    jobs = int(sweeper.get("n_jobs") or 1)
    return jobs, int(sweeper.get("threads_per_worker") or max(1, available_cores() // jobs))


def maximizes(config: Any) -> bool:
    """Whether the sweep's (first) objective is maximised (`hydra.sweeper.direction`)."""
    from omegaconf import OmegaConf

    direction = OmegaConf.select(OmegaConf.create(config), "hydra.sweeper.direction",
                                 default="minimize")
    if OmegaConf.is_list(direction) or isinstance(direction, list | tuple):
        direction = direction[0]
    return str(direction) == "maximize"


def parent_run_id() -> str | None:
    """The sweep's MLflow parent run, which a trial's run nests under (None outside a sweep)."""
    return os.environ.get(PARENT_RUN_ENV) or None


def set_parent_run_id(run_id: str | None) -> None:
    """Export (or, with None, clear) the parent run for the trial jobs of this sweep."""
    if run_id is None:
        os.environ.pop(PARENT_RUN_ENV, None)
    else:
        os.environ[PARENT_RUN_ENV] = run_id


# The Hydra callback method the sweeper calls once it accepted its config (search space,
# storage, study), before its first trial: the sweep callback opens the parent run there.
SWEEP_START_HOOK = _sweeper.SWEEP_START_HOOK


def sweeper_announces_start(config: Any) -> bool:
    """Whether the sweep's sweeper (``hydra.sweeper._target_``) calls ``SWEEP_START_HOOK``:
    this project's does; another (Hydra's basic one) never would."""
    from omegaconf import OmegaConf

    target = OmegaConf.select(OmegaConf.create(config), "hydra.sweeper._target_", default=None)
    cls = _sweeper.OptunaPruningSweeper
    return target == f"{cls.__module__}.{cls.__qualname__}"


def single_run_env(parent_run_id: str, threads: int) -> dict[str, str]:
    """The environment of a single run started after the sweep under its parent run: this
    process's, without the per-trial variables (``TRIAL_ENV_NAMES``), with the parent run and
    the run's TF thread budget set."""
    env = {k: v for k, v in os.environ.items() if k not in TRIAL_ENV_NAMES}
    env.update({PARENT_RUN_ENV: parent_run_id, _tc.ENV_THREADS: str(threads)})
    return env


def sweep_study() -> optuna.Study | None:
    """The study the sweeper used (it exports its name and storage to the environment).

    None when they are not in the environment (``STUDY_ENV_NAMES``).
    """
    import optuna

    name, storage = os.environ.get(_tc.ENV_STUDY), os.environ.get(_tc.ENV_STORAGE)
    if not (name and storage):
        return None
    return optuna.load_study(study_name=name, storage=storage)


def study_summary(study: optuna.Study) -> dict[str, Any]:
    """Best trial (or Pareto front), counts by state and the study name (the plugin's)."""
    return _summary.study_summary(study)


def session_counts(sweep_dir: Path) -> dict[str, int]:
    """Trials by final state that this sweep session ran (the sweeper's summary file)."""
    path = Path(sweep_dir) / _summary.SUMMARY_FILE
    if not path.is_file():
        return {}
    data = yaml.safe_load(path.read_text()) or {}
    return {str(k): int(v) for k, v in (data.get("this_session") or {}).items()}


def counts_by_state(study: optuna.Study) -> dict[str, int]:
    """Number of trials in each state (COMPLETE, PRUNED, FAIL, ...)."""
    return _summary.counts_by_state(study.get_trials(deepcopy=False))
