"""Stratified, group-aware splitting: patients (or duplicate images) never straddle two splits.

Pure numpy + scikit-learn: no TensorFlow, so it is cheap to import and to test.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")

# person1946_bacteria_4874.jpeg -> person1946 (pneumonia images of the Kermany collection).
_PERSON = re.compile(r"^(person\d+)_", re.IGNORECASE)
# NORMAL2-IM-1427-0001.jpeg and IM-1427-0001.jpeg -> IM-1427. Both spellings map to one group:
# merging two patients can only make a split coarser, never leak a patient across splits.
_IM = re.compile(r"(?:^|[-_])(IM-\d+)", re.IGNORECASE)


def patient_id_from_filename(name: str) -> str:
    """Return the patient id encoded in a chest X-ray file name.

    Args:
        name: A file name or path (only the final component is used).

    Returns:
        ``personN`` for ``personN_<cause>_<k>.jpeg``, ``IM-NNNN`` for
        ``[NORMAL2-]IM-NNNN-kkkk.jpeg``, otherwise the file stem (the image is its own group).
    """
    base = re.split(r"[\\/]", name)[-1]
    stem = base.rsplit(".", 1)[0] if "." in base else base
    if match := _PERSON.match(stem):
        return match.group(1).lower()
    if match := _IM.search(stem):
        return match.group(1).upper()
    return stem


def image_hash_groups(images: np.ndarray) -> np.ndarray:
    """Group ids for an image array: byte-identical images share an id.

    Used where there are no patient ids (MedMNIST npz) so exact duplicates stay in one split.

    Args:
        images: Array of shape (N, ...).

    Returns:
        Array of N hex digests.
    """
    flat = np.ascontiguousarray(images).reshape(len(images), -1)
    return np.array([hashlib.blake2b(row.tobytes(), digest_size=16).hexdigest() for row in flat])


def _describe(labels: np.ndarray, groups: np.ndarray, class_names: list[str] | None) -> str:
    """'normal: 8 images / 8 groups, pneumonia: ...' for error messages."""
    parts = []
    for c in np.unique(labels):
        name = class_names[int(c)] if class_names else str(int(c))
        mask = labels == c
        parts.append(f"{name}: {mask.sum()} images / {len(np.unique(groups[mask]))} groups")
    return ", ".join(parts) or "no images"


def carve(
    indices: np.ndarray,
    labels: np.ndarray,
    groups: np.ndarray,
    fraction: float,
    seed: int,
    name: str,
    class_names: list[str] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Carve about ``fraction`` of ``indices`` into a new, class-stratified, group-disjoint split.

    Uses scikit-learn's StratifiedGroupKFold with k = round(1 / fraction) folds (capped at the
    number of groups, so tiny pools still give every side at least one group) and keeps the fold
    that puts every class on both sides and whose size is closest to the target.

    Args:
        indices: Positions (into ``labels``/``groups``) of the pool to split.
        labels: Integer labels of all items.
        groups: Group id (patient, image hash) of all items.
        fraction: Share of the pool's images to carve, in (0, 1).
        seed: Seed for the fold shuffling.
        name: Name of the carved split, for error messages.
        class_names: Optional class names, for error messages.

    Returns:
        ``(rest, carved)`` sorted index arrays.

    Raises:
        ValueError: Too few groups, or no fold leaves two classes or more on each side.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"{name}_fraction must be in (0, 1), got {fraction}")
    y, g = labels[indices], groups[indices]
    n_groups = len(np.unique(g))
    if n_groups < 2:
        raise ValueError(
            f"cannot carve the {name} split: the pool has {len(indices)} images from {n_groups} "
            f"patient/duplicate group(s) and a group never straddles two splits; add data "
            f"(counts: {_describe(y, g, class_names)})"
        )
    k = min(max(2, round(1.0 / min(fraction, 1.0 - fraction))), n_groups)
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    target = fraction * len(indices)
    n_classes = len(np.unique(y))
    best: tuple[tuple[int, float], np.ndarray, np.ndarray] | None = None
    with warnings.catch_warnings():
        # Too few members per class for k folds is expected on tiny pools; the fold check below
        # decides whether the result is usable.
        warnings.filterwarnings("ignore", message="The least populated class")
        for rest_pos, fold_pos in splitter.split(np.zeros(len(y)), y, g):
            carved_pos, kept_pos = (fold_pos, rest_pos) if fraction <= 0.5 else (rest_pos, fold_pos)
            covered = len(np.unique(y[carved_pos])) + len(np.unique(y[kept_pos]))
            score = (covered, -abs(len(carved_pos) - target))
            if best is None or score > best[0]:
                best = (score, carved_pos, kept_pos)
    assert best is not None  # k >= 2 folds always yields
    _, carved_pos, kept_pos = best
    for side, pos in ((name, carved_pos), ("remaining", kept_pos)):
        if len(np.unique(y[pos])) < min(2, n_classes) or len(pos) == 0:
            raise ValueError(
                f"cannot carve a {name} split ({fraction:.0%}) with at least two classes on both "
                f"sides: the {side} part got {_describe(y[pos], g[pos], class_names)} from a pool "
                f"of {_describe(y, g, class_names)}; too few patients per class — add data or "
                f"change {name}_fraction"
            )
    return np.sort(indices[kept_pos]), np.sort(indices[carved_pos])


def assign_splits(
    labels: np.ndarray,
    groups: np.ndarray,
    given: np.ndarray,
    *,
    resplit: bool,
    val_fraction: float,
    test_fraction: float,
    seed: int,
    class_names: list[str] | None = None,
) -> dict[str, np.ndarray]:
    """Decide train/val/test membership.

    Splits given in the data are kept unless ``resplit``; a missing val or test split is carved
    from train. With ``resplit`` (or when only train is given and both are missing) everything is
    pooled and split into test (``test_fraction`` of the pool), val (``val_fraction`` of the pool)
    and train. Carved splits are stratified by class and never share a group with another split.
    ``test_fraction == 0`` gives an empty test split.

    Args:
        labels: Integer label per item.
        groups: Group id per item (patient id or image hash).
        given: The split each item came from ("train", "val" or "test").
        resplit: Pool all given splits and split again.
        val_fraction: Share carved for val.
        test_fraction: Share carved for test (0 for none).
        seed: Seed for all carving.
        class_names: Optional class names, for error messages.

    Returns:
        ``{"train": idx, "val": idx, "test": idx}`` with sorted index arrays.
    """
    if not 0.0 < val_fraction < 1.0 or not 0.0 <= test_fraction < 1.0:
        raise ValueError(
            f"need 0 < val_fraction < 1 and 0 <= test_fraction < 1, got val_fraction="
            f"{val_fraction}, test_fraction={test_fraction}"
        )
    if val_fraction + test_fraction >= 1.0:
        raise ValueError(
            f"val_fraction + test_fraction must be < 1 to leave images for train, got "
            f"{val_fraction} + {test_fraction}"
        )
    everything = np.arange(len(labels))
    present = {s: everything[given == s] for s in SPLITS if np.any(given == s)}
    if not resplit and "train" not in present:
        raise ValueError(
            f"the data has splits {sorted(present)} but no train split; add one or set resplit=true"
        )
    if resplit or present.keys() == {"train"}:
        pool = everything if resplit else present["train"]
        present = {"train": pool}
        val_fraction = val_fraction / (1.0 - test_fraction)  # of what is left after test
    out = dict(present)
    if "test" not in out:
        if test_fraction > 0:
            out["train"], out["test"] = carve(
                out["train"], labels, groups, test_fraction, seed, "test", class_names
            )
        else:
            out["test"] = np.array([], dtype=np.int64)
    if "val" not in out:
        out["train"], out["val"] = carve(
            out["train"], labels, groups, val_fraction, seed + 1, "val", class_names
        )
    splits = {s: np.sort(out[s]).astype(np.int64) for s in SPLITS}
    check_class_coverage(splits, labels, class_names)
    return splits


def check_class_coverage(splits: Mapping[str, np.ndarray], labels: np.ndarray,
                         class_names: list[str] | None = None) -> None:
    """Every class of the data in every non-empty split, or stop before training.

    A class missing from val or test makes its ROC AUC undefined (NaN) and its recall
    unmeasured; with K classes that used to pass silently.
    """
    classes = np.unique(labels)
    missing = [(s, c) for s, idx in splits.items() if len(idx)
               for c in classes if not np.any(labels[idx] == c)]
    if not missing:
        return
    def name(c: int) -> str:
        return class_names[c] if class_names and c < len(class_names) else str(c)
    counts = "; ".join(
        f"{name(int(c))}: " + ", ".join(f"{s} {int(np.sum(labels[idx] == c))}"
                                        for s, idx in splits.items())
        for c in sorted({c for _, c in missing}))
    raise ValueError(
        f"class(es) {sorted({name(int(c)) for _, c in missing})} missing from split(s) "
        f"{sorted({s for s, _ in missing})} (images per split: {counts}); add images of "
        "those classes, or change data.val_fraction/test_fraction (or data.resplit)")


def stratified_subset(
    indices: np.ndarray, labels: np.ndarray, fraction: float, seed: int
) -> np.ndarray:
    """Keep a seeded ``fraction`` of each class of ``indices`` (at least one image per class).

    Args:
        indices: Positions of one split.
        labels: Integer labels of all items.
        fraction: Share to keep, in (0, 1].
        seed: Seed for the choice.

    Returns:
        Sorted kept positions.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"subset_fraction must be in (0, 1], got {fraction}")
    if fraction == 1.0 or len(indices) == 0:
        return indices
    rng = np.random.default_rng(seed)
    kept = []
    for c in np.unique(labels[indices]):
        members = indices[labels[indices] == c]
        n_keep = max(1, round(fraction * len(members)))
        kept.append(rng.choice(members, size=n_keep, replace=False))
    return np.sort(np.concatenate(kept))


