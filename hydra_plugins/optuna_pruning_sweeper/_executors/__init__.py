"""What runs a trial where: the sweep loop hands each trial to an executor's slot.

An executor (``TrialExecutor``) owns ``n_jobs`` slots and runs one ``_worker.TrialTask`` per
slot at a time, returning a ``concurrent.futures.Future`` of the ``_worker.TrialOutcome``.
The loop decides (asks Optuna, samples, counts, stops); the executor only runs.
``hydra.sweeper.executor`` picks one of two:

- ``_local.LocalProcessExecutor`` (``local``, the default): a spawned worker process per slot,
  recycled every ``trials_per_worker`` trials, each with its thread budget and GPU;
- ``_ray_cluster.RayExecutor`` (``ray``): each trial a Ray task with its own CPUs and GPUs,
  on whichever node of the cluster has them free.

A private package: its modules start with ``_`` too, since Hydra's plugin scan skips a module
by its own name, not by its package's.
"""

from __future__ import annotations

from concurrent.futures import Future
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from .._worker import TrialTask


class TrialExecutor(Protocol):
    """The part of an executor the sweep loop uses."""

    def submit(self, slot: int, task: TrialTask) -> Future:
        """Start ``task`` on ``slot``; the future holds the worker's TrialOutcome."""

    def failure(self, slot: int, error: BaseException) -> tuple[str, bool]:
        """Why a trial whose future raised ``error`` failed, and whether to retry it.

        Retry when the worker died under the trial (killed, out of memory, node lost): the
        same policy as a stale trial's (``max_retry``). Forget a dead worker.
        """

    def gpu_of(self, slot: int) -> str | None:
        """The GPU id a slot uses (None: CPU only), for progress lines."""

    def retire(self, slot: int) -> None:
        """Let a slot's worker exit after its trial was preempted (a new one follows)."""

    def signal_workers(self, signum: int) -> None:
        """Send ``signum`` to every live worker (the sweeper relays a preemption)."""

    def shutdown(self) -> None:
        """Stop every worker (running trials are told FAIL by their workers)."""
