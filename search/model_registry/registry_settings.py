"""The `registry:` section's keys and types; its default values are written only in
`conf/registry/default.yaml`.

`DEFAULTS` is that YAML checked against `RegistrySettings` at import (a missing, unknown or
mistyped key fails here, naming the file and the key); the code takes its fallbacks from it
(the gate, the CLI's options, a config without a `registry` section). Dataclasses and
OmegaConf only: importing this module loads neither TensorFlow nor MLflow.
"""

from __future__ import annotations

from dataclasses import dataclass

from search.evaluation.evaluation_settings import load_defaults

# The gate rules `registry.gate` chooses from (a vocabulary, not a default).
GATES = ("paired_bootstrap", "point")


@dataclass
class EnsembleSettings:
    """`registry.ensemble`: the top-k trials averaged into one registered model."""

    top_k: int  # 0 = off


@dataclass
class FinalStageSettings:
    """`registry.final_stage`: the top_k trials re-trained `repeats` more times."""

    top_k: int  # 0 = off
    repeats: int


@dataclass
class RegistrySettings:
    """`registry.*`: what is registered at a sweep's end and how @champion is decided."""

    enabled: bool
    model_name: str
    metric: str
    tie_break: str
    floor: float | None
    gate: str
    min_per_class: int
    compare_on: str
    ensemble: EnsembleSettings
    final_stage: FinalStageSettings
    cv_folds: int


DEFAULTS: RegistrySettings = load_defaults(RegistrySettings, "registry")
