"""What the benchmarks that train with the platform share: config composition and a private
MLflow store in a work folder."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def compose(overrides: list[str]) -> Any:
    """The project's config with `overrides`, as `search/run.py` composes it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(str(REPO / "conf"), version_base=None):
        return hydra_compose("config", overrides=overrides)


def private_store(workdir: Path | None, prefix: str) -> Path:
    """A work folder (a new temporary one if None) whose SQLite store MLflow uses from now on,
    with TensorFlow's and MLflow's progress noise off."""
    workdir = workdir or Path(tempfile.mkdtemp(prefix=prefix))
    workdir.mkdir(parents=True, exist_ok=True)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{workdir / 'mlflow.db'}"
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    return workdir
