"""Entry point: `python search/run.py [overrides]` trains one model; add `-m` to sweep.

Thin by design: Hydra composes conf/, `search.train.train` does the work and returns the
objective for the sweeper.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from search.config_checks import register_resolvers

register_resolvers()  # ${objective_direction:...} in the search spaces (sweep direction)


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float | list[float]:
    """Train and evaluate one configuration; return the objective."""
    from search.train import train  # imported here so the sweeper process never loads TF

    return train(cfg)


if __name__ == "__main__":
    main()
