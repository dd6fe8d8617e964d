"""Held-out scoring for the champion gate: each version scored on the same images, and the
comparison of two scores (point values, or a paired bootstrap beyond noise).

`HeldOutEvaluator` rebuilds the held-out split from the new run's composed config (the test
split, or one of its `evaluation.external` sets with `registry.compare_on`), scores each
registered version there at its own stored threshold, with bootstrap intervals, and
`compare` decides whether the new version beats the champion (see `search.model_registry.champion`).
"""

from __future__ import annotations

import logging
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf

from search.evaluation.metric_maths import MACRO_NAMES, check_metric
from search.model_registry import model_store
from search.model_registry.registry_settings import DEFAULTS, GATES

# its lines read as the gate's, as before the split
log = logging.getLogger("search.model_registry.champion")

DEFAULT_METRIC = DEFAULTS.metric
DEFAULT_TIE_BREAK = DEFAULTS.tie_break
TIE_TOLERANCE = 1e-9


class NoHeldOutSplit(ValueError):
    """The run's config has no test split to compare models on."""


@dataclass
class HeldOutScore:
    """One model version's metrics on the held-out split, at its own stored threshold."""

    version: int
    metric: float
    tie_break: float
    threshold: float | None
    metrics: dict[str, float]
    data_fingerprint: str | None
    y: np.ndarray | None = None  # the compared images' labels and this model's scores,
    scores: np.ndarray | None = None  # in the split's order (for the paired bootstrap)
    intervals: dict[str, list[float]] = field(default_factory=dict)
    external: dict[str, dict[str, Any]] = field(default_factory=dict)  # name: metrics, intervals



@dataclass(frozen=True)
class GateSpec:
    """How a challenger must win (`registry.gate`, `registry.min_per_class`,
    `registry.compare_on`)."""

    rule: str = DEFAULTS.gate
    min_per_class: int = DEFAULTS.min_per_class
    compare_on: str = DEFAULTS.compare_on

    @classmethod
    def from_config(cls, section: Any) -> GateSpec:
        section = section or {}
        spec = cls(str(section.get("gate") or DEFAULTS.gate),
                   int(section.get("min_per_class", DEFAULTS.min_per_class)),
                   str(section.get("compare_on") or DEFAULTS.compare_on))
        if spec.rule not in GATES:
            raise ValueError(f"registry.gate={spec.rule!r} is not one of {', '.join(GATES)}")
        if spec.min_per_class < 1:
            raise ValueError(f"registry.min_per_class={spec.min_per_class} must be >= 1")
        return spec


