"""The running trial, as seen from the task function (the pruning contract).

Before a job runs, the sweeper's worker process exports:

=============================  ============================================================
``OPTUNA_SWEEPER_STORAGE``     storage URL of the study (also set in the sweeper process)
``OPTUNA_SWEEPER_STUDY``       study name actually used (also set in the sweeper process)
``OPTUNA_SWEEPER_TRIAL_ID``    storage id of the running trial (worker only)
``OPTUNA_SWEEPER_TRIAL_NUMBER``  trial number in the study (worker only)
``OPTUNA_SWEEPER_SAMPLER``     sampler class name
``OPTUNA_SWEEPER_PRUNER``      pruner config as JSON (``{"_target_": ..., ...}``)
``OPTUNA_SWEEPER_SAMPLER_CONFIG``  sampler config as JSON, for suggest calls in the task
``SWEEPER_THREADS_PER_WORKER`` threads granted to this worker (also OMP_NUM_THREADS, ...)
``OPTUNA_SWEEPER_RETRY``       the retry policy as JSON (``hydra.sweeper.retry``)
=============================  ============================================================

Use in a task (e.g. with optuna_integration's KerasPruningCallback)::

    from hydra_plugins.optuna_pruning_sweeper.trial_context import current_trial, trial_info

    trial = current_trial()          # None outside a sweep (plain run, tests)
    if trial is not None:
        callbacks.append(KerasPruningCallback(trial, "val_loss"))
    info = trial_info()              # {study, trial_number, sampler, pruner} or None

Define-by-run works too: ``trial.suggest_float("z", 0, 1)`` inside the task samples with
the configured sampler (rebuilt in the worker, its seed offset by the trial number; the grid
sampler's grid knows only ``params``, so there a random draw); the value is stored on the
trial like any other param. ``hydra.sweeper.custom_search_space`` is the official plugin's
way to the same end, in the sweeper process before the job starts.

Report with ``trial.report(value, step)``, ask ``trial.should_prune()`` and raise
``optuna.TrialPruned`` to stop: the worker then stores the trial as PRUNED (keeping the last
reported value). Report every step, but ask only where more steps follow: after its last step
(or an early stop) a trial has done its work and should return its value, not be pruned
(optuna_integration's KerasPruningCallback asks after the last epoch too; the platform's
``search.training.keras_callbacks.ReportToPruner`` does not). Do not call ``study.tell``
yourself: the worker tells the final state.

In the sweeper process itself (e.g. a Hydra callback at ``on_multirun_end``),
``OPTUNA_SWEEPER_STUDY`` / ``OPTUNA_SWEEPER_STORAGE`` name the study, but
``current_trial()`` is None there (no trial id).

The storage, study and trial are cached per process, in the private ``_trial_cache``: Hydra's
plugin scan re-executes this public module in place when it rescans, and skips that one.
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any

from ._samplers import sampler_from_json
from ._trial_cache import CACHE as _CACHE
from ._trial_cache import get_storage, load_study

if TYPE_CHECKING:
    import optuna

ENV_STORAGE = "OPTUNA_SWEEPER_STORAGE"
ENV_STUDY = "OPTUNA_SWEEPER_STUDY"
ENV_TRIAL_ID = "OPTUNA_SWEEPER_TRIAL_ID"
ENV_TRIAL_NUMBER = "OPTUNA_SWEEPER_TRIAL_NUMBER"
ENV_SAMPLER = "OPTUNA_SWEEPER_SAMPLER"
ENV_PRUNER = "OPTUNA_SWEEPER_PRUNER"
ENV_SAMPLER_CONFIG = "OPTUNA_SWEEPER_SAMPLER_CONFIG"
ENV_THREADS = "SWEEPER_THREADS_PER_WORKER"
ENV_RETRY = "OPTUNA_SWEEPER_RETRY"
RESUME_DIR_ATTR = "resume_dir"  # user attr: the trial's resumable-state folder
# In a trial's resumable-state folder, an entry whose name holds this is a state the task set
# aside as damaged (``state.npz.damaged-<time>``): kept for inspection, never removed by the
# sweeper, also when it removes the folder of a trial that will not be retried.
SET_ASIDE_MARK = ".damaged-"


def remove_state_folder(folder: str | os.PathLike) -> list[str]:
    """Remove a trial's resumable-state folder, keeping the entries marked ``SET_ASIDE_MARK``
    (damaged states set aside: their warning promised them kept for inspection). Returns the
    names kept, sorted; a folder that does not exist is nothing to remove."""
    import contextlib
    import shutil
    from pathlib import Path

    folder = Path(folder)
    try:
        children = list(folder.iterdir())
    except OSError:  # no folder (nothing was written), or not one: nothing of ours
        return []
    kept = sorted(c.name for c in children if SET_ASIDE_MARK in c.name)
    if not kept:
        shutil.rmtree(folder, ignore_errors=True)
        return []
    for child in children:
        if child.name in kept:
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                child.unlink()
    return kept


def current_trial() -> optuna.trial.Trial | None:
    """The trial this process runs, or None outside a sweep."""
    url = os.environ.get(ENV_STORAGE)
    name = os.environ.get(ENV_STUDY)
    trial_id = os.environ.get(ENV_TRIAL_ID)
    if not (url and name and trial_id):
        return None
    key = ("trial", url, name, int(trial_id))
    if key not in _CACHE:
        import optuna

        told = load_study(url, name, os.environ.get(ENV_PRUNER))
        number = int(os.environ.get(ENV_TRIAL_NUMBER) or 0)
        # Its own Study object: suggest calls use the configured sampler, while the worker
        # tells through the RandomSampler study (no sampler after_trial hook in workers).
        study = optuna.Study(
            study_name=name,
            storage=get_storage(url),
            sampler=sampler_from_json(os.environ.get(ENV_SAMPLER_CONFIG), seed_offset=number),
            pruner=told.pruner,
        )
        # Reading the trials registers them in Optuna's storage cache, which a trial asked
        # in another process is not: without it suggest_* fails with a KeyError.
        study._storage.get_all_trials(study._study_id, deepcopy=False)
        # Keep one Trial per process: drop the previous trial's object.
        for k in [k for k in _CACHE if k[0] == "trial"]:
            del _CACHE[k]
        _CACHE[key] = optuna.trial.Trial(study, int(trial_id))
    return _CACHE[key]


def trial_info() -> dict[str, Any] | None:
    """``{study, trial_number, sampler, pruner}`` of the running trial (for run tags)."""
    name = os.environ.get(ENV_STUDY)
    number = os.environ.get(ENV_TRIAL_NUMBER)
    if not (name and number and os.environ.get(ENV_TRIAL_ID)):
        return None
    pruner = os.environ.get(ENV_PRUNER)
    target = (json.loads(pruner) or {}).get("_target_", "") if pruner else ""
    return {
        "study": name,
        "trial_number": int(number),
        "sampler": os.environ.get(ENV_SAMPLER, ""),
        "pruner": target.rsplit(".", 1)[-1] if target else "NopPruner",
    }


def retry_policy() -> dict[str, Any] | None:
    """``hydra.sweeper.retry`` of the sweep this process works for (None outside a sweep)."""
    text = os.environ.get(ENV_RETRY)
    return json.loads(text) if text else None
