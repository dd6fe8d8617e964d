"""What runs inside a sweeper worker process: one Hydra job per trial, then the tell.

The local executor (``_executors._local``) gives each concurrent slot its own single-process
``ProcessPoolExecutor(mp_context=spawn)``, replaced after ``trials_per_worker`` trials, and
spawns it under the slot's environment (threads, ``CUDA_VISIBLE_DEVICES``), so the worker has
them before the main script imports numpy or TF. ``init_worker`` runs once per process: it
asks the kernel to kill the process when the sweeper dies (``PR_SET_PDEATHSIG``) and
restores Hydra's state (as hydra_joblib_launcher's ``execute_job`` does). ``run_trial`` then,
per trial:

1. exports the trial context (see ``trial_context``) and starts a heartbeat thread;
2. runs the job like Hydra's joblib launcher does (``load_sweep_config`` + ``run_job``),
   so ``on_job_start`` / ``on_job_end`` callbacks fire here;
3. tells the final state itself, so a finished trial is stored even if the sweeper dies:
   COMPLETE with the returned value(s); PRUNED when the task raised ``optuna.TrialPruned``;
   FAIL with user attr ``fail_reason`` for any other exception or a NaN/inf/non-numeric
   result. A KeyboardInterrupt fails the trial and queues a retry with the same params.

Optuna is imported inside the functions: the public ``sweeper`` imports this module at
Hydra's plugin scan, in every Hydra process. ``Singleton.set_state`` rescans the plugins in
the worker; this module is private, so the scan skips it and ``_STATE`` stays.
"""

import contextlib
import copy
import ctypes
import importlib
import inspect
import logging
import math
import os
import pickle
import resource
import signal
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

from hydra._internal.callbacks import Callbacks
from hydra.core.hydra_config import HydraConfig
from hydra.core.singleton import Singleton
from hydra.core.utils import JobStatus, run_job, setup_globals
from hydra.types import HydraContext
from omegaconf import open_dict
from omegaconf.basecontainer import BaseContainer

from . import _console as console
from . import _preemption as preemption
from . import trial_context as tc
from ._storage import redact

# Named as before the module went private, so its log lines read as they did.
log = logging.getLogger(__name__.replace("._", "."))

# This process's Hydra context, config, task function and setup (set once by init_worker).
_STATE: dict[str, Any] = {}

PR_SET_PDEATHSIG = 1
FAIL_REASON_MAX_CHARS = 2000


@dataclass(frozen=True)
class WorkerSetup:
    """Everything a worker process needs once (sent as the executor's initargs)."""

    payload: bytes  # pickled (config_loader, callbacks | None, config, singleton_state)
    env: dict[str, str]  # threads / GPU / study variables for this slot
    parent_pid: int
    task_module: str
    task_qualname: str
    storage_url: str
    study_name: str
    pruner_json: str | None
    n_objectives: int
    heartbeat_interval: int | None
    max_retry: int | None
    task_pickle: bytes | None = None  # a callable object (no qualname to import it by)


@dataclass(frozen=True)
class TrialTask:
    """One trial to run."""

    trial_id: int
    number: int
    overrides: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class TrialOutcome:
    """What the worker told the storage, for the sweeper's progress line."""

    number: int
    state: str  # COMPLETE / PRUNED / FAIL / INTERRUPTED (stored FAIL, re-queued)
    values: list[float] | None
    reason: str | None
    duration_s: float
    pid: int


# --- process setup ---------------------------------------------------------------------------


def die_with_parent(parent_pid: int) -> None:
    """Linux: SIGKILL this process when the sweeper process dies (even by SIGKILL)."""
    if not sys.platform.startswith("linux") or parent_pid <= 0:  # 0: not our child (Ray)
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # no prctl: best effort
        return
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


def init_worker(setup: WorkerSetup) -> None:
    """Executor initializer: never raises (an error is reported by each trial instead)."""
    os.environ.update(setup.env)
    die_with_parent(setup.parent_pid)
    try:
        preemption.install(float((tc.retry_policy() or {}).get("preempt_grace", 60.0)))
    except ValueError:  # not the main thread (a Ray task may run elsewhere): no grace path
        log.info("SIGTERM grace period not installed: not the main thread")
    try:
        setup_globals()
        config_loader, callbacks, config, singleton_state = pickle.loads(setup.payload)
        if singleton_state.get("omegaconf_resolvers") is None:
            # Payload pickled without cloudpickle: keep this process's resolvers.
            singleton_state["omegaconf_resolvers"] = dict(BaseContainer._resolvers)
        Singleton.set_state(singleton_state)  # rescans the plugins (the public modules only)
        if callbacks is None:
            callbacks = Callbacks(config)
        _STATE["hydra_context"] = HydraContext(config_loader=config_loader, callbacks=callbacks)
        _STATE["config"] = config
        _STATE["task_function"] = (
            pickle.loads(setup.task_pickle) if setup.task_pickle is not None
            else resolve_task_function(setup.task_module, setup.task_qualname)
        )
        _STATE.pop("init_error", None)
    except Exception as e:  # noqa: BLE001 - reported as the trial's fail_reason
        _STATE["init_error"] = f"worker setup failed: {type(e).__name__}: {e}"
        log.exception("Sweeper worker setup failed")
    _STATE["setup"] = setup


