"""Trials on a Ray cluster: each trial is a Ray task with its own CPUs and GPUs.

``hydra.sweeper.executor=ray``. The sweep loop stays where it is (it asks Optuna, samples,
counts and stops in the sweeper process); this executor only places each trial: Ray picks a
node with the trial's resources free (``num_cpus``, ``num_gpus``; one GPU per trial where the
cluster has GPUs, and Ray sets ``CUDA_VISIBLE_DEVICES`` to it), and the loop submits the next
trial as soon as one finishes. Inside the task the same ``_worker.init_worker`` and
``_worker.run_trial`` run as in a local worker process, so trials report per-epoch values to
the shared Optuna storage, tell their own final state and log to MLflow exactly as locally.

What Ray does not decide: retries. Tasks run with ``max_retries=0``, and a task whose node or
worker died comes back as a failed future: the loop records the trial FAIL with the reason
and re-queues it under the sweeper's own policy (``max_retry``, resume from its last state),
so the study total stays exact. Ray is an optional extra (``pip install -e ".[ray]"``): it is
imported inside the functions (``import_ray``), never at Hydra's plugin scan.
"""

import logging
import math
import os
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from .. import _worker as worker
from .. import trial_context as tc
from .._storage import SECRET_ENV_PREFIX, redact
from .._worker import TrialOutcome, TrialTask, WorkerSetup

# Named as before the module went private, so its log lines read as they did.
log = logging.getLogger(__name__.replace("._", "."))

INSTALL = 'pip install -e ".[ray]"'
NODE_ATTR = "ray_node"  # the trial's user attr: the Ray node that ran it


@dataclass(frozen=True)
class RaySettings:
    """``hydra.sweeper.ray.*`` as the executor needs them."""

    address: str | None  # ray://host:10001, auto, or null = a local Ray instance
    num_cpus: float
    num_gpus: float | None  # null = 1 where the cluster has GPUs, else 0
    trials_per_worker: int | None  # Ray's max_calls: 1 = a fresh process per trial


def import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise RuntimeError(f"hydra.sweeper.executor=ray needs Ray: {INSTALL}") from None
    return ray


def run_in_ray(setup: WorkerSetup, task: TrialTask, cwd: str,
               secret_names: tuple[str, ...] = ()) -> TrialOutcome:
    """The Ray task: set the worker up once per process, then run the trial there.

    ``secret_names``: the sweeper's ``SWEEP_SECRET_*`` variables (names only), which the
    config reads (``${oc.env:...}``) and Ray never carries: a node must have them already.
    """
    import ray

    missing = [name for name in secret_names if name not in os.environ]
    if missing:
        raise RuntimeError(
            f"this Ray node's environment lacks {', '.join(missing)}: a password given on the "
            "command line stays in the sweeper's process (it is moved to that variable) and "
            "is never sent through Ray, whose task settings the dashboard shows. Give the "
            "URLs with their passwords in the environment instead (MLFLOW_TRACKING_URI, "
            "OPTUNA_STORAGE, set on every node before `ray start`), or let the sweeper "
            "start a local Ray (hydra.sweeper.ray.address=null), which inherits them")
    if os.path.isdir(cwd):  # relative paths in the config mean the sweeper's folder
        os.chdir(cwd)
    state = worker._STATE
    if state.get("setup_payload") != setup.payload:  # a process Ray reuses: set up once
        worker.init_worker(setup)
        state["setup_payload"] = setup.payload
    node = ray.get_runtime_context().get_node_id()
    tc.get_storage(setup.storage_url).set_trial_user_attr(task.trial_id, NODE_ATTR, node)
    return worker.run_trial(task)


def forwarded_env() -> dict[str, str]:
    """The sweeper's variables a trial on any node needs: the project's own (``XRAY_*``: the
    data caches, fault hooks), the sweep's parent run, and the tracking and study URIs when
    they hold no password.

    Ray keeps a task's environment in its cluster metadata (dashboard, job info), so secrets
    are never sent this way: each node must have those in its own environment, as Ray's
    documentation asks for credentials anyway.
    """
    env = {k: v for k, v in os.environ.items() if k.startswith("XRAY_")}
    # MLFLOW_PARENT_RUN_ID: the sweep's parent run, which each trial's run nests under
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "OPTUNA_STORAGE",
                 "MLFLOW_PARENT_RUN_ID"):
        value = os.environ.get(name)
        if value and urlsplit(value).password is None:
            env[name] = value
    return without_secrets(env)


def without_secrets(env: dict[str, str]) -> dict[str, str]:
    """``env`` without the values that hold a credential (a URL's password, or a secret
    this process holds): Ray shows a task's ``runtime_env`` in its dashboard and job info.
    The study's URL still reaches the worker, in its ``WorkerSetup`` (Ray's object store)."""
    kept = {k: v for k, v in env.items() if redact(v) == v}
    if len(kept) < len(env):
        log.info("Ray executor: %s kept out of the trials' runtime_env (they hold a "
                 "credential)", ", ".join(sorted(set(env) - set(kept))))
    return kept


