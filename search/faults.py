"""Deterministic fault injection: SIGKILL this process (or its group) at a named point, once.

The fault tests (tests/faults/) set, for the command they run:

==========================  ===============================================================
``XRAY_FAULT``              the point(s) to kill at, comma-separated (see ``POINTS``); a
                            point may carry its own scope: ``promotion@group``
``XRAY_FAULT_MARKER``       a file that must exist for the fault to fire; it is removed when
                            the fault fires, so a retry or a re-run passes the point. With
                            ``{point}`` in it, each point has its own file (several faults
                            in one command, each once)
``XRAY_FAULT_SCOPE``        ``process`` (default: this process, e.g. one sweep worker) or
                            ``group`` (the whole command: sweeper and workers)
``XRAY_FAULT_EPOCH``        the epoch (0-based) of ``mid_epoch``, ``tracking_outage`` and
                            ``preempt``; default 1 (the second epoch)
==========================  ===============================================================

Without ``XRAY_FAULT`` every call is one dictionary lookup.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time

log = logging.getLogger(__name__)

ENV, MARKER_ENV, SCOPE_ENV = "XRAY_FAULT", "XRAY_FAULT_MARKER", "XRAY_FAULT_SCOPE"
POINTS = (
    "data_loading",      # train(): the data is being loaded
    "mid_epoch",         # train(): inside the second epoch, between two batches
    "checkpoint_write",  # the best checkpoint is written but not yet renamed into place
    "model_logging",     # MLflow metrics are logged, the model is being logged
    "sweep_report",      # the sweep-end pipeline's report step (search/sweep/pipeline.py)
    "promotion",         # a version is registered, its alias is not set yet
    "oom",               # train(): a trial runs out of memory (memory_fault), no kill
    "disk_full",         # the second best checkpoint cannot be written: ENOSPC, no kill
    "tracking_outage",   # train(): waits at the second epoch's start while the test
                         # stops the tracking server (pause_point), then trains on
    "preempt",           # train(): SIGTERM (not SIGKILL) between two batches of an epoch,
                         # as SLURM, Kubernetes or a spot instance sends (signal_point)
    "cv_fold",           # the sweep's end: once a cross-validation fold's MLflow run exists,
                         # SIGINT (Ctrl-C) to the sweeper, or with @group to the whole
                         # command (signal_point, search/sweep/cross_validation.py)
)
EPOCH_ENV = "XRAY_FAULT_EPOCH"


def fault_epoch() -> int:
    """The epoch (0-based) the in-training points fire in (``XRAY_FAULT_EPOCH``, default 1)."""
    return int(os.environ.get(EPOCH_ENV) or 1)


def _asked() -> dict[str, str]:
    """The asked points and their scopes."""
    default = os.environ.get(SCOPE_ENV) or "process"
    asked = {}
    for item in os.environ.get(ENV, "").split(","):
        name, _, scope = item.strip().partition("@")
        if name:
            asked[name] = scope or default
    return asked


def armed(point: str) -> bool:
    """Whether ``point`` is asked for (without firing)."""
    return point in _asked()


def marker_of(point: str) -> str | None:
    """The marker file of ``point`` (``{point}`` in ``XRAY_FAULT_MARKER`` is filled in)."""
    marker = os.environ.get(MARKER_ENV)
    return marker.replace("{point}", point) if marker else None


def fires(point: str) -> bool:
    """Whether the fault at ``point`` fires now (at most once per marker file)."""
    if not armed(point):
        return False
    marker = marker_of(point)
    if marker:
        try:
            os.unlink(marker)  # exactly one process fires, even with parallel workers
        except FileNotFoundError:
            return False
    log.warning("fault injection: %s (pid %d)", point, os.getpid())
    return True


def fault_point(point: str) -> None:
    """SIGKILL here if ``XRAY_FAULT`` names ``point`` (and its marker file still exists)."""
    if not fires(point):
        return
    for handler in logging.getLogger().handlers:
        handler.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    if _asked()[point] == "group":
        os.killpg(os.getpgrp(), signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)


def signal_point(point: str, signum: int = signal.SIGTERM) -> None:
    """Send ``signum`` (SIGTERM) to this process or its group if ``point`` fires; the
    process carries on (its handlers decide), unlike ``fault_point``."""
    if not fires(point):
        return
    if _asked()[point] == "group":
        os.killpg(os.getpgrp(), signum)
    else:
        os.kill(os.getpid(), signum)


def pause_point(point: str, limit_s: float = 300.0) -> None:
    """Wait here until the test removes the marker file (it writes ``<marker>.reached``).

    Lets a test act at a known moment of a running job, e.g. stop a tracking server while
    a trial is between two epochs. Without ``XRAY_FAULT`` naming ``point``: no-op.
    """
    marker = marker_of(point)
    if not armed(point) or not marker or not os.path.exists(marker):
        return
    with open(f"{marker}.reached", "w") as reached:
        reached.write(str(os.getpid()))
    log.warning("fault injection: paused at %s until %s is removed", point, marker)
    deadline = time.monotonic() + limit_s
    while os.path.exists(marker) and time.monotonic() < deadline:
        time.sleep(0.2)


def memory_fault() -> None:
    """``oom``: run out of memory here, under an address-space limit a little above use.

    The limit is set with ``resource.setrlimit`` and restored after, so the worker process
    lives on for its next trial, as one would after a trial's oversized allocation failed.
    """
    if not fires("oom"):
        return
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    used = _vm_bytes()
    resource.setrlimit(resource.RLIMIT_AS, (used + (64 << 20), hard))
    try:
        bytearray(512 << 20)  # what a too-large batch or model would ask for
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def _vm_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmSize in /proc/self/status")
