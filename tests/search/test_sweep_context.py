"""What the runs after a sweep read of it: the objective's direction and the job budget."""

from __future__ import annotations

import os

import pytest

from search import sweep_context


@pytest.mark.parametrize(("direction", "expected"), [
    (None, False), ("minimize", False), ("maximize", True),
    (["maximize", "minimize"], True), (["minimize", "maximize"], False)])
def test_the_first_direction_decides(direction, expected):
    sweeper = {} if direction is None else {"direction": direction}
    assert sweep_context.maximizes({"hydra": {"sweeper": sweeper}}) is expected


def test_jobs_and_threads_follow_the_sweepers_rule():
    cores = len(os.sched_getaffinity(0))
    assert sweep_context.sweep_jobs({}) == (1, cores)
    assert sweep_context.sweep_jobs({"hydra": {"sweeper": {"n_jobs": 2}}}) == (
        2, max(1, cores // 2))
    assert sweep_context.sweep_jobs({"hydra": {"sweeper": {"n_jobs": 4 * cores}}})[1] == 1
    assert sweep_context.sweep_jobs(
        {"hydra": {"sweeper": {"n_jobs": 2, "threads_per_worker": 3}}}) == (2, 3)
