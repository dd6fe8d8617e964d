"""The run's plan: the config values several stages of `train()` share, read once."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig


@dataclass(frozen=True)
class RunPlan:
    """What one training run was asked to do, shared by its stages (data, model, fit, end).

    Attributes:
        objectives: The metric names returned to the sweeper (`check_run_config`'s list).
        output_dir: The job's output folder (checkpoints, metrics.yaml, resumable state).
        data_seed: `seed`: the data split and its order.
        train_seed: `trainer.seed` (else `seed`): weight init and dropout only.
        deterministic: `trainer.deterministic`: TF op determinism.
        threads: `trainer.threads`: TF intra-op threads (None: the sweeper's budget or all).
        max_epochs: `trainer.max_epochs`.
        initial_epoch: `trainer.initial_epoch`: epochs trained before (with `init_weights`).
        monitor: `trainer.monitor`: early stopping, the best-only checkpoint, `best_epoch`.
    """

    objectives: list[str]
    output_dir: Path
    data_seed: int
    train_seed: int
    deterministic: bool
    threads: int | None
    max_epochs: int
    initial_epoch: int
    monitor: str


def plan_run(cfg: DictConfig, objectives: list[str], output_dir: Path) -> RunPlan:
    """The plan of a config that `check_run_config` accepted (it returned `objectives`)."""
    # trainer.seed: weights and dropout only; the data split and its order follow `seed`.
    train_seed = int(cfg.trainer.get("seed") if cfg.trainer.get("seed") is not None
                     else cfg.seed)
    return RunPlan(
        objectives=objectives,
        output_dir=output_dir,
        data_seed=int(cfg.seed),
        train_seed=train_seed,
        deterministic=bool(cfg.trainer.deterministic),
        threads=cfg.trainer.threads,
        max_epochs=int(cfg.trainer.max_epochs),
        initial_epoch=int(cfg.trainer.get("initial_epoch") or 0),
        monitor=str(cfg.trainer.monitor),
    )
