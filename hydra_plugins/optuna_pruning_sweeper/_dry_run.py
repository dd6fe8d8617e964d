"""``hydra.sweeper.dry_run=N``: prove a sweep in seconds before it trains for hours.

Samples N trials from the real sampler and search space (conditional rule, command-line
fixes, ``custom_search_space``) on a throw-away in-memory study, so the real study is never
touched. For each trial it composes the trial's full config exactly as a worker would
(``load_sweep_config`` with the trial's overrides) and calls ``dry_run_check`` (the app's own
validation, e.g. building the model and optimizer without training). One line per trial,
then a verdict; a trial that would fail makes the sweep exit non-zero with its reason.

Optuna is imported inside the functions: the public ``sweeper`` imports this module at
Hydra's plugin scan, in every Hydra process, and a plain run should not pay for Optuna.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from ._conditions import ConditionResolver, sample_trial
from ._distributions import format_override
from ._hooks import extend_trial
from ._samplers import build_sampler

# Named as before the module went private, so its log lines read as they did.
log = logging.getLogger(__name__.replace("._", "."))


class DryRunFailed(RuntimeError):
    """A dry-run trial would fail; the message names the trial and its reason."""


def compose_trial(config_loader: Any, master: DictConfig, lines: list[str], number: int) -> Any:
    """The trial's composed config, as the worker builds it (Hydra's ``load_sweep_config``)."""
    cfg = config_loader.load_sweep_config(master, list(lines))
    with open_dict(cfg):
        cfg.hydra.job.id = f"{cfg.hydra.job.name}_{number}"
        cfg.hydra.job.num = number
    HydraConfig.instance().set_config(cfg)  # ${hydra:...} resolves as in the job
    return cfg


def dry_run(
    n: int,
    resolver: ConditionResolver,
    sampler_conf: Any,
    directions: list[str],
    config: DictConfig,
    config_loader: Any,
    custom: Callable[..., Any] | None,
    check: Callable[[Any], Any] | None,
) -> dict[str, Any]:
    """Sample, compose and check ``n`` trials; returns the verdict or raises DryRunFailed."""
    import optuna

    sampler = build_sampler(sampler_conf, resolver.space, seed_offset=0)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(directions=directions, sampler=sampler)  # in memory
    fixed_keys = set(resolver.space.fixed)
    saved = HydraConfig.instance().cfg
    failures: list[tuple[int, str]] = []
    t0 = time.monotonic()
    log.info("Dry run: %d trial(s) sampled by %s; nothing trains, the study is untouched",
             n, type(sampler).__name__)
    try:
        for number in range(n):
            trial = study.ask()
            start = time.monotonic()
            lines: list[str] = []
            try:
                params, lines = sample_trial(trial, resolver)
                extra = extend_trial(custom, config, trial, params, fixed_keys)
                lines = lines + [format_override(k, v) for k, v in extra.items()]
                cfg = compose_trial(config_loader, config, lines, number)
                if check is not None:
                    check(cfg)
            except Exception as e:  # noqa: BLE001 - a failing trial is the verdict
                reason = f"{type(e).__name__}: {e}".strip()
                failures.append((number, reason))
                log.error("dry run %d/%d FAIL (%.1fs) %s\n    %s", number + 1, n,
                          time.monotonic() - start, " ".join(lines),
                          reason.replace("\n", "\n    "))
            else:
                log.info("dry run %d/%d ok   (%.1fs) %s", number + 1, n,
                         time.monotonic() - start, " ".join(lines))
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
    finally:
        if saved is not None:
            HydraConfig.instance().set_config(saved)
    verdict = {"dry_run": n, "ok": n - len(failures), "failed": len(failures),
               "elapsed_s": round(time.monotonic() - t0, 1)}
    if failures:
        number, reason = failures[0]
        raise DryRunFailed(
            f"Dry run: {len(failures)} of {n} sampled trials would fail; trial {number}: "
            f"{reason}"
        )
    log.info("Dry run passed: %d of %d sampled trials compose%s (%.1fs)", n, n,
             " and pass the check" if check is not None else "", verdict["elapsed_s"])
    return verdict
