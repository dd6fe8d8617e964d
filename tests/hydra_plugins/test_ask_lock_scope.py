"""The ask lock holds only the reservation of a trial, never the sampler (issue 29, item 6);
the budget stays exact. Real SQLite studies, the real flock lock, real samplers and processes."""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState, create_trial

from hydra_plugins.optuna_pruning_sweeper import _storage as st
from hydra_plugins.optuna_pruning_sweeper import _study as sweep_study


class LockWatchingSampler(optuna.samplers.TPESampler):
    """TPE that records, for each of its hooks, whether the ask lock was held."""

    def __init__(self, lock: st.AskLock) -> None:
        super().__init__(seed=0, n_startup_trials=2, multivariate=True)
        self.lock = lock
        self.calls: list[tuple[str, bool]] = []

    def before_trial(self, study, trial):
        self.calls.append(("before_trial", self.lock.held))
        super().before_trial(study, trial)

    def infer_relative_search_space(self, study, trial):
        self.calls.append(("infer_relative_search_space", self.lock.held))
        return super().infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space):
        self.calls.append(("sample_relative", self.lock.held))
        return super().sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, name, distribution):
        self.calls.append(("sample_independent", self.lock.held))
        return super().sample_independent(study, trial, name, distribution)


def test_the_lock_is_held_while_inside_and_only_then(tmp_path):
    lock = st.AskLock(f"sqlite:///{tmp_path / 'o.db'}", "s")
    assert not lock.held
    with lock():
        assert lock.held
    assert not lock.held
    lock.close()


def test_no_sampler_work_happens_under_the_ask_lock(tmp_path):
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    storage = st.make_storage(url, None, None, None)
    lock = st.AskLock(url, "s")
    sampler = LockWatchingSampler(lock)
    study = optuna.create_study(study_name="s", storage=storage, sampler=sampler)
    for _ in range(5):  # past TPE's start-up trials: relative sampling over the history
        trial = sweep_study.ask_within_budget(study, storage, lock, 5, heartbeat_interval=None)
        x = trial.suggest_float("x", 0, 1)
        trial.suggest_int("n", 1, 8)
        study.tell(trial, x)
    assert sweep_study.ask_within_budget(study, storage, lock, 5, None) is None  # budget used
    hooks = {name for name, _ in sampler.calls}
    assert {"before_trial", "sample_relative", "sample_independent"} <= hooks
    assert [c for c in sampler.calls if c[1]] == []  # none of them ran under the lock
    lock.close()


def add_trials(study: optuna.Study) -> None:
    """The counting rule's cases: retried failures, a queued retry, running, finished."""
    dist = {"x": optuna.distributions.FloatDistribution(0, 1)}

    def add(state: TrialState, **system_attrs: object) -> None:
        study.add_trial(create_trial(state=state, value=0.0 if state == TrialState.COMPLETE
                                     else None, params={"x": 0.5}, distributions=dist,
                                     system_attrs=system_attrs))

    add(TrialState.COMPLETE)
    add(TrialState.PRUNED)
    add(TrialState.FAIL)  # 2: retried by 5
    add(TrialState.FAIL)  # 3: never retried, counted
    add(TrialState.RUNNING)
    add(TrialState.FAIL, failed_trial=2, retry_history=[2])  # 5: retried by 6
    add(TrialState.WAITING, failed_trial=2, retry_history=[2, 5])  # 6: queued


@pytest.mark.parametrize("attempts", [False, True])
def test_the_lock_counts_as_count_toward_budget(tmp_path, attempts):
    storage = st.make_storage(f"sqlite:///{tmp_path / 'optuna.db'}", None, None, None)
    study = optuna.create_study(study_name="s", storage=storage)
    add_trials(study)
    trials = storage.get_all_trials(study._study_id)
    expected = sweep_study.count_toward_budget(trials, attempts)
    assert expected == (6 if attempts else 4)
    assert sweep_study.counted_in_storage(storage, study._study_id, attempts) == expected


def test_the_queued_retry_is_taken_first_and_the_budget_holds(tmp_path):
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    storage = st.make_storage(url, None, None, None)
    study = optuna.create_study(study_name="s", storage=storage)
    add_trials(study)  # 4 counted
    lock = st.AskLock(url, "s")
    first = sweep_study.ask_within_budget(study, storage, lock, 5, None)
    assert first.number == 6  # the WAITING retry, now RUNNING
    assert sweep_study.ask_within_budget(study, storage, lock, 5, None) is None  # 5 counted
    assert len(study.trials) == 7
    lock.close()


def ask_until_budget(url: str, n_trials: int, out: mp.Queue) -> None:
    """One sweeper-like process: ask, tell, until the shared budget is used."""
    storage = st.make_storage(url, None, None, None)
    study = optuna.load_study(study_name="s", storage=storage)
    lock = st.AskLock(url, "s")
    numbers = []
    while (trial := sweep_study.ask_within_budget(study, storage, lock, n_trials, None)):
        study.tell(trial, trial.suggest_float("x", 0, 1))
        numbers.append(trial.number)
    lock.close()
    out.put(numbers)


def test_concurrent_askers_hold_exactly_n_trials_with_no_duplicate(tmp_path: Path):
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    optuna.create_study(study_name="s", storage=url)
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=ask_until_budget, args=(url, 12, out)) for _ in range(4)]
    for p in procs:
        p.start()
    numbers = [n for _ in procs for n in out.get(timeout=120)]
    for p in procs:
        p.join(timeout=30)
    assert sorted(numbers) == list(range(12))  # no duplicate, none missing
    assert len(optuna.load_study(study_name="s", storage=url).trials) == 12
