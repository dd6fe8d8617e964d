"""A ``dry_run_check`` for the sphere example: refuse what a real task would fail on."""

from omegaconf import DictConfig


def refuse_negative_x(cfg: DictConfig) -> None:
    if cfg.x < 0:
        raise ValueError(f"x={cfg.x} is negative")
