"""Samplers and pruners from their ``_target_`` configs: builders, dependency checks, grid size.

Optuna is imported inside the functions: the public ``sweeper`` imports this module at
Hydra's plugin scan, in every Hydra process, and a plain run should not pay for Optuna.
"""

from __future__ import annotations

import importlib.util
import json
import math
import warnings
from typing import TYPE_CHECKING, Any

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from ._distributions import SearchSpace, grid_values

if TYPE_CHECKING:
    import optuna

# Optional dependencies of samplers: (module to import, pip hint).
SAMPLER_DEPENDENCIES = {
    "CmaEsSampler": [("cmaes", "pip install cmaes")],
    "GPSampler": [("torch", "pip install torch"), ("scipy", "pip install scipy")],
}


def to_dict(cfg: Any) -> dict[str, Any]:
    """A sampler / pruner config (DictConfig, dict or None) as a plain, resolved dict."""
    if cfg is None:
        return {}
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    return dict(cfg)


def target_of(cfg: Any) -> str:
    """The ``_target_`` of a sampler / pruner config ("" when absent)."""
    return str(to_dict(cfg).get("_target_", ""))


def check_sampler_dependencies(target: str) -> None:
    """Raise a clear ImportError when a sampler's optional dependency is missing."""
    for module, hint in SAMPLER_DEPENDENCIES.get(target.rsplit(".", 1)[-1], []):
        if importlib.util.find_spec(module) is None:
            raise ImportError(
                f"{target} needs the '{module}' package, which is not installed: `{hint}` "
                "(or choose another hydra/sweeper/sampler)"
            )


def build_sampler(
    sampler_cfg: Any, space: SearchSpace, seed_offset: int = 0
) -> optuna.samplers.BaseSampler:
    """Sampler from its ``_target_`` config; the grid sampler gets the grid of ``space``."""
    import optuna

    spec = to_dict(sampler_cfg)
    target = spec.get("_target_", "")
    check_sampler_dependencies(target)
    if spec.get("seed") is not None:
        spec["seed"] = int(spec["seed"]) + seed_offset
    if target.endswith("GridSampler"):
        spec["search_space"] = {name: grid_values(p) for name, p in space.params.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return instantiate(spec)


def sampler_json(sampler_cfg: Any) -> str | None:
    """The sampler config as JSON for suggest calls inside a task (None: grid, random)."""
    spec = to_dict(sampler_cfg)
    return None if spec.get("_target_", "").endswith("GridSampler") else json.dumps(spec)


def sampler_from_json(text: str | None, seed_offset: int = 0) -> optuna.samplers.BaseSampler:
    """The configured sampler rebuilt in a worker, its seed offset by the trial number (so
    workers do not replay each other's draws); RandomSampler when there is none."""
    import optuna

    spec = json.loads(text) if text else None
    if not spec:
        return optuna.samplers.RandomSampler()
    if spec.get("seed") is not None:
        spec["seed"] = int(spec["seed"]) + seed_offset
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return instantiate(spec)


def pruner_json(pruner_cfg: Any) -> str | None:
    """The pruner config as JSON, the form worker processes rebuild it from (None: no pruner)."""
    return json.dumps(to_dict(pruner_cfg)) if pruner_cfg else None


def pruner_from_json(text: str | None) -> optuna.pruners.BasePruner:
    """Pruner from its JSON config (``{"_target_": ...}``); NopPruner when absent."""
    import optuna

    spec = json.loads(text) if text else None
    if not spec:
        return optuna.pruners.NopPruner()
    return instantiate(spec)


def build_pruner(pruner_cfg: Any) -> optuna.pruners.BasePruner:
    """Pruner from its ``_target_`` config (None -> NopPruner)."""
    return pruner_from_json(pruner_json(pruner_cfg))


def grid_size(space: SearchSpace) -> int:
    """Number of grid points of ``space``."""
    return math.prod(len(grid_values(p)) for p in space.params.values())