class HeldOutEvaluator:
    """Scores model versions on the held-out split rebuilt from one run's composed config.

    Each model is fed the split preprocessed its own way (image size, channels): the split's
    membership does not depend on them, which the data fingerprint confirms.
    """

    def __init__(self, cfg: DictConfig, metric: str = DEFAULT_METRIC,
                 tie_break: str = DEFAULT_TIE_BREAK, gate: GateSpec | None = None) -> None:
        from search.evaluation.intervals import BootstrapSpec

        self.cfg = cfg
        self.metric = check_metric(metric)
        self.tie_break = check_metric(tie_break)
        self.gate = gate or GateSpec()
        section = OmegaConf.select(cfg, "evaluation.bootstrap")
        self.bootstrap = BootstrapSpec.from_config(
            OmegaConf.to_container(section) if section is not None else None)
        external = OmegaConf.select(cfg, "evaluation.external")
        self.external_items = OmegaConf.to_container(external) if external is not None else []
        self._external: Any = None
        names = [str(dict(e).get("name")) for e in self.external_items]
        if self.gate.compare_on != "test" and self.gate.compare_on not in names:
            raise ValueError(
                f"registry.compare_on={self.gate.compare_on!r} is neither 'test' nor an "
                f"evaluation.external set of the run's config ({names or 'none configured'})")
        self._bundles: dict[tuple[int, int], Any] = {}
        self._scores: dict[int, HeldOutScore] = {}
        self.fingerprint: str | None = None
        self.n_test: int | None = None
        self.n_compared: int | None = None
        self.class_names: list[str] | None = None

    def description(self) -> dict[str, Any]:
        data = OmegaConf.to_container(self.cfg.data, resolve=True)
        if self.gate.compare_on != "test":
            spec = next(dict(e) for e in self.external_items
                        if str(dict(e).get("name")) == self.gate.compare_on)
            return {"split": f"ext_{self.gate.compare_on}", "n": self.n_compared,
                    "data_fingerprint": self.fingerprint, "path": spec.get("path"),
                    "description": f"external set {self.gate.compare_on} ({self.n_compared} "
                                   f"images, {spec.get('path')})"}
        return {
            "split": "test",
            "seed": int(self.cfg.seed),
            "n": self.n_test,
            "data_fingerprint": self.fingerprint,
            "source": data.get("source"),
            "path": data.get("path") or data.get("root"),
            "description": (
                f"test split of the new run's config (seed {int(self.cfg.seed)}, "
                f"{self.n_test} images, data fingerprint {str(self.fingerprint)[:12]})"
            ),
        }

    def metric_name(self, name: str | None = None) -> str:
        """The metric as this task names it: `sensitivity` is `macro_recall` for K classes,
        and `macro_recall` is `sensitivity` for two."""

        name = name or self.metric
        if self.class_names is None:
            return name
        if len(self.class_names) > 2:
            return MACRO_NAMES.get(name, name)
        return next((b for b, m in MACRO_NAMES.items() if m == name and b != "recall"), name)

    def bundle(self, image_size: int, channels: int) -> Any:
        key = (int(image_size), int(channels))
        if key not in self._bundles:
            from hydra.utils import instantiate

            bundle = instantiate(self.cfg.data, seed=int(self.cfg.seed), image_size=key[0],
                                 channels=key[1], _convert_="all")
            if bundle.n_test == 0:
                raise NoHeldOutSplit(
                    "the run's config has no test split (data.test_fraction=0 and no given "
                    "test split), so models cannot be compared on held-out data; sweep with "
                    "data.test_fraction > 0"
                )
            if self.fingerprint is None:
                self.fingerprint, self.n_test = bundle.fingerprint, bundle.n_test
                self.class_names = list(bundle.class_names)
            elif bundle.fingerprint != self.fingerprint:
                raise RuntimeError(
                    f"rebuilding the split at {key} gave fingerprint {bundle.fingerprint}, not "
                    f"{self.fingerprint}: the split depends on preprocessing, so the comparison "
                    "would not be fair"
                )
            self._bundles[key] = bundle
        return self._bundles[key]

    def score(self, client: MlflowClient, name: str, version: int | str) -> HeldOutScore:
        """Metrics of one registered version (cached per version)."""
        version = int(version)
        if version in self._scores:
            return self._scores[version]
        from search.evaluation import metrics as ev

        mv = client.get_model_version(name, str(version))
        with tempfile.TemporaryDirectory() as tmp:
            folder = model_store.download_version(mv, Path(tmp))
            info = model_store.version_info(client, mv, folder)
            model = model_store.load_keras_safely(folder)
        prep = info["preprocessing"]
        bundle = self.bundle(int(prep["image_size"]), int(prep["channels"]))
        if [c.casefold() for c in info["class_names"]] != [
            c.casefold() for c in bundle.class_names
        ]:  # NORMAL (folder) and normal (npz) are one class
            raise ValueError(
                f"{name} v{version} predicts {info['class_names']} but the held-out split has "
                f"classes {bundle.class_names}; register models of another task under another "
                "--name"
            )
        scores = ev.positive_scores(model.predict(bundle.test, verbose=0))
        threshold = info.get("threshold")
        threshold = None if threshold is None else float(threshold)
        result = ev.evaluate_split("heldout", bundle.y_test, scores, bundle.class_names,
                                   threshold, bootstrap=self.bootstrap)
        external = self.score_external(model, prep, threshold)
        compared = (result, bundle.y_test, scores) if self.gate.compare_on == "test" else \
            external[self.gate.compare_on]
        result, y, scores = compared
        self.n_compared = len(y)
        score = HeldOutScore(
            version=version,
            metric=result.metrics[self.metric_name()],
            tie_break=result.metrics[self.metric_name(self.tie_break)],
            threshold=result.threshold,
            metrics=result.metrics,
            data_fingerprint=info.get("data_fingerprint"),
            y=np.asarray(y), scores=scores,
            intervals={k: list(v) for k, v in result.intervals.items()},
            external={name: {"n": len(ys), "metrics": r.metrics,
                             "intervals": {k: list(v) for k, v in r.intervals.items()}}
                      for name, (r, ys, _) in external.items()},
        )
        log.info("%s v%s on %s: %s %.4f, %s %.4f", name, version,
                 self.description()["split"], self.metric_name(), score.metric,
                 self.metric_name(self.tie_break), score.tie_break)
        self._scores[version] = score
        return score


    def score_external(self, model: Any, prep: dict[str, Any], threshold: float | None
                       ) -> dict[str, tuple[Any, np.ndarray, np.ndarray]]:
        """{name: (evaluation, labels, scores)} on the run's `evaluation.external` sets."""
        from search.evaluation.external import ExternalSets, external_specs, score_sets

        if not self.external_items:
            return {}
        if self._external is None:
            self._external = ExternalSets(external_specs(self.external_items),
                                          list(self.class_names or []))
        sets = self._external.at(int(prep["image_size"]), int(prep["channels"]))
        results = score_sets(model, sets, list(self.class_names or []), threshold,
                             self.bootstrap)
        return {name: (r, r.extra.pop("y"), r.extra.pop("scores")) for name, r in results.items()}

    def compare(self, new: HeldOutScore, champion: HeldOutScore
                ) -> tuple[bool, str, dict[str, Any]]:
        """(promoted, reason, paired difference) of `new` against `champion`."""
        from search.evaluation.intervals import paired_difference

        y = new.y
        if y is not None:
            counts = {c: int((y == i).sum()) for i, c in enumerate(self.class_names or [])}
            small = {c: n for c, n in counts.items() if n < self.gate.min_per_class}
            if small:
                return False, (
                    f"too small to decide: the compared split holds {len(y)} images, "
                    + ", ".join(f"{n} of class {c}" for c, n in small.items())
                    + f" (registry.min_per_class={self.gate.min_per_class}); not promoted, the "
                    "champion stays; compare on a larger split"), {"counts": counts}
        if self.gate.rule == "point" or y is None or champion.scores is None:
            promoted, reason = beats(new, champion)
            return promoted, reason, {}
        names = self.class_names or []
        for which in (self.metric_name(), self.metric_name(self.tie_break)):
            diff = paired_difference(y, new.scores, new.threshold, champion.scores,
                                     champion.threshold, which, names, self.bootstrap)
            record = {"metric": which, "difference": diff.difference, "low": diff.low,
                      "high": diff.high, "level": diff.level, "n": diff.n,
                      "resamples": diff.resamples, "text": diff.text()}
            if math.isnan(diff.difference):
                return beats(new, champion) + (record,)
            if abs(diff.difference) > TIE_TOLERANCE:
                break  # not tied: the tie-break is not consulted
        if diff.low > 0:
            return True, f"better beyond noise: {diff.text()}", record
        if diff.high < 0:
            return False, f"worse beyond noise: {diff.text()}", record
        return False, (f"not better beyond noise: {diff.text()} includes 0; the champion "
                       "stays"), record


def beats(new: HeldOutScore, champion: HeldOutScore) -> tuple[bool, str]:
    """Whether `new` strictly beats `champion`: metric first, tie-break second."""
    if math.isnan(new.metric):
        return False, "the new version's metric is undefined (one class in the split?)"
    if math.isnan(champion.metric) or new.metric > champion.metric + TIE_TOLERANCE:
        return True, "higher metric than the champion"
    if new.metric < champion.metric - TIE_TOLERANCE:
        return False, "lower metric than the champion"
    if new.tie_break > champion.tie_break + TIE_TOLERANCE:
        return True, "metric tied; higher tie-break than the champion"
    return False, "metric tied; tie-break not higher than the champion's"
