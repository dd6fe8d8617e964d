"""Credentials in store URLs never reach logs, params, artifacts or summaries."""

from __future__ import annotations

from omegaconf import OmegaConf

from hydra_plugins.optuna_pruning_sweeper._storage import redact
from search.sweep.hydra_callbacks import redacted_sweeper_yaml
from search.tracking import mlflow_runs as tracking

SECRET = "s3cret-Pw"


def test_storage_and_tracking_urls_are_masked():
    for url in (f"postgresql://bob:{SECRET}@db:5432/optuna",
                f"postgresql+psycopg://bob:{SECRET}@db/optuna"):
        assert SECRET not in redact(url) and "bob" in redact(url)
        assert SECRET not in tracking.redact_uri(url)
    assert SECRET not in tracking.redact_uri(f"http://alice:{SECRET}@mlflow:5000")
    assert tracking.redact_uri("sqlite:////data/mlflow.db") == "sqlite:////data/mlflow.db"


def test_sweeper_settings_artifact_masks_the_storage_password():
    sweeper = OmegaConf.create({"storage": f"postgresql://bob:{SECRET}@db/optuna",
                                "n_trials": 3})
    text = redacted_sweeper_yaml(sweeper)
    assert SECRET not in text and "postgresql://bob:***@db/optuna" in text
    env_based = OmegaConf.create({"storage": "${oc.env:OPTUNA_STORAGE}"})
    assert "${oc.env:OPTUNA_STORAGE}" in redacted_sweeper_yaml(env_based)  # left unresolved


def test_run_params_and_config_artifact_mask_the_tracking_password(compose_cfg):
    cfg = compose_cfg(f"tracking.uri=http://alice:{SECRET}@mlflow:5000")
    clean = tracking.redacted(cfg)
    assert SECRET not in OmegaConf.to_yaml(clean)
    assert SECRET not in str(tracking.flatten_config(clean))
    assert tracking.flatten_config(clean)["tracking.uri"] == "http://alice:***@mlflow:5000"
