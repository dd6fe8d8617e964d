"""The champion/challenger gate: held-out scoring, the comparison and the promotion lock.

A new version gets the `champion` alias only if it beats the current champion on the same
held-out images: the test split rebuilt from the new run's composed config (`data` with its
`seed`; never used for tuning), or one of its `evaluation.external` sets
(`registry.compare_on`), both models scored there at their own stored decision thresholds,
on a metric (ROC AUC by default) with a tie-break (sensitivity); otherwise it gets
`challenger`. "Beats" means beyond noise (`registry.gate=paired_bootstrap`, the default):
the 95 % paired bootstrap interval of new - champion, image by image, lies above zero. A split
with fewer than `registry.min_per_class` images of some class is too small to decide: the
new version stays challenger and the decision says so. `registry.gate=point` compares the
point values (the rule before intervals). The first version becomes champion. Aliases only,
never stages.

The quality floor (`registry.floor`) is decided first, inside the same locked decision: a
version whose held-out score is under it (or has none) is registered for inspection but gets
no alias at all, neither @champion nor @challenger; the aliases stay where they were.

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
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from search.evaluation.metric_maths import RANKING_METRICS, check_metric  # noqa: F401 - re-exported
from search.model_registry.heldout import (  # noqa: F401 - the gate's parts, re-exported
    DEFAULT_METRIC,
    DEFAULT_TIE_BREAK,
    GATES,
    TIE_TOLERANCE,
    GateSpec,
    HeldOutEvaluator,
    HeldOutScore,
    NoHeldOutSplit,
    beats,
)
from search.model_registry.registry_settings import DEFAULTS

log = logging.getLogger(__name__)

CHAMPION = "champion"
CHALLENGER = "challenger"
# The decision for a version under `registry.floor`: registered for inspection, no alias. Not
# @challenger: a challenger is a candidate people may shadow-serve or A/B, and it would push
# out the challenger that passed the floor.
NO_ALIAS = "none"
BELOW_FLOOR = "below_floor"
MAX_VERIFY_ROUNDS = 5
LOCK_SUFFIX = ".promotion.lock"


@dataclass
class PromotionDecision:
    """What happened to a new version, and why."""

    model_name: str
    version: int
    run_id: str
    alias: str  # champion | challenger | none (under the floor: registered, no alias)
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
    difference: dict[str, Any] = field(default_factory=dict)  # paired bootstrap, new - champion
    new_intervals: dict[str, list[float]] = field(default_factory=dict)
    champion_intervals: dict[str, list[float]] = field(default_factory=dict)
    new_external: dict[str, dict[str, Any]] = field(default_factory=dict)
    champion_external: dict[str, dict[str, Any]] = field(default_factory=dict)
    gate: str = DEFAULTS.gate
    floor: float | None = None  # registry.floor the version was held to (None: no floor)
    below_floor: bool = False  # refused by the floor: no alias moved for it

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        """Human-readable lines for the console."""

        def fmt(value: float | None) -> str:
            return "n/a" if value is None else f"{value:.4f}"

        verdict = "promoted" if self.promoted else "not promoted"
        outcome = f"@{self.alias}"
        if self.below_floor:  # registered for inspection; no alias moved for it
            outcome = "no alias" if self.alias == NO_ALIAS else outcome
            verdict = "refused by the quality floor"
        lines = [
            f"{self.model_name} v{self.version} (run {self.run_id}) -> {outcome}"
            f" ({verdict}): {self.reason}",
            f"  held-out {self.metric}: new {fmt(self.new_score)}"
            + (f" vs champion v{self.champion_version} {fmt(self.champion_score)}"
               if self.champion_version is not None else ""),
            f"  tie-break {self.tie_break}: new {fmt(self.new_tie_break)}"
            + (f" vs champion {fmt(self.champion_tie_break)}"
               if self.champion_version is not None else ""),
        ]
        low, high = (self.new_intervals.get(self.metric) or [None, None])[:2]
        if low is not None:
            lines[1] += f" [{fmt(low)}, {fmt(high)}]"
        if self.difference.get("text"):
            lines.append(f"  paired: {self.difference['text']}")
        for set_name, ext in self.new_external.items():
            value = ext["metrics"].get(self.metric)
            champ = (self.champion_external.get(set_name) or {}).get("metrics", {})
            lines.append(f"  external {set_name} ({ext['n']} images) {self.metric}: new "
                         f"{fmt(value)}" + (f" vs champion {fmt(champ.get(self.metric))}"
                                            if champ else ""))
        if self.evaluation:
            lines.append(f"  split: {self.evaluation.get('description')}")
        lines += [f"  WARNING: {w}" for w in self.warnings]
        return "\n".join(lines)


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


def below_floor(new: HeldOutScore | None, floor: float | None) -> str | None:
    """Why `new` may not take any alias under `registry.floor` (None: no floor, or it holds).

    Decided before any alias moves: a version that misses the floor never becomes @champion,
    even for a moment, and never displaces a challenger.
    """
    if floor is None:
        return None
    value = None if new is None else new.metric
    if value is None or not math.isfinite(float(value)):
        return (f"no held-out score to hold against registry.floor {float(floor):.4f}: "
                "registered for inspection, no alias")
    if float(value) < float(floor):
        return (f"held-out score {float(value):.4f} < registry.floor {float(floor):.4f}: "
                "registered for inspection, no alias")
    return None


def decide_under_lock(
    client: MlflowClient, name: str, mv: ModelVersion, evaluator: HeldOutEvaluator,
    new: HeldOutScore | None, locked: bool, floor: float | None = None,
) -> tuple[bool, str, HeldOutScore | None, dict[str, Any], str]:
    """Compare with the champion of the moment and move the aliases; loop when not locked.

    Returns (promoted, reason, champion's score, paired difference, alias given). Under
    `floor` (`registry.floor`) no alias moves and the alias given is `NO_ALIAS`.
    """
    version = int(mv.version)
    refused = below_floor(new, floor)
    if refused is not None:
        return _refused_at_floor(client, name, version, evaluator, new, refused)
    for _ in range(MAX_VERIFY_ROUNDS):
        champ = current_champion(client, name)
        champ_score, difference = None, {}
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
            promoted, reason, difference = evaluator.compare(new, champ_score)
        if promoted:
            client.set_registered_model_alias(name, CHAMPION, str(version))
            if CHALLENGER in (client.get_model_version(name, str(version)).aliases or []):
                client.delete_registered_model_alias(name, CHALLENGER)  # a re-promoted version
        else:
            client.set_registered_model_alias(name, CHALLENGER, str(version))
        alias = CHAMPION if promoted else CHALLENGER
        if locked:
            return promoted, reason, champ_score, difference, alias
        # Best effort without a lock: the champion must now be ours (promoted) or still the one
        # we lost to; anything else means another writer moved it: compare again.
        after = current_champion(client, name)
        expected = version if promoted else (None if champ is None else int(champ.version))
        if (None if after is None else int(after.version)) == expected:
            return promoted, reason, champ_score, difference, alias
        log.warning("@champion moved to v%s while promoting v%s; comparing again",
                    None if after is None else after.version, version)
    raise RuntimeError(f"@champion of {name} kept moving during {MAX_VERIFY_ROUNDS} rounds")


def _refused_at_floor(client: MlflowClient, name: str, version: int,
                      evaluator: HeldOutEvaluator, new: HeldOutScore | None, reason: str
                      ) -> tuple[bool, str, HeldOutScore | None, dict[str, Any], str]:
    """The decision for a version under the floor: no alias moves; the champion of the
    moment is scored for the record (cached when seen), never compared."""
    champ = current_champion(client, name)
    champ_score = None
    if champ is not None and int(champ.version) != version and new is not None:
        champ_score = evaluator.score(client, name, champ.version)
    if champ is not None and int(champ.version) == version:
        # It held @champion before this check (an earlier promotion, a lower floor then):
        # taking the alias away would leave nothing to serve; say so instead.
        return False, (f"{reason}; v{version} held @champion before this check and keeps "
                       "it"), champ_score, {}, CHAMPION
    log.warning("%s v%s is under the quality floor: %s", name, version, reason)
    return False, reason, champ_score, {}, NO_ALIAS


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