def resolve_task_function(module: str, qualname: str) -> Any:
    """The undecorated task function from its module and qualname.

    For a script (``python search/run.py``) the module is ``__main__``: spawn re-imports the
    script in the worker as ``__mp_main__`` aliased to ``__main__``, where the attribute is
    Hydra's decorated wrapper, unwrapped here.
    """
    if "<locals>" in qualname:
        raise RuntimeError(
            f"task function {module}.{qualname} is defined inside a function; define it at "
            "module level so worker processes can import it"
        )
    mod = sys.modules.get("__main__") if module in ("__main__", "__mp_main__") else None
    if mod is None:
        mod = importlib.import_module(module)
    obj: Any = mod
    try:
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except AttributeError as e:
        raise RuntimeError(
            f"cannot find task function {qualname!r} in module {module!r} "
            f"({getattr(mod, '__file__', '?')}) in the worker process: {e}"
        ) from e
    return inspect.unwrap(obj)


# --- one trial --------------------------------------------------------------------------------


def values_from_return(value: Any, n_objectives: int) -> list[float]:
    """Objective value(s) of a task's return.

    Raises:
        ValueError: not numeric, wrong count, or NaN/inf.
    """
    if n_objectives == 1:
        if isinstance(value, list | tuple) and len(value) == 1:
            value = value[0]
        try:
            values = [float(value)]
        except (TypeError, ValueError):
            raise ValueError(
                f"the task must return a float, got {type(value).__name__}: {value!r:.200}"
            ) from None
    else:
        if not isinstance(value, list | tuple) or len(value) != n_objectives:
            raise ValueError(
                f"the task must return {n_objectives} floats (one per direction), "
                f"got {value!r:.200}"
            )
        try:
            values = [float(v) for v in value]
        except (TypeError, ValueError):
            raise ValueError(f"the task must return floats, got {value!r:.200}") from None
    bad = [v for v in values if not math.isfinite(v)]
    if bad:
        raise ValueError(f"the task returned a non-finite objective: {values}")
    return values


