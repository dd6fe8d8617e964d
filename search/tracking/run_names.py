"""Run names a person can read in MLflow's run table: how a trial ended, then what it tried.

MLflow 3's runs list cuts a name after about 14 characters, so the outcome comes first:
``t025 adamax d4 lr 2.6e-3`` while a trial trains, ``t025 0.076 adamax d4 lr 2.6e-3`` once
it is COMPLETE (its objective value), ``t025 pruned@3 adamax d4 lr 2.6e-3`` when the pruner
stopped it after epoch 3, ``t025 failed ...`` or ``t025 interrupted ...``. A single run (no
trial) gets the same words without the trial number, instead of MLflow's random name.
"""

from __future__ import annotations

import re
from typing import Any

from omegaconf import DictConfig, OmegaConf

SEP = " "
# The trial number a name opens with (``t025``): the outcome goes right after it.
TRIAL_HEAD = re.compile(r"t\d{3,}")


def describe(cfg: DictConfig) -> list[str]:
    """The few settings that tell trials apart at a glance: optimizer, model, learning rate
    (the longest word last, where the list cuts)."""
    parts = []
    optimizer = OmegaConf.select(cfg, "optimizer.name")
    if optimizer:
        parts.append(str(optimizer))
    depth = OmegaConf.select(cfg, "model.depth")
    backbone = OmegaConf.select(cfg, "model.backbone")
    if isinstance(depth, int):
        parts.append(f"d{depth}")
    elif backbone:
        parts.append(str(backbone))
    lr = OmegaConf.select(cfg, "optimizer.learning_rate")
    if isinstance(lr, int | float):
        parts.append(f"lr {float(lr):.1e}".replace("e-0", "e-"))
    return parts


def initial_name(cfg: DictConfig, trial_number: int | None) -> str:
    """The name a run starts with (``tracking.run_name`` wins when set)."""
    given = OmegaConf.select(cfg, "tracking.run_name")
    if given:
        return str(given)
    head = [f"t{trial_number:03d}"] if trial_number is not None else []
    return SEP.join(head + describe(cfg)) or "run"


def outcome(state: str, value: Any, epochs: int | None) -> str | None:
    """How a run ended in one word: its objective value, ``pruned@3``, ``failed``,
    ``interrupted`` (preempted or Ctrl-C: its retry resumes in a linked run); None while
    it runs."""
    if state == "COMPLETE" and isinstance(value, int | float):
        return f"{float(value):.3f}"
    if state == "PRUNED":
        return "pruned" + (f"@{epochs}" if epochs else "")
    return {"FAIL": "failed", "INTERRUPTED": "interrupted"}.get(state)


def final_name(name: str, state: str, objective: str, value: Any, epochs: int | None) -> str:
    """The name once the run ended: the outcome right after the trial number (`objective`
    names the value in the run's `objective` metric and the sweep's description)."""
    word = outcome(state, value, epochs)
    if word is None:
        return name
    head, _, rest = name.partition(SEP)
    if TRIAL_HEAD.fullmatch(head):
        return SEP.join(p for p in (head, word, rest) if p)
    return f"{word}{SEP}{name}"
