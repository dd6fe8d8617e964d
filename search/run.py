"""Entry point: `python search/run.py [overrides]` trains one model; add `-m` to sweep.

Thin by design: Hydra composes conf/, `search.training.trainer.train` does the work and returns the
objective for the sweeper.
"""

from __future__ import annotations

import sys

import hydra
from hydra.types import RunMode
from omegaconf import DictConfig

from search import sweep_context
from search.config_checks import ConfigError, register_resolvers
from search.tracking.mlflow_runs import TrackingError

register_resolvers()  # ${objective_direction:...} in the search spaces (sweep direction)


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float | list[float]:
    """Train and evaluate one configuration; return the objective."""
    from hydra.core.hydra_config import HydraConfig

    from search.quiet_start import quiet_native_start

    # imported here so the sweeper process never loads TF; its native start-up lines go
    with quiet_native_start(verbose=bool(HydraConfig.get().verbose)):
        from search.training.trainer import train

    if HydraConfig.get().mode == RunMode.MULTIRUN:
        return train(cfg)  # a trial's error goes to the sweeper, which records and retries it
    try:
        return train(cfg)
    except (ConfigError, TrackingError) as error:
        # Named errors (the key or store, and the fix) need no traceback in front of them;
        # Hydra would print one. Any other error keeps its traceback: it is a bug to report.
        raise SystemExit(sweep_context.redact(f"error: {error}")) from None


if __name__ == "__main__":
    # A URL with a password on the command line goes to the environment before Hydra composes
    # and saves the overrides (.hydra/, multirun.yaml): the config holds ${oc.env:...} instead.
    sys.argv = sweep_context.secrets_out_of_overrides(sys.argv)
    try:
        main()
    except KeyboardInterrupt:
        # The step that was cut has already said where it stopped (and closed its runs); a
        # traceback of where the signal landed adds nothing. 130: the shell's Ctrl-C status.
        print("interrupted (Ctrl-C)", file=sys.stderr)
        raise SystemExit(130) from None
