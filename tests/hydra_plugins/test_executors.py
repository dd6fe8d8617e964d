"""Choosing where trials run: the executor setting and Ray as an optional extra."""

from __future__ import annotations

import pytest


def test_executor_ray_without_ray_says_how_to_install_it(monkeypatch):
    import sys

    from hydra_plugins.optuna_pruning_sweeper._executors._ray_cluster import import_ray

    monkeypatch.setitem(sys.modules, "ray", None)  # as where Ray is not installed
    with pytest.raises(RuntimeError, match=r'executor=ray needs Ray: pip install -e "\.\[ray\]"'):
        import_ray()


def test_an_unknown_executor_is_refused_naming_the_key():
    from hydra_plugins.optuna_pruning_sweeper.config import OptunaPruningSweeperConf
    from hydra_plugins.optuna_pruning_sweeper.sweeper import validate

    with pytest.raises(ValueError, match="hydra.sweeper.executor='slurm'; use local or ray"):
        validate(OptunaPruningSweeperConf(executor="slurm"))
