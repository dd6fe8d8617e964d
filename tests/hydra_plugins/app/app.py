"""Tiny Hydra app for the sweeper tests: a quadratic with per-epoch reports (no TF).

Knobs (all keyed by the trial number, so tests are deterministic): ``fail_on`` raises,
``nan_on`` returns NaN, ``hang_on`` sleeps for minutes, ``bad_from`` reports a bad curve,
``sleep_first`` / ``sleep`` set the run time, ``multi`` returns two objectives,
``suggest_z`` samples an extra param inside the task.
"""

import os
import time

import hydra
import optuna
from omegaconf import DictConfig

from hydra_plugins.optuna_pruning_sweeper.trial_context import current_trial, trial_info

ENV_SEEN = (
    "CUDA_VISIBLE_DEVICES",
    "OMP_NUM_THREADS",
    "TF_NUM_INTRAOP_THREADS",
    "SWEEPER_THREADS_PER_WORKER",
)


def objective(cfg: DictConfig) -> float | tuple[float, float]:
    """(x - 1)^2 + y^2 + schedule penalty, reported once per epoch."""
    info = trial_info()
    number = info["trial_number"] if info else -1
    if number in cfg.fail_on:
        raise ValueError(f"boom on trial {number}")
    if number in cfg.nan_on:
        return float("nan")
    if number == cfg.hang_on:
        time.sleep(300)
    trial = current_trial()
    if trial is not None:
        trial.set_user_attr("env", {k: os.environ.get(k) for k in ENV_SEEN})
    value = (cfg.x - 1.0) ** 2 + cfg.y**2 + cfg.schedule.penalty
    if cfg.suggest_z and trial is not None:  # define-by-run: a param the task asks itself
        value += trial.suggest_float("z", 0.0, 1.0)
    sleep = cfg.sleep_first if number == 0 and cfg.sleep_first is not None else cfg.sleep
    for epoch in range(cfg.epochs):
        time.sleep(sleep / cfg.epochs)
        reported = 100.0 + epoch if number >= cfg.bad_from else value + cfg.epochs - epoch
        if trial is not None and not cfg.multi:  # Optuna cannot prune multi-objective
            trial.report(reported, epoch)
            if trial.should_prune():
                raise optuna.TrialPruned()
    if cfg.multi:
        return value, float(cfg.y**2)
    return value


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | tuple[float, float]:
    return objective(cfg)


if __name__ == "__main__":
    main()
