"""The official hydra-optuna-sweeper's sphere example, as a plain Hydra task (no project code).

``check_modules=true`` makes the task fail if MLflow, TensorFlow or this project's modules
were imported into the worker: a task that does not use them must not need them.
"""

import sys

import hydra
from omegaconf import DictConfig

HEAVY = ("mlflow", "tensorflow", "keras", "search", "models", "data")


@hydra.main(version_base=None, config_path="conf", config_name="config")
def sphere(cfg: DictConfig) -> float:
    x: float = cfg.x
    y: float = cfg.y
    if cfg.get("error", False):
        raise RuntimeError("cfg.error is True")
    if cfg.get("check_modules", False):
        loaded = [m for m in HEAVY if m in sys.modules]
        if loaded:
            raise RuntimeError(f"modules a plain task does not need were imported: {loaded}")
    return x**2 + y**2


if __name__ == "__main__":
    sphere()
