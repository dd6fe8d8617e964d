"""Hydra Sweeper plugin: Optuna with pruning, worker processes, resume and shared studies.

A thin class: Hydra instantiates it from ``hydra/sweeper: optuna_pruning`` (see
``config``); the work is done by ``_impl.OptunaPruningSweeperImpl``, imported lazily so
that Hydra's plugin scan (every Hydra process) does not import Optuna.
"""

from __future__ import annotations

from typing import Any

from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig


class OptunaPruningSweeper(Sweeper):
    """Sweeper whose config keys are documented on ``config.OptunaPruningSweeperConf``."""

    def __init__(self, **config: Any) -> None:
        from ._impl import OptunaPruningSweeperImpl

        self.sweeper = OptunaPruningSweeperImpl(**config)

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        self.sweeper.setup(hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: list[str]) -> dict[str, Any]:
        """Run the sweep; returns the summary also written to optuna_summary.yaml."""
        return self.sweeper.sweep(arguments)
