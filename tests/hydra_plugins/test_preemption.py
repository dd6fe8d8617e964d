"""SIGTERM in a worker process (real signals to a real child process): the first only starts
the grace period, a second one or the end of the grace period exits at once with 143."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from hydra_plugins.optuna_pruning_sweeper import _preemption as preemption
from hydra_plugins.optuna_pruning_sweeper._study import count_toward_budget

CHILD = """
import os, signal, sys, time
from hydra_plugins.optuna_pruning_sweeper import _preemption as preemption
preemption.install({grace})
print("ready", flush=True)
sys.stdin.readline()
os.kill(os.getpid(), signal.{first})
print("asked", preemption.requested() is not None, flush=True)
sys.stdin.readline()
{second}
time.sleep(30)
print("never", flush=True)
"""


def child(grace: float, first: str = "SIGTERM", second: str = "") -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", CHILD.format(grace=grace, first=first,
                                                                 second=second)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    proc.stdin.write("\n")
    proc.stdin.flush()
    assert proc.stdout.readline().strip() == "asked True"  # the first signal: still running
    return proc


@pytest.mark.parametrize("first", ["SIGTERM", "SIGUSR1"])  # SIGUSR1: the sweeper's relay
def test_the_grace_period_ends_in_exit_143(first):
    proc = child(1.0, first)
    started = time.monotonic()
    assert proc.wait(timeout=20) == preemption.EXIT_CODE == 143
    assert 0.5 < time.monotonic() - started < 10


def test_a_second_sigterm_exits_at_once():
    proc = child(600.0, second="os.kill(os.getpid(), signal.SIGTERM)")
    proc.stdin.write("\n")
    proc.stdin.flush()
    started = time.monotonic()
    assert proc.wait(timeout=20) == 143
    assert time.monotonic() - started < 10  # not the 600 s grace


def test_the_relay_and_a_group_sigterm_do_not_count_as_two():
    proc = child(600.0, second="os.kill(os.getpid(), signal.SIGUSR1)")
    proc.stdin.write("\n")
    proc.stdin.flush()
    with pytest.raises(subprocess.TimeoutExpired):
        proc.wait(timeout=2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_retry_count_attempts_makes_every_attempt_use_up_the_budget():
    import optuna

    study = optuna.create_study()
    first = study.ask()
    study.tell(first, state=optuna.trial.TrialState.FAIL)
    callback = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=3)
    callback(study, study.trials[0])
    retry = study.ask()  # the WAITING copy
    study.tell(retry, 0.5)
    trials = study.trials
    assert count_toward_budget(trials) == 1  # retry.count=trials: the retried attempt is free
    assert count_toward_budget(trials, attempts=True) == 2


@pytest.mark.parametrize(("retry", "key"), [({"count": "some"}, "retry.count"),
                                            ({"every_epochs": 0}, "retry.every_epochs")])
def test_bad_retry_settings_are_refused_naming_the_key(retry, key):
    from hydra_plugins.optuna_pruning_sweeper.config import OptunaPruningSweeperConf, RetryConf
    from hydra_plugins.optuna_pruning_sweeper.sweeper import validate

    with pytest.raises(ValueError, match=key):
        validate(OptunaPruningSweeperConf(retry=RetryConf(**retry)))

