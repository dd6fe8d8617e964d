"""The champion/challenger gate: held-out scoring, the comparison and the promotion lock.

A new version gets the `champion` alias only if it beats the current champion on the same
held-out split: the test split rebuilt from the new run's composed config (`data` with its
`seed`; never used for tuning), both models scored there at their own stored decision
thresholds (scikit-learn metrics), on a metric (ROC AUC by default) with a tie-break
(sensitivity); otherwise it gets `challenger`. The first version becomes champion. Aliases
only, never stages.

Concurrency: for a local SQLite store an `fcntl` lock file next to the database serialises
read-champion → compare → set-alias across processes; if the champion changed while we
evaluated, the new champion is evaluated inside the lock. For other stores (a tracking server)
there is no cross-process lock: a compare-and-verify loop re-reads the alias after setting it
and compares again when another writer moved it (best effort; it converges on the better model
as long as each writer re-reads after the other's write).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import math
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf

from search import model_store
from search.config_checks import RANKING_METRICS, check_metric  # noqa: F401 - re-exported

log = logging.getLogger(__name__)

CHAMPION = "champion"
CHALLENGER = "challenger"
DEFAULT_METRIC = "roc_auc"
DEFAULT_TIE_BREAK = "sensitivity"
TIE_TOLERANCE = 1e-9
MAX_VERIFY_ROUNDS = 5
LOCK_SUFFIX = ".promotion.lock"


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


@dataclass
class PromotionDecision:
    """What happened to a new version, and why."""

    model_name: str
    version: int
    run_id: str
    alias: str  # champion | challenger
    promoted: bool
    metric: str
    tie_break: str
    reason: str
    new_score: float | None = None
    new_tie_break: float | None = None
    champion_version: int | None = None  # the version compared against (None: no champion)
    champion_score: float | None = None
    champion_tie_break: float | None = None
    evaluation: dict[str, Any] = field(default_factory=dict)
    new_metrics: dict[str, float] = field(default_factory=dict)
    champion_metrics: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        """Human-readable lines for the console."""

        def fmt(value: float | None) -> str:
            return "n/a" if value is None else f"{value:.4f}"

        lines = [
            f"{self.model_name} v{self.version} (run {self.run_id}) -> @{self.alias}"
            f" ({'promoted' if self.promoted else 'not promoted'}): {self.reason}",
            f"  held-out {self.metric}: new {fmt(self.new_score)}"
            + (f" vs champion v{self.champion_version} {fmt(self.champion_score)}"
               if self.champion_version is not None else ""),
            f"  tie-break {self.tie_break}: new {fmt(self.new_tie_break)}"
            + (f" vs champion {fmt(self.champion_tie_break)}"
               if self.champion_version is not None else ""),
        ]
        if self.evaluation:
            lines.append(f"  split: {self.evaluation.get('description')}")
        lines += [f"  WARNING: {w}" for w in self.warnings]
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Held-out evaluation


class HeldOutEvaluator:
    """Scores model versions on the held-out split rebuilt from one run's composed config.

    Each model is fed the split preprocessed its own way (image size, channels): the split's
    membership does not depend on them, which the data fingerprint confirms.
    """

    def __init__(self, cfg: DictConfig, metric: str = DEFAULT_METRIC,
                 tie_break: str = DEFAULT_TIE_BREAK) -> None:
        self.cfg = cfg
        self.metric = check_metric(metric)
        self.tie_break = check_metric(tie_break)
        self._bundles: dict[tuple[int, int], Any] = {}
        self._scores: dict[int, HeldOutScore] = {}
        self.fingerprint: str | None = None
        self.n_test: int | None = None
        self.class_names: list[str] | None = None

    def description(self) -> dict[str, Any]:
        data = OmegaConf.to_container(self.cfg.data, resolve=True)
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
        from search.config_checks import MACRO_NAMES

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
        from search import evaluate as ev

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
        result = ev.evaluate_split("heldout", bundle.y_test, scores, bundle.class_names,
                                   None if threshold is None else float(threshold))
        score = HeldOutScore(
            version=version,
            metric=result.metrics[self.metric_name()],
            tie_break=result.metrics[self.metric_name(self.tie_break)],
            threshold=result.threshold,
            metrics=result.metrics,
            data_fingerprint=info.get("data_fingerprint"),
        )
        log.info("%s v%s on the held-out split: %s %.4f, %s %.4f", name, version,
                 self.metric_name(), score.metric, self.metric_name(self.tie_break),
                 score.tie_break)
        self._scores[version] = score
        return score


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


# ---------------------------------------------------------------------------------------------
# Aliases under a lock


def sqlite_path(uri: str) -> Path | None:
    """The database file of a sqlite:/// URI, else None."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri.removeprefix("sqlite:///")).expanduser().resolve()