class RayExecutor:
    """Slots are concurrent Ray tasks; Ray chooses each trial's node."""

    def __init__(self, setup_common: dict[str, Any], settings: RaySettings, n_jobs: int,
                 task_pickle: bytes) -> None:
        ray = import_ray()
        if not ray.is_initialized():
            ray.init(address=settings.address, log_to_driver=True,
                     include_dashboard=False, ignore_reinit_error=True)
        resources = ray.cluster_resources()
        gpus = float(resources.get("GPU", 0.0))
        self.num_gpus = settings.num_gpus if settings.num_gpus is not None else (
            1.0 if gpus else 0.0)
        self.num_cpus = settings.num_cpus
        capacity = resources.get("CPU", 0.0) / self.num_cpus if self.num_cpus else math.inf
        if self.num_gpus:
            capacity = min(capacity, gpus / self.num_gpus)
        if capacity < 1:
            raise ValueError(
                f"the Ray cluster ({resources.get('CPU', 0):g} CPUs, {gpus:g} GPUs) cannot "
                f"hold one trial of hydra.sweeper.ray.num_cpus={self.num_cpus:g}, "
                f"num_gpus={self.num_gpus:g}")
        self.slots = max(1, min(n_jobs, int(capacity)))
        self.setup_common, self.task_pickle = setup_common, task_pickle
        self.max_calls = settings.trials_per_worker or 0
        self.remote: Any = None  # the first submit builds it (see _start_remote)
        self.setup_ref: Any = None
        self.cwd = os.getcwd()
        self.running: dict[int, Any] = {}
        log.info("Ray executor: cluster %s | %d slots of %g CPU, %g GPU per trial",
                 settings.address or "local", self.slots, self.num_cpus, self.num_gpus)

    def _start_remote(self) -> None:
        """The Ray task and its environment, built at the first trial: what the sweeper's
        Hydra callbacks export once the sweep started (its MLflow parent run, set after this
        executor was created) reaches the trials."""
        ray = import_ray()
        threads = max(1, int(self.num_cpus))
        env = {k: v for k, v in self.setup_common["env"].items()
               if k != "CUDA_VISIBLE_DEVICES"}
        env.update(forwarded_env())
        env.update({"OMP_NUM_THREADS": str(threads), "TF_NUM_INTRAOP_THREADS": str(threads),
                    "TF_NUM_INTEROP_THREADS": str(threads), "SWEEPER_THREADS_PER_WORKER":
                    str(threads)})
        # parent_pid 0: a Ray worker is not the sweeper's child (no die-with-parent);
        # the task function travels pickled by value (the script's __main__ is not Ray's).
        self.setup = WorkerSetup(**{**self.setup_common, "env": env, "parent_pid": 0,
                                    "task_pickle": self.task_pickle})
        self.remote = ray.remote(
            num_cpus=self.num_cpus, num_gpus=self.num_gpus, max_retries=0,
            max_calls=self.max_calls, runtime_env={"env_vars": without_secrets(env)},
        )(run_in_ray)
        self.setup_ref = ray.put(self.setup)
        self.secret_names = tuple(sorted(k for k in os.environ
                                         if k.startswith(SECRET_ENV_PREFIX)))

    def submit(self, slot: int, task: TrialTask) -> Future:
        if self.remote is None:
            self._start_remote()
        ref = self.remote.remote(self.setup_ref, task, self.cwd, self.secret_names)
        self.running[slot] = ref
        return ref.future()

    def failure(self, slot: int, error: BaseException) -> tuple[str, bool]:
        ray = import_ray()
        self.running.pop(slot, None)
        lost = (ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError,
                ray.exceptions.ObjectLostError, ray.exceptions.OwnerDiedError,
                ray.exceptions.LocalRayletDiedError, ray.exceptions.TaskCancelledError)
        if isinstance(error, lost):
            first = str(error).strip().splitlines()[0][:300] if str(error) else ""
            return f"Ray worker or node lost ({type(error).__name__}: {first})", True
        cause = getattr(error, "cause", None)  # a RayTaskError: the task's own exception
        if isinstance(error, ray.exceptions.RayTaskError) and isinstance(cause, Exception):
            return f"{type(cause).__name__}: {cause}", False
        return f"{type(error).__name__}: {error}", False

    def gpu_of(self, slot: int) -> str | None:
        return None  # Ray assigns the GPU inside the task (CUDA_VISIBLE_DEVICES)

    def retire(self, slot: int) -> None:
        """Nothing to replace: with ``trials_per_worker`` Ray starts fresh processes."""
        self.running.pop(slot, None)

    def signal_workers(self, signum: int) -> None:
        """A preemption of the sweeper: Ray cancels the running trials (KeyboardInterrupt in
        the task: the worker records the trial FAIL and re-queues it, to resume later)."""
        ray = import_ray()
        for ref in list(self.running.values()):
            try:
                ray.cancel(ref, force=False)
            except Exception:  # noqa: BLE001 - already finished
                log.debug("could not cancel a Ray task", exc_info=True)

    def shutdown(self) -> None:
        self.running.clear()
