"""The `evaluation:` section's keys and types; its default values are written only in
`conf/evaluation/default.yaml`.

`load_defaults(schema, group)` reads `conf/<group>/default.yaml` onto a dataclass that names
the keys and types (no values), so a key the YAML lacks, adds or mistypes fails at import,
naming the file and the key. `DEFAULTS` is what the code falls back to (a config composed
without the section, a record logged before a key existed). Imports only OmegaConf: the
sweeper's checks (search/config_checks.py) read it too, and stay free of TensorFlow, MLflow
and scikit-learn.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypeVar

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from search import REPO_ROOT

# The checkout's conf/ (search/config_checks.repo_root() is the same folder's parent; that
# module imports this one, so this one cannot import it back).
CONF_DIR = REPO_ROOT / "conf"

Schema = TypeVar("Schema")


def load_defaults(schema: type[Schema], group: str) -> Schema:
    """`conf/<group>/default.yaml` checked against `schema` (a dataclass of keys and types).

    Raises:
        ValueError: naming the file and the key, when the YAML lacks a key, has one the
            schema does not know, or gives a value of the wrong type.
    """
    path = CONF_DIR / group / "default.yaml"
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), OmegaConf.load(path))
        return OmegaConf.to_object(merged)  # type: ignore[return-value]
    except OmegaConfBaseException as error:
        key = getattr(error, "full_key", None) or "?"
        reason = str(getattr(error, "msg", error)).splitlines()[0]
        raise ValueError(f"{path}: {group}.{key}: {reason} (the types are "
                         f"{schema.__module__}.{schema.__name__})") from None


@dataclass
class BootstrapSettings:
    """`evaluation.bootstrap`: the held-out metrics' stratified bootstrap intervals."""

    resamples: int  # 0 = no intervals
    level: float
    seed: int


@dataclass
class EvaluationSettings:
    """`evaluation.*`: the decision threshold, calibration, intervals and external sets."""

    threshold_rule: str
    min_sensitivity: float
    calibration: str
    deployment_prevalence: float | None
    bootstrap: BootstrapSettings
    external: list[Any]
    figures_top_k: int | None  # figures only for a sweep trial in the running top k


DEFAULTS: EvaluationSettings = load_defaults(EvaluationSettings, "evaluation")