@contextlib.contextmanager
def promotion_lock(registry_uri: str) -> Iterator[bool]:
    """Exclusive inter-process lock for a local SQLite registry; yields whether it locked.

    The lock file sits next to the database (`mlflow.db.promotion.lock`); `flock` is released
    by the kernel even if the holder dies. Other stores yield False (no lock, see the module
    docstring for the best-effort protocol).
    """
    db = sqlite_path(registry_uri)
    if db is None:
        yield False
        return
    lock_file = db.with_name(db.name + LOCK_SUFFIX)
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_file, "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield True
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def current_champion(client: MlflowClient, name: str) -> ModelVersion | None:
    """The version holding @champion, or None."""
    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None


def decide_under_lock(
    client: MlflowClient, name: str, mv: ModelVersion, evaluator: HeldOutEvaluator,
    new: HeldOutScore | None, locked: bool,
) -> tuple[bool, str, HeldOutScore | None]:
    """Compare with the champion of the moment and move the aliases; loop when not locked."""
    version = int(mv.version)
    for _ in range(MAX_VERIFY_ROUNDS):
        champ = current_champion(client, name)
        champ_score = None
        if champ is None:
            promoted, reason = True, "first version with no champion: promoted"
        elif int(champ.version) == version:
            promoted, reason = True, "already the champion"
        else:
            if new is None:
                raise NoHeldOutSplit(
                    f"{name} has a champion (v{champ.version}) but the new run's config has no "
                    "held-out test split to compare on; sweep with data.test_fraction > 0"
                )
            champ_score = evaluator.score(client, name, champ.version)  # cached if seen
            promoted, reason = beats(new, champ_score)
        if promoted:
            client.set_registered_model_alias(name, CHAMPION, str(version))
            if CHALLENGER in (client.get_model_version(name, str(version)).aliases or []):
                client.delete_registered_model_alias(name, CHALLENGER)  # a re-promoted version
        else:
            client.set_registered_model_alias(name, CHALLENGER, str(version))
        if locked:
            return promoted, reason, champ_score
        # Best effort without a lock: the champion must now be ours (promoted) or still the one
        # we lost to; anything else means another writer moved it: compare again.
        after = current_champion(client, name)
        expected = version if promoted else (None if champ is None else int(champ.version))
        if (None if after is None else int(after.version)) == expected:
            return promoted, reason, champ_score
        log.warning("@champion moved to v%s while promoting v%s; comparing again",
                    None if after is None else after.version, version)
    raise RuntimeError(f"@champion of {name} kept moving during {MAX_VERIFY_ROUNDS} rounds")


def floor_failure(decision: PromotionDecision | None, floor: float | None) -> str | None:
    """Why a sweep misses its quality floor (``registry.floor``), or None when it holds.

    The floor applies to the version this sweep registered, scored on its held-out split
    with the registry's metric: the nightly sweep fails when its model got worse, whichever
    version keeps the champion alias.
    """
    if floor is None:
        return None
    if decision is None:
        return f"registry.floor={floor} is set, but the sweep registered no model to check"
    value = decision.new_metrics.get(decision.metric, decision.new_score)
    if value is None or not math.isfinite(float(value)) or float(value) < float(floor):
        return (
            f"quality floor missed: {decision.model_name} v{decision.version} (run "
            f"{decision.run_id}) scores held-out {decision.metric} {value:.4f} < "
            f"registry.floor {float(floor):.4f}"
            if value is not None else
            f"quality floor: {decision.model_name} v{decision.version} has no held-out "
            f"{decision.metric} to compare with registry.floor {floor}"
        )
    log.info("Quality floor holds: held-out %s %.4f >= registry.floor %.4f",
             decision.metric, float(value), float(floor))
    return None