def groups_in_several_splits(splits: Mapping[str, np.ndarray], groups: np.ndarray) -> list[str]:
    """Groups (patients, duplicate images) that occur in more than one split.

    Args:
        splits: Split name -> positions.
        groups: Group id per item.

    Returns:
        Sorted list of the straddling group ids (empty when the splits are group-disjoint).
    """
    seen: dict[str, set[str]] = {}
    for name, idx in splits.items():
        for group in np.unique(groups[idx]):
            seen.setdefault(str(group), set()).add(name)
    return sorted(g for g, names in seen.items() if len(names) > 1)


def split_fingerprint(
    source_key: str, ids: np.ndarray, labels: np.ndarray, splits: Mapping[str, np.ndarray]
) -> str:
    """sha256 over the source key and every split's (id, label) membership.

    Args:
        source_key: Identifies the source (e.g. ``npz:<file sha256>`` or ``folder:binary``).
        ids: Stable id per item (``train/17`` or a path relative to the root).
        labels: Integer label per item.
        splits: Split name -> positions.

    Returns:
        Hex digest.
    """
    digest = hashlib.sha256(source_key.encode())
    for name in SPLITS:
        digest.update(f"\n[{name}]\n".encode())
        for i in splits.get(name, np.array([], dtype=np.int64)):
            digest.update(f"{ids[i]}\t{int(labels[i])}\n".encode())
    return digest.hexdigest()


