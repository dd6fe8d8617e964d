"""SIGTERM in a worker: a grace period to reach a resumable state, then the trial ends
"interrupted" (what SLURM, Kubernetes and spot instances send before they kill).

The first SIGTERM (or SIGUSR1, which the sweeper forwards when only it was signalled) only
records the time: the training loop asks ``requested()`` at every batch boundary and decides
(``search.training.resume``). A second SIGTERM, or the end of ``retry.preempt_grace``, exits at
once; the last resumable state on disk is then what the retry starts from.

Optuna has no "interrupted" state: an interrupted trial is stored FAIL with the user attr
``interrupted`` (the reason) and re-queued; the sweeper's failure rate does not count it.

Standard library only: the public ``sweeper`` imports this module at Hydra's plugin scan, and
``search.sweep_context`` in every trial. A preemption's stop is recognised by its
``trial_interrupted`` attribute, so the task may raise any exception that carries it.
"""

import logging
import os
import signal
import sys
import threading
import time

# Named as before the module went private, so its log lines read as they did.
log = logging.getLogger(__name__.replace("._", "."))

# This process's preemption: grace, first-signal time, timer. A private module, so Hydra's
# plugin scan never re-executes it and the state lives as long as the process.
_STATE: dict = {}
EXIT_CODE = 128 + signal.SIGTERM  # what a shell reports for a process ended by SIGTERM
FORWARDED = signal.SIGUSR1  # the sweeper's "preempt" to its workers (never a second SIGTERM)


class TrialInterrupted(Exception):
    """The trial stopped for a preemption; its last resumable state is on disk."""

    trial_interrupted = True


def is_interruption(error: BaseException | None) -> bool:
    """Whether ``error`` is a preemption's stop (by attribute: see the module note)."""
    return bool(getattr(error, "trial_interrupted", False))


def install(grace_s: float) -> None:
    """Handle SIGTERM / SIGUSR1 in this (worker) process; call from the main thread."""
    reset()
    _STATE["grace"] = float(grace_s)
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(FORWARDED, _on_signal)


def reset() -> None:
    """Forget a preemption (and stop its exit timer): a fresh process's state."""
    timer = _STATE.pop("timer", None)
    if timer is not None:
        timer.cancel()
    _STATE.pop("requested", None)
    _STATE.pop("sigterm", None)


def requested() -> float | None:
    """``time.monotonic()`` of the first preemption signal, None when there was none."""
    return _STATE.get("requested")


def deadline() -> float | None:
    """When the grace period ends (monotonic seconds), None without a preemption."""
    start = requested()
    return None if start is None else start + float(_STATE.get("grace", 0.0))


def _on_signal(signum: int, frame: object) -> None:
    if signum == signal.SIGTERM:
        if _STATE.get("sigterm"):
            _exit_now("a second SIGTERM")
        _STATE["sigterm"] = True
    if _STATE.get("requested") is not None:
        return
    _STATE["requested"] = time.monotonic()
    grace = float(_STATE.get("grace", 0.0))
    log.warning("%s received: reaching a resumable state within %.0f s (pid %d)",
                signal.Signals(signum).name, grace, os.getpid())
    timer = threading.Timer(grace, _exit_now, args=("the end of the grace period",))
    timer.daemon = True
    _STATE["timer"] = timer
    timer.start()


def _exit_now(why: str) -> None:
    log.warning("preempted: exiting at once on %s (the last resumable state stays)", why)
    for handler in logging.getLogger().handlers:
        handler.flush()
    sys.stderr.flush()
    os._exit(EXIT_CODE)
