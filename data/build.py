"""The data builder: config in, train/val/test datasets and their metadata out.

Called as ``hydra.utils.instantiate(cfg.data, seed=cfg.seed)``.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import tensorflow as tf
from sklearn.utils.class_weight import compute_class_weight

from data.decoded_cache import decoded_images, default_cache_dir, first_time, memory_budget
from data.loaders import load_npz, scan_folder
from data.pipeline import build_augmenter, make_dataset, preprocessing_spec
from data.splits import (
    SPLITS,
    assign_splits_cached,
    groups_in_several_splits,
    image_hash_groups,
    split_fingerprint,
    stratified_subset,
)

logger = logging.getLogger(__name__)


@dataclass
class DataBundle:
    """Everything training and evaluation need from the data.

    Batches are ``(x, y)``: x float32 (batch, image_size, image_size, channels) in [0, 1]; y has
    shape (batch,) and is float32 0/1 for two classes (one sigmoid unit + binary_crossentropy)
    and int32 class indices otherwise (softmax + sparse_categorical_crossentropy).

    Attributes:
        train: Shuffled, augmented, repeated forever: use with ``steps_per_epoch``.
        val: Cached, finite, in the order of ``y_val``; not shuffled, not augmented.
        test: As val, for the test split (empty when test_fraction is 0 and none is given).
        steps_per_epoch: ceil(n_train / batch_size): one pass over the train split.
        class_names: Name per class index.
        class_weight: {class index: weight} for ``fit(class_weight=...)``, or None.
        input_shape: (image_size, image_size, channels).
        y_val: Integer labels of val, in dataset order.
        y_test: Integer labels of test, in dataset order.
        n_train: Train images (after subset_fraction).
        n_val: Val images.
        n_test: Test images.
        fingerprint: sha256 over source and split membership (ids + labels); same seed, same value.
        preprocessing: What predict must do to a new image (see ``data.pipeline``).
        source_info: Source, path/root, counts per split per class, skipped files, duplicates.
        split_ids: Split -> item ids (npz ``train/17``, folder path relative to the root); val
            and test in dataset order, so predictions can be traced back to files.
    """

    train: tf.data.Dataset
    val: tf.data.Dataset
    test: tf.data.Dataset
    steps_per_epoch: int
    class_names: list[str]
    class_weight: dict[int, float] | None
    input_shape: tuple[int, int, int]
    y_val: np.ndarray
    y_test: np.ndarray
    n_train: int
    n_val: int
    n_test: int
    fingerprint: str
    preprocessing: dict[str, Any]
    source_info: dict[str, Any]
    split_ids: dict[str, list[str]] = field(default_factory=dict)

    @property
    def n_classes(self) -> int:
        """Number of classes (2 means binary: one sigmoid unit)."""
        return len(self.class_names)


@dataclass
class _Pool:
    """All items of a source, whatever split they came from."""

    payload: np.ndarray  # uint8 images (N,H,W,C) or file paths (N,)
    labels: np.ndarray
    groups: np.ndarray  # patient id or image hash: never split apart
    given: np.ndarray  # split the item came from
    ids: np.ndarray  # stable id for the fingerprint
    class_names: list[str]
    source_key: str
    info: dict[str, Any]


def _npz_pool(
    path: str | os.PathLike | None, class_names: Sequence[str] | None, label_mode: str
) -> _Pool:
    npz = load_npz(path, class_names, label_mode)
    present = [s for s in SPLITS if s in npz.images]
    images = np.concatenate([npz.images[s] for s in present])
    given = np.concatenate([np.full(len(npz.labels[s]), s) for s in present])
    index = np.concatenate([np.arange(len(npz.labels[s])) for s in present])
    groups = image_hash_groups(images)
    by_split = {s: groups[given == s] for s in present}
    duplicates = {f"within_{s}": int(len(g) - len(np.unique(g))) for s, g in by_split.items()}
    duplicates["across_given_splits"] = len(
        groups_in_several_splits({s: np.flatnonzero(given == s) for s in present}, groups)
    )
    return _Pool(
        payload=images,
        labels=np.concatenate([npz.labels[s] for s in present]),
        groups=groups,
        given=given,
        ids=np.array([f"{s}/{i}" for s, i in zip(given, index, strict=True)]),
        class_names=npz.class_names,
        source_key=f"npz:{npz.sha256}",
        info={
            "source": "npz",
            "path": str(npz.path),
            "sha256": npz.sha256,
            "given_splits": present,
            "image_shape": list(images.shape[1:]),
            "duplicate_images": duplicates,
        },
    )


def _folder_pool(root: str | os.PathLike | None, label_mode: str) -> _Pool:
    folder = scan_folder(root, label_mode)
    return _Pool(
        payload=folder.paths,
        labels=folder.labels,
        groups=folder.patients,
        given=folder.given_split,
        ids=folder.rel_paths,
        class_names=folder.class_names,
        source_key=f"folder:{label_mode}",
        info={
            "source": "folder",
            "root": str(folder.root),
            "layout": folder.layout,
            "given_splits": [s for s in SPLITS if np.any(folder.given_split == s)],
            "label_mode": label_mode,
            "skipped": folder.skipped,
        },
    )


def _class_weight(
    spec: str | Mapping | None, y_train: np.ndarray, n_classes: int
) -> dict[int, float] | None:
    if spec is None or (isinstance(spec, str) and spec.lower() == "none"):
        return None
    if isinstance(spec, Mapping):
        weights = {int(k): float(v) for k, v in spec.items()}
        if sorted(weights) != list(range(n_classes)):
            raise ValueError(
                f"data.class_weight must give a weight for each class 0..{n_classes - 1}, got "
                f"keys {sorted(weights)}"
            )
        return weights
    if spec != "balanced":
        raise ValueError(
            f"data.class_weight must be 'balanced', null/'none' or a {{class: weight}} mapping, "
            f"got {spec!r}"
        )
    classes = np.arange(n_classes)
    values = compute_class_weight("balanced", classes=classes, y=y_train)
    return {int(c): float(w) for c, w in zip(classes, values, strict=True)}


def _check_arguments(
    source: str,
    image_size: int,
    channels: int,
    batch_size: int,
    subset_fraction: float,
    mixup: float = 0.0,
    label_mode: str = "binary",
) -> None:
    if source not in ("npz", "folder"):
        raise ValueError(f"data.source must be 'npz' or 'folder', got {source!r}")
    if not isinstance(image_size, int) or image_size < 8:
        raise ValueError(f"data.image_size must be an integer >= 8, got {image_size!r}")
    if channels not in (1, 3):
        raise ValueError(f"data.channels must be 1 (grayscale) or 3 (RGB), got {channels!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"data.batch_size must be a positive integer, got {batch_size!r}")
    if not 0.0 < subset_fraction <= 1.0:
        raise ValueError(f"data.subset_fraction must be in (0, 1], got {subset_fraction}")
    if isinstance(mixup, bool) or not isinstance(mixup, int | float) or mixup < 0:
        raise ValueError(f"data.mixup must be a number >= 0 (Beta alpha; 0 = off), got {mixup!r}")
    if mixup and label_mode != "binary":
        # K classes train on int class indices with sparse_categorical_crossentropy, which
        # cannot take the soft labels mixup makes.
        raise ValueError(
            f"data.mixup={mixup} needs data.label_mode=binary (got {label_mode!r}): mixed labels "
            "are soft, and the K-class sparse_categorical_crossentropy takes only class indices; "
            "set data.mixup=0"
        )


def fold_splits(splits: Mapping[str, np.ndarray], labels: np.ndarray, groups: np.ndarray,
                k: int, fold: int, seed: int) -> dict[str, np.ndarray]:
    """Train and val as fold `fold` of k over train + val (scikit-learn's
    StratifiedGroupKFold: class shares kept, duplicate images never on both sides)."""
    from sklearn.model_selection import StratifiedGroupKFold

    if k < 2 or not 0 <= fold < k:
        raise ValueError(f"data.cv_folds={k} needs k >= 2 and data.cv_fold={fold} in 0..{k - 1}")
    pool = np.sort(np.concatenate([splits["train"], splits["val"]]))
    folds = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    train, val = list(folds.split(pool, labels[pool], groups[pool]))[fold]
    return {**splits, "train": pool[train], "val": pool[val]}


def build_data(
    source: str = "npz",
    path: str | os.PathLike | None = None,
    root: str | os.PathLike | None = None,
    image_size: int = 28,
    channels: int = 1,
    label_mode: str = "binary",
    resplit: bool = False,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    subset_fraction: float = 1.0,
    batch_size: int = 64,
    cache: bool = True,
    decoded_cache: str | os.PathLike | None = None,
    shuffle_buffer: int = 10000,
    class_weight: str | Mapping | None = "balanced",
    augment: Mapping[str, Any] | None = None,
    mixup: float | None = 0.0,
    class_names: Sequence[str] | None = None,
    cv_folds: int = 0,
    cv_fold: int = 0,
    seed: int = 42,
) -> DataBundle:
    """Load, split and wrap a dataset in tf.data pipelines.

    Args:
        source: "npz" (MedMNIST layout) or "folder" (class folders, optionally under
            train/val/test).
        path: npz file; None for the built-in PneumoniaMNIST copy (source=npz only).
        root: Folder tree (source=folder only).
        image_size: Output height and width.
        channels: 1 (grayscale) or 3 (RGB, e.g. for ImageNet backbones).
        label_mode: "binary", "multiclass", or "cause" (normal/bacteria/virus, folder only).
        resplit: Pool all given splits and split again with the fractions.
        val_fraction: Share carved for val (of the pool when resplitting, else of train).
        test_fraction: Share carved for test; 0 for no test split.
        subset_fraction: Keep this stratified, seeded share of every split (quick runs).
        batch_size: Batch size of all splits.
        cache: Keep decoded images in memory after the first pass.
        decoded_cache: Folder source: a folder where the decoded images are kept between
            runs and shared by sweep workers (data/decoded_cache.py); "default" for
            $XRAY_CACHE_DIR/decoded (~/.cache/xray-sweeps/decoded); None decodes in every run.
        shuffle_buffer: Train shuffle buffer (capped at the train size).
        class_weight: "balanced", None/"none", or an explicit {class: weight} mapping.
        augment: {flip, rotation, zoom, translation, contrast, brightness, noise}; all off by
            default.
        mixup: Beta alpha of mixup on train batches (e.g. 0.2); 0/None = off; binary only.
        class_names: Names per class index (npz only; default normal/pneumonia or class_i).
        cv_folds: k >= 2: train and val are re-drawn as fold `cv_fold` of a stratified,
            group-disjoint k-fold split of train + val (the test split stays as it is);
            0 = the usual split. The registry's cross-validation sets both.
        cv_fold: Which fold (0..k-1) is val.
        seed: Seeds every split, subset, shuffle, augmentation and mixup.

    Returns:
        The DataBundle.

    Raises:
        FileNotFoundError: The npz file or root folder does not exist.
        ValueError: Any invalid argument or input data (named in the message).
    """
    mixup = 0.0 if mixup is None else mixup
    _check_arguments(source, image_size, channels, batch_size, subset_fraction, mixup, label_mode)
    if source == "npz":
        if root is not None:
            raise ValueError("data.root is for source=folder; for source=npz set data.path")
        pool = _npz_pool(path, class_names, label_mode)
    else:
        if path is not None:
            raise ValueError("data.path is for source=npz; for source=folder set data.root")
        if class_names is not None:
            raise ValueError(
                "data.class_names is for source=npz; folder class names come from the folders"
            )
        pool = _folder_pool(root, label_mode)
        if decoded_cache:
            folder = default_cache_dir() if decoded_cache == "default" else decoded_cache
            pool.payload = decoded_images(pool.payload, image_size, channels, folder)
    augmenter = build_augmenter(augment, seed)  # validate before the (slow) splitting

    splits = assign_splits_cached(
        pool.labels,
        pool.groups,
        pool.given,
        resplit=resplit,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        seed=seed,
        class_names=pool.class_names,
    )
    if cv_folds:
        splits = fold_splits(splits, pool.labels, pool.groups, int(cv_folds), int(cv_fold), seed)
    splits = {
        name: stratified_subset(splits[name], pool.labels, subset_fraction, seed + i)
        for i, name in enumerate(SPLITS)
    }
    _check_split_classes(splits, pool, test_fraction)

    n_classes = len(pool.class_names)
    binary = n_classes == 2

    # Decoded images larger than the memory budget stay in their file, read as needed.
    lazy = isinstance(pool.payload, np.memmap) and pool.payload.nbytes > memory_budget()

    def dataset(name: str, training: bool) -> tf.data.Dataset:
        idx = splits[name]
        return make_dataset(
            pool.payload if lazy else np.asarray(pool.payload[idx]),
            pool.labels[idx],
            binary=binary,
            image_size=image_size,
            channels=channels,
            batch_size=batch_size,
            training=training,
            seed=seed,
            cache=cache,
            shuffle_buffer=shuffle_buffer,
            augmenter=augmenter if training else None,
            mixup=mixup if training else 0.0,
            rows=idx if lazy else None,
        )

    straddling = groups_in_several_splits(splits, pool.groups)
    fingerprint = split_fingerprint(pool.source_key, pool.ids, pool.labels, splits)
    # Once per data fingerprint (the count stays in source_info, logged on every run).
    if straddling and first_time(f"straddling:{fingerprint}"):
        # Only possible when given splits are kept (resplit=false): carving never splits a group.
        logger.warning(
            "%d %s occur in more than one split as given (e.g. %s); set data.resplit=true for "
            "group-disjoint splits",
            len(straddling),
            "identical image(s)" if pool.info["source"] == "npz" else "patient(s)",
            ", ".join(straddling[:5]),
        )
    info = dict(pool.info)
    info.update(
        resplit=resplit,
        seed=seed,
        subset_fraction=subset_fraction,
        counts={
            name: {
                cls: int(np.sum(pool.labels[idx] == c)) for c, cls in enumerate(pool.class_names)
            }
            for name, idx in splits.items()
        },
        groups_per_split={
            name: int(len(np.unique(pool.groups[idx]))) for name, idx in splits.items()
        },
        groups_in_several_splits=len(straddling),
    )
    info.setdefault("skipped", [])
    bundle = DataBundle(
        train=dataset("train", training=True),
        val=dataset("val", training=False),
        test=dataset("test", training=False),
        steps_per_epoch=math.ceil(len(splits["train"]) / batch_size),
        class_names=list(pool.class_names),
        class_weight=_class_weight(class_weight, pool.labels[splits["train"]], n_classes),
        input_shape=(image_size, image_size, channels),
        y_val=pool.labels[splits["val"]].copy(),
        y_test=pool.labels[splits["test"]].copy(),
        n_train=len(splits["train"]),
        n_val=len(splits["val"]),
        n_test=len(splits["test"]),
        fingerprint=fingerprint,
        preprocessing=preprocessing_spec(image_size, channels),
        source_info=info,
        split_ids={name: pool.ids[idx].tolist() for name, idx in splits.items()},
    )
    logger.info(
        "data: %s train/val/test = %d/%d/%d, classes %s, fingerprint %s",
        info["source"],
        bundle.n_train,
        bundle.n_val,
        bundle.n_test,
        bundle.class_names,
        bundle.fingerprint[:12],
    )
    return bundle


def _check_split_classes(splits: dict[str, np.ndarray], pool: _Pool, test_fraction: float) -> None:
    """Every class in train; at least two classes in val and test (test may be empty)."""
    names = pool.class_names
    for name, idx in splits.items():
        if name == "test" and len(idx) == 0 and test_fraction == 0:
            continue
        present = set(np.unique(pool.labels[idx]).tolist())
        needed = set(range(len(names))) if name == "train" else None
        counts = {names[c]: int(np.sum(pool.labels[idx] == c)) for c in range(len(names))}
        if len(idx) == 0 or len(present) < 2 or (needed and present != needed):
            rule = "train needs every class" if name == "train" else "it needs two classes or more"
            raise ValueError(
                f"the {name} split has class counts {counts}: {rule}; add images of the missing "
                f"class(es), set data.resplit=true, or change data.val_fraction/test_fraction"
            )
