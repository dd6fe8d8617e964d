"""Run names a person can read in MLflow's run table: what was tried and how it ended.

``t025 · adamax · lr 2.6e-3 · d4`` while a trial trains, ``... → val_loss 0.076`` once it is
COMPLETE and ``... · pruned @ epoch 3`` when the pruner stopped it. A single run (no trial)
gets the same description without the trial number, instead of MLflow's random name.
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

SEP = " · "


def describe(cfg: DictConfig) -> list[str]:
    """The few settings that tell trials apart at a glance: optimizer, learning rate, model."""
    parts = []
    optimizer = OmegaConf.select(cfg, "optimizer.name")
    if optimizer:
        parts.append(str(optimizer))
    lr = OmegaConf.select(cfg, "optimizer.learning_rate")
    if isinstance(lr, int | float):
        parts.append(f"lr {float(lr):.1e}".replace("e-0", "e-"))
    depth = OmegaConf.select(cfg, "model.depth")
    backbone = OmegaConf.select(cfg, "model.backbone")
    if isinstance(depth, int):
        parts.append(f"d{depth}")
    elif backbone:
        parts.append(str(backbone))
    return parts


def initial_name(cfg: DictConfig, trial_number: int | None) -> str:
    """The name a run starts with (``tracking.run_name`` wins when set)."""
    given = OmegaConf.select(cfg, "tracking.run_name")
    if given:
        return str(given)
    head = [f"t{trial_number:03d}"] if trial_number is not None else []
    return SEP.join(head + describe(cfg)) or "run"


def final_name(name: str, state: str, objective: str, value: Any, epochs: int | None) -> str:
    """The name once the run ended: its objective value, or where it was pruned."""
    if state == "COMPLETE" and isinstance(value, int | float):
        return f"{name} → {objective} {float(value):.3f}"
    if state == "PRUNED":
        return f"{name}{SEP}pruned" + (f" @ epoch {epochs}" if epochs else "")
    if state == "FAIL":
        return f"{name}{SEP}failed"
    if state == "INTERRUPTED":  # preempted (or Ctrl-C): its retry resumes in a linked run
        return f"{name}{SEP}interrupted"
    return name
