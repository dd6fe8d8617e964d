"""Which values of a run become MLflow params: what was swept or set, plus a few key ones.

Logging the whole flattened config gave ~90 params per run (Hydra's `_target_`, store URIs,
verbosity...), and the runs table offered 200+ columns. The full resolved config is the
run's `config/config.yaml` artifact; params hold what people compare runs on. Names are the
override keys, the same ones Optuna's trial params and the parent run use.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from omegaconf import DictConfig, OmegaConf

# The config groups a run is described by, and where their option shows when Hydra's
# choices are not known (train(cfg) called directly).
KEY_GROUPS = {"data": "data.source", "model": "model.name", "optimizer": "optimizer.name",
              "lr_schedule": "lr_schedule.kind"}
# Resolved values worth a column on every run, swept or not.
KEY_VALUES = ("optimizer.learning_rate", "data.batch_size", "data.image_size",
              "data.subset_fraction", "trainer.max_epochs", "trainer.patience", "objective",
              "seed", "evaluation.threshold_rule")
# Overrides that say how a run is operated, not what it trains: never params.
NOT_PARAMS = ("hydra.", "tracking.", "registry.", "trainer.verbose", "trainer.threads",
              "trainer.deterministic")


def override_keys(overrides: Iterable[str]) -> list[str]:
    """`model.depth=3`, `+x=1`, `~y` -> the keys, in order, without Hydra's prefixes."""
    keys = []
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~")
        key = key.split("@", 1)[0]  # `group@package=option`: the group
        if key and key not in keys:
            keys.append(key)
    return keys


def _value(cfg: DictConfig, key: str) -> Any:
    value = OmegaConf.select(cfg, key, default=None)
    if OmegaConf.is_config(value):
        return None  # a whole node set by an override (`model={...}`): the artifact has it
    return value


def run_params(cfg: DictConfig, overrides: Iterable[str] = (),
               choices: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The params of one run.

    Args:
        cfg: the resolved job config.
        overrides: the job's task overrides (a trial's sampled values and the fixed ones).
        choices: Hydra's group choices (`hydra.runtime.choices`), when known.
    """
    choices = dict(choices or {})
    params: dict[str, Any] = {}
    for group, fallback in KEY_GROUPS.items():
        option = choices.get(group) or _value(cfg, fallback)
        if option is not None:
            params[group] = option
    for key in override_keys(overrides):
        if key.startswith(NOT_PARAMS):
            continue
        if key in choices:  # a group option (`optimizer=adamax`)
            params[key] = choices[key]
        elif (value := _value(cfg, key)) is not None:
            params[key] = value
    for key in KEY_VALUES:
        if key not in params and (value := _value(cfg, key)) is not None:
            params[key] = value
    return params


def hydra_job_params(cfg: DictConfig) -> dict[str, Any]:
    """`run_params` with the running Hydra job's overrides and choices (none outside Hydra)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return run_params(cfg)
    hydra = HydraConfig.get()
    return run_params(cfg, list(hydra.overrides.task), dict(hydra.runtime.choices))