def _heartbeat(storage: Any, trial_id: int, interval: float, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            storage.record_heartbeat(trial_id)
        except Exception:  # noqa: BLE001 - a missed beat is retried next interval
            log.warning("heartbeat of trial id %d failed", trial_id, exc_info=True)
        stop.wait(interval)


def _export_trial_env(setup: WorkerSetup, task: TrialTask) -> None:
    os.environ[tc.ENV_STORAGE] = setup.storage_url
    os.environ[tc.ENV_STUDY] = setup.study_name
    os.environ[tc.ENV_TRIAL_ID] = str(task.trial_id)
    os.environ[tc.ENV_TRIAL_NUMBER] = str(task.number)
    if setup.pruner_json:
        os.environ[tc.ENV_PRUNER] = setup.pruner_json


def _execute_job(task: TrialTask) -> Any:
    """Run the Hydra job of a trial (mirrors hydra_joblib_launcher's execute_job)."""
    setup_globals()
    hydra_context = _STATE["hydra_context"]
    sweep_config = hydra_context.config_loader.load_sweep_config(
        _STATE["config"], list(task.overrides)
    )
    with open_dict(sweep_config):
        sweep_config.hydra.job.id = f"{sweep_config.hydra.job.name}_{task.number}"
        sweep_config.hydra.job.num = task.number
    HydraConfig.instance().set_config(sweep_config)
    task_function = _STATE["task_function"]
    seen = f"{sweep_config.hydra.sweep.dir}/{console.SEEN_FILE}.{_STATE['setup'].parent_pid}"
    verbose = bool(sweep_config.hydra.verbose)

    def quiet_task(cfg: Any) -> Any:  # run_job configured the job's logging just before
        console.quiet_console(seen, verbose)
        return task_function(cfg)

    return run_job(
        hydra_context=hydra_context,
        task_function=quiet_task,
        config=sweep_config,
        job_dir_key="hydra.sweep.dir",
        job_subdir_key="hydra.sweep.subdir",
    )


def _outcome_of_job(ret: Any, n_objectives: int) -> tuple[str, list[float] | None, str | None]:
    """(state, values, fail reason) of a finished JobReturn."""
    import optuna

    if ret.status == JobStatus.COMPLETED:
        try:
            return "COMPLETE", values_from_return(ret.return_value, n_objectives), None
        except ValueError as e:
            return "FAIL", None, str(e)
    exc = ret._return_value  # the task's exception (return_value would re-raise it)
    if isinstance(exc, optuna.TrialPruned):
        return "PRUNED", None, None
    if preemption.is_interruption(exc):
        log.warning("Trial interrupted: %s", exc)
        return "INTERRUPTED", None, f"interrupted: {exc}"
    log.error("Trial failed: %s: %s", type(exc).__name__, exc, exc_info=exc)
    return "FAIL", None, f"{type(exc).__name__}: {exc}"


def run_trial(task: TrialTask) -> TrialOutcome:
    """Run one trial and tell its final state to the storage."""
    setup: WorkerSetup = _STATE["setup"]
    start = time.monotonic()
    _export_trial_env(setup, task)
    study = tc.load_study(setup.storage_url, setup.study_name, setup.pruner_json)
    storage = tc.get_storage(setup.storage_url)
    storage.set_trial_user_attr(task.trial_id, "worker_pid", os.getpid())

    stop = threading.Event()
    beat = _start_heartbeat(storage, task, setup.heartbeat_interval, stop)
    retry = False
    try:
        if "init_error" in _STATE:
            raise RuntimeError(_STATE["init_error"])
        ret = _execute_job(task)
        state, values, reason = _outcome_of_job(ret, setup.n_objectives)
    except KeyboardInterrupt:
        state, values, reason, retry = "FAIL", None, "interrupted (KeyboardInterrupt)", True
    except BaseException as e:  # noqa: BLE001 - SystemExit included: a trial must be told
        log.error("Trial %d failed before/after its job", task.number, exc_info=True)
        state, values, reason = "FAIL", None, f"{type(e).__name__}: {e}"
    finally:
        stop.set()
        if beat is not None:
            beat.join(timeout=5)
        os.environ.pop(tc.ENV_TRIAL_ID, None)
        os.environ.pop(tc.ENV_TRIAL_NUMBER, None)

    reason = _tell(study, storage, setup, task, state, values, reason, retry)
    return TrialOutcome(
        number=task.number,
        state=state,
        values=values,
        reason=reason,
        duration_s=time.monotonic() - start,
        pid=os.getpid(),
    )


def _start_heartbeat(storage: Any, task: TrialTask, interval: int | None,
                     stop: threading.Event) -> threading.Thread | None:
    """The trial's heartbeat thread, beating until ``stop`` (None: heartbeats are off)."""
    if not interval:
        return None
    beat = threading.Thread(
        target=_heartbeat,
        args=(storage, task.trial_id, interval, stop),
        name=f"heartbeat-{task.number}",
        daemon=True,
    )
    beat.start()
    return beat


def _tell(study: Any, storage: Any, setup: WorkerSetup, task: TrialTask, state: str,
          values: list[float] | None, reason: str | None, retry: bool) -> str | None:
    """Record the worker's memory and the fail reason, tell the final state, re-queue a retry
    when one is due; returns the reason as stored (cut to ``FAIL_REASON_MAX_CHARS``)."""
    import optuna

    _STATE["trials_run"] = _STATE.get("trials_run", 0) + 1
    with contextlib.suppress(Exception):  # memory per trial: growth across trials shows
        storage.set_trial_user_attr(task.trial_id, "worker_rss_mb", round(rss_mb(), 1))
        storage.set_trial_user_attr(task.trial_id, "worker_trial_index", _STATE["trials_run"])
    if reason is not None:
        reason = redact(reason)[:FAIL_REASON_MAX_CHARS]
        storage.set_trial_user_attr(task.trial_id, "fail_reason", reason)
    if state == "INTERRUPTED":  # no such Optuna state: FAIL, marked, always re-queued
        storage.set_trial_user_attr(task.trial_id, "interrupted", reason)
    told = "FAIL" if state == "INTERRUPTED" else state
    study.tell(task.number, values, state=optuna.trial.TrialState[told], skip_if_finished=True)
    if retry or state == "INTERRUPTED":  # a preemption never uses up a restart
        requeue_trial(study, storage.get_trial(task.trial_id),
                      None if state == "INTERRUPTED" else setup.max_retry)
    return reason


def rss_mb() -> float:
    """This process's resident memory now (Linux /proc; else the peak from getrusage)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def requeue_trial(study: Any, failed_trial: Any, max_retry: int | None) -> bool:
    """Queue a WAITING copy of a failed trial, as Optuna does for stale trials.

    The copy carries Optuna's retry system attrs, so the failed trial stops counting
    toward ``n_trials`` (see ``_study.count_toward_budget``). Returns whether a copy was
    queued (False once the trial was retried ``max_retry`` times).
    """
    import optuna

    failed_trial = copy.deepcopy(failed_trial)
    failed_trial.user_attrs = {
        k: v for k, v in failed_trial.user_attrs.items()
        if k not in ("fail_reason", "worker_pid", "interrupted")
    }
    # The callback's own rule: the retry history, this trial included, may hold max_retry.
    history = list(failed_trial.system_attrs.get("retry_history", [])) + [failed_trial.number]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        callback = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=max_retry)
        callback(study, failed_trial)
    return max_retry is None or len(history) <= max_retry
