"""External evaluation sets (`evaluation.external`): scored, never used to select or tune.

Each entry names a labelled set that comes from elsewhere than the training data: a
class-folder tree (labels from sub-folders named like the classes, any depth) or a
MedMNIST-layout npz (one images key and its labels). The images go through prediction's own
reader (`search.evaluation.inputs`: the training pipeline's decode → channels → resize →
1/255), so a
set is scored exactly as a user's new images would be. Every COMPLETE trial and every
registry candidate is scored on them at its stored threshold; the metrics are logged as
`ext_<name>_<metric>` with bootstrap intervals. Nothing here feeds the objective, the
threshold or the early stopping.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from search import REPO_ROOT

NAME = re.compile(r"^[A-Za-z][A-Za-z0-9]{0,39}$")  # no "_": ext_<name>_<metric> must split


@dataclass(frozen=True)
class ExternalSpec:
    """One `evaluation.external` entry."""

    name: str
    path: Path
    npz_key: str | None = None
    labels_key: str | None = None


@dataclass
class ExternalSet:
    """A loaded external set at one model's input size."""

    spec: ExternalSpec
    x: np.ndarray  # float32 (n, size, size, channels) in [0, 1]
    y: np.ndarray  # int labels
    keys: list[str]
    skipped: list[tuple[str, str]]

    @property
    def prefix(self) -> str:
        return f"ext_{self.spec.name}_"


def external_specs(section: Any) -> list[ExternalSpec]:
    """Parse and check `evaluation.external` (a list of {name, path, npz_key, labels_key})."""
    specs: list[ExternalSpec] = []
    for i, entry in enumerate(section or []):
        where = f"evaluation.external[{i}]"
        if not isinstance(entry, dict) and not hasattr(entry, "keys"):
            raise ValueError(f"{where} must be a mapping {{name, path}}, got {entry!r}")
        entry = dict(entry)
        unknown = sorted(set(entry) - {"name", "path", "npz_key", "labels_key"})
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {unknown}; allowed: name, path, npz_key, "
                             "labels_key")
        name = str(entry.get("name") or "")
        if not NAME.match(name):
            raise ValueError(f"{where}.name={name!r} must be letters and digits, starting "
                             "with a letter (it becomes the metric prefix ext_<name>_)")
        if any(s.name == name for s in specs):
            raise ValueError(f"{where}.name={name!r} is used twice")
        if not entry.get("path"):
            raise ValueError(f"{where}.path is missing (a class-folder tree or an .npz)")
        path = Path(str(entry["path"])).expanduser()
        path = path if path.is_absolute() else REPO_ROOT / path
        if not path.exists():
            raise FileNotFoundError(f"{where}.path={path} does not exist")
        if path.is_file() and path.suffix.lower() != ".npz":
            raise ValueError(f"{where}.path={path} must be a class-folder tree or an .npz file")
        specs.append(ExternalSpec(name, path, entry.get("npz_key"), entry.get("labels_key")))
    return specs


def load_set(spec: ExternalSpec, class_names: list[str], image_size: int, channels: int,
             batch_size: int = 64) -> ExternalSet:
    """Read and preprocess one set; every image must carry a label of the model's classes."""
    from search.evaluation.inputs import batches, collect_inputs

    items, _ = collect_inputs(spec.path, class_names, spec.npz_key, spec.labels_key)
    unlabelled = [item.key for item in items if item.label is None]
    if unlabelled:
        raise ValueError(
            f"evaluation.external {spec.name!r}: {len(unlabelled)} of {len(items)} images under "
            f"{spec.path} have no label (e.g. {unlabelled[0]}); put them in sub-folders named "
            f"like the classes {class_names}, or give the npz's labels_key"
        )
    skipped: list[tuple[str, str]] = []
    kept, arrays = [], []
    for batch, array in batches(items, batch_size, image_size, channels, skipped):
        kept += batch
        arrays.append(array)
    if not kept:
        raise ValueError(f"evaluation.external {spec.name!r}: no readable image in {spec.path}")
    y = np.array([item.label for item in kept], dtype=int)
    return ExternalSet(spec, np.concatenate(arrays).astype(np.float32), y,
                       [item.key for item in kept], skipped)


class ExternalSets:
    """The configured sets, loaded once per input size and kept for the process."""

    def __init__(self, specs: list[ExternalSpec], class_names: list[str]) -> None:
        self.specs = specs
        self.class_names = list(class_names)
        self._loaded: dict[tuple[int, int], list[ExternalSet]] = {}

    def __bool__(self) -> bool:
        return bool(self.specs)

    def at(self, image_size: int, channels: int) -> list[ExternalSet]:
        key = (int(image_size), int(channels))
        if key not in self._loaded:
            self._loaded[key] = [load_set(s, self.class_names, *key) for s in self.specs]
        return self._loaded[key]


def score_sets(model: Any, sets: list[ExternalSet], class_names: list[str],
               threshold: float | None, bootstrap: Any) -> dict[str, Any]:
    """{name: SplitEvaluation} of `model` on each set at its stored threshold."""
    from search.evaluation import metrics as ev

    results = {}
    for item in sets:
        scores = ev.positive_scores(model.predict(item.x, verbose=0, batch_size=64))
        results[item.spec.name] = ev.evaluate_split(
            f"ext_{item.spec.name}", item.y, scores, class_names, threshold, bootstrap=bootstrap)
        results[item.spec.name].extra.update(
            {"n": len(item.y), "path": str(item.spec.path), "scores": scores,
             "y": item.y, "skipped": len(item.skipped)})
    return results
