"""Local worker processes: one spawned process per slot, recycled every few trials.

Each slot has its own single-process ``ProcessPoolExecutor(mp_context=spawn)``, replaced
after ``trials_per_worker`` trials, and spawned under the slot's environment (threads,
``CUDA_VISIBLE_DEVICES``), so the worker has them before the main script imports numpy or
TF. What runs inside the worker is ``_worker.init_worker`` (once) and ``_worker.run_trial``
(per trial). They travel pickled by reference, which holds because ``_worker`` is private:
Hydra's plugin scan never re-executes it, so they stay the module's own objects.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import pickle
import shutil
import signal
import subprocess
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from hydra.core.singleton import Singleton

from .. import trial_context as tc
from .._worker import TrialTask, WorkerSetup, init_worker, run_trial

# Named as before the module went private, so its log lines read as they did.
log = logging.getLogger(__name__.replace("._", "."))


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


def worker_setup_common(
    hydra_context: Any,
    task_function: Any,
    config: Any,
    *,
    url: str,
    study_name: str,
    sampler_name: str,
    pruner_json: str | None,
    sampler_json: str | None = None,
    threads: int,
    n_objectives: int,
    heartbeat_interval: int | None,
    max_retry: int | None,
    retry_json: str | None = None,
) -> dict[str, Any]:
    """The ``WorkerSetup`` fields every slot shares (the slot adds its GPU to ``env``)."""
    payload = _pickle_payload(
        hydra_context.config_loader, hydra_context.callbacks, config, Singleton.get_state()
    )
    env = {
        "OMP_NUM_THREADS": str(threads),
        "TF_NUM_INTRAOP_THREADS": str(threads),
        "TF_NUM_INTEROP_THREADS": str(threads),
        tc.ENV_THREADS: str(threads),
        tc.ENV_STUDY: study_name,
        tc.ENV_STORAGE: url,
        tc.ENV_SAMPLER: sampler_name,
        **({tc.ENV_SAMPLER_CONFIG: sampler_json} if sampler_json else {}),
        **({tc.ENV_RETRY: retry_json} if retry_json else {}),
    }
    return {
        "payload": payload,
        "env": env,
        "parent_pid": os.getpid(),
        "task_module": getattr(task_function, "__module__", "__main__"),
        # A callable object has no __qualname__: it travels pickled (by reference to its
        # class, so the class must be importable, e.g. defined at the script's top level).
        "task_qualname": getattr(task_function, "__qualname__", ""),
        "task_pickle": None if hasattr(task_function, "__qualname__")
        else pickle.dumps(task_function),
        "storage_url": url,
        "study_name": study_name,
        "pruner_json": pruner_json,
        "n_objectives": n_objectives,
        "heartbeat_interval": heartbeat_interval or None,
        "max_retry": max_retry,
    }


class LocalProcessExecutor:
    """Slots backed by spawned worker processes on this machine (one GPU per slot if any)."""

    def __init__(
        self, setup_common: dict[str, Any], gpus: list[str], trials_per_worker: int | None
    ) -> None:
        self.setup_common = setup_common
        self.gpus = gpus
        self.trials_per_worker = trials_per_worker or None  # 0 / null = reuse
        self.executors: dict[int, ProcessPoolExecutor] = {}
        self.slot_tasks: dict[int, int] = {}

    def gpu_of(self, slot: int) -> str | None:
        return self.gpus[slot % len(self.gpus)] if self.gpus else None

    def _slot_env(self, slot: int) -> dict[str, str]:
        env = dict(self.setup_common["env"])
        gpu = self.gpu_of(slot)
        if gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = gpu
        return env

    def _executor(self, slot: int) -> ProcessPoolExecutor:
        """The slot's single-process executor; replaced after ``trials_per_worker`` trials.

        The sweeper recycles workers itself (rather than ``max_tasks_per_child``, whose
        replacement process is spawned by the executor's thread at any moment) so that
        every worker is spawned here, in ``submit``, under the slot's environment.
        """
        limit = self.trials_per_worker
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

    def submit(self, slot: int, task: TrialTask) -> Future:
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

    def failure(self, slot: int, error: BaseException) -> tuple[str, bool]:
        if isinstance(error, BrokenProcessPool):
            dead = self.executors.pop(slot, None)
            return "worker process died abruptly" + _exit_cause(dead), True
        return f"{type(error).__name__}: {error}", False

    def retire(self, slot: int) -> None:
        """Let the slot's worker exit (it was preempted); the next trial gets a new one."""
        executor = self.executors.pop(slot, None)
        if executor is not None:
            executor.shutdown(wait=False)

    def signal_workers(self, signum: int) -> None:
        """Send ``signum`` to every live worker process (the sweeper's preemption relay)."""
        for executor in self.executors.values():
            for process in list((getattr(executor, "_processes", None) or {}).values()):
                with contextlib.suppress(OSError, ValueError):
                    if process.pid and process.is_alive():
                        os.kill(process.pid, signum)

    def shutdown(self) -> None:
        for ex in self.executors.values():
            ex.shutdown(wait=True, cancel_futures=True)
        self.executors.clear()


def _exit_cause(executor: ProcessPoolExecutor | None) -> str:
    """How the slot's worker ended, e.g. " (SIGKILL: out of memory, or kill -9)".

    concurrent.futures does not say; its worker Process objects (a private attribute, read
    only here) carry the exit code once joined.
    """
    processes = list((getattr(executor, "_processes", None) or {}).values())
    for process in processes:
        process.join(timeout=2)
    codes = [p.exitcode for p in processes if p.exitcode is not None]
    if not codes:
        return " (killed by a signal or out of memory?)"
    code = codes[0]
    if code == -signal.SIGKILL:
        return " (SIGKILL: out of memory (the kernel's OOM killer), or kill -9)"
    if code == -signal.SIGABRT:
        return " (SIGABRT: aborted, often a failed allocation: out of memory?)"
    if code < 0:
        return f" ({signal.Signals(-code).name})"
    if code == 128 + signal.SIGTERM:
        return " (exit code 143: preempted, SIGTERM's grace period ended)"
    return f" (exit code {code})"


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
    try:  # optional at import: without it, plain pickle
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