CACHE_ENV = "XRAY_CACHE_DIR"


def cache_root() -> Path:
    """The project's cache folder: $XRAY_CACHE_DIR, else $XDG_CACHE_HOME/xray-sweeps
    (~/.cache/xray-sweeps): splits here, decoded images in data/decoded_cache.py."""
    return Path(os.environ.get(CACHE_ENV) or Path(
        os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "xray-sweeps")


@functools.cache
def _split_memory() -> Any:
    """joblib's disk cache for splits, in ``$XRAY_CACHE_DIR`` (default ``~/.cache/xray-sweeps``).

    The folder name carries scikit-learn's version and a digest of this module, so a change
    to either never returns an old split. No writable folder: no cache (same splits, slower).
    """
    import sklearn
    from joblib import Memory

    base = cache_root()
    code = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:12]
    location: Path | None = Path(base) / f"splits-sklearn{sklearn.__version__}-{code}"
    try:
        location.mkdir(parents=True, exist_ok=True)
        if not os.access(location, os.W_OK):
            raise PermissionError(location)
    except OSError as error:
        log.info("split cache off (%s): splits are computed every time", error)
        location = None
    return Memory(location, verbose=0)


def assign_splits_cached(labels: np.ndarray, groups: np.ndarray, given: np.ndarray,
                         **kwargs: Any) -> dict[str, np.ndarray]:
    """``assign_splits`` through joblib's disk cache (same arguments, same result).

    StratifiedGroupKFold over the built-in data's ~5 k single-image groups takes ~3 s, which
    every trial of a sweep paid again (each worker builds its data per trial); the cache keys
    on the labels, groups, given splits and every argument, so a split is computed once per
    machine.
    """
    return _split_memory().cache(assign_splits)(labels, groups, given, **kwargs)
