"""What prediction reads: image files, folders of images, MedMNIST npz rows, preprocessed
exactly as training did.

A folder is searched recursively; sub-folders named like the model's classes
(case-insensitively) give labels. An npz gives the rows of one images key (default
`test_images` if present, else the first `*_images`) with the matching `*_labels`. Images go
through `data.pipeline.preprocess_for_model`, the training pipeline's own decode → channels →
bilinear resize → 1/255 scaling, so train and predict cannot drift.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# The predict command's logger: its console lines read as before this module was split out.
log = logging.getLogger("search.predict")

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp"}
DISPLAY_SIZE = 384  # longest side of a Grad-CAM overlay


@dataclass
class InputItem:
    """One image to predict: a file, or one row of an npz array."""

    key: str  # the file path, or the row index
    label: int | None = None
    path: Path | None = None
    array: np.ndarray | None = None


# ---------------------------------------------------------------------------------------------
# Inputs


def _label_from_folders(path: Path, root: Path, classes: dict[str, int]) -> int | None:
    """Label from the nearest parent folder named like a class (case-insensitive)."""
    for part in reversed(path.relative_to(root).parts[:-1]):
        if part.casefold() in classes:
            return classes[part.casefold()]
    return None


def folder_items(root: Path, class_names: list[str]) -> list[InputItem]:
    """Image files under `root` (recursive, sorted; dotfiles ignored), labelled when possible."""
    classes = {name.casefold(): i for i, name in enumerate(class_names)}
    files = sorted(
        p for p in root.rglob("*")
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )
    if not files:
        raise FileNotFoundError(
            f"no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) under {root}"
        )
    return [InputItem(str(p), _label_from_folders(p, root, classes), path=p) for p in files]


def npz_items(
    path: Path, class_names: list[str], npz_key: str | None = None, labels_key: str | None = None
) -> list[InputItem]:
    """Rows of a MedMNIST-layout npz: images key (default test_images, else the first
    *_images) and, if present, its labels."""
    from data.loaders import read_npz_array

    try:
        archive = np.load(path, allow_pickle=False)
    except Exception as error:  # np.load raises several types for a non-npz file
        raise ValueError(f"{path} is not a readable .npz archive ({type(error).__name__}); "
                         "give a MedMNIST-layout .npz of uint8 images (np.savez); pickled "
                         "files are never loaded") from None
    with archive:
        keys = list(archive.files)
        if npz_key is None:
            candidates = [k for k in keys if k.endswith("_images")]
            npz_key = "test_images" if "test_images" in keys else (
                candidates[0] if candidates else None)
        if npz_key is None or npz_key not in keys:
            raise KeyError(
                f"{path} has no images key {npz_key!r} (keys: {keys}); pass --npz-key, e.g. "
                "--npz-key val_images"
            )
        if labels_key is None and npz_key.endswith("_images"):
            derived = npz_key.removesuffix("_images") + "_labels"
            labels_key = derived if derived in keys else None
        elif labels_key is not None and labels_key not in keys:
            raise KeyError(f"{path} has no labels key {labels_key!r} (keys: {keys})")
        # a pickled object array is refused by file and key, never unpickled
        images = read_npz_array(archive, npz_key, path)
        labels = read_npz_array(archive, labels_key, path) if labels_key else None
    if images.dtype != np.uint8 or images.ndim not in (3, 4):
        raise ValueError(
            f"{path}:{npz_key} must be uint8 images (N, H, W) or (N, H, W, C) as in MedMNIST, "
            f"got {images.dtype} {images.shape}"
        )
    if labels is not None:
        labels = np.asarray(labels).reshape(len(labels), -1)[:, 0].astype(int)
        if len(labels) != len(images):
            raise ValueError(f"{path}: {len(labels)} labels in {labels_key!r} for "
                             f"{len(images)} images in {npz_key!r}")
        if labels.min() < 0 or labels.max() >= len(class_names):
            raise ValueError(f"{path}:{labels_key} holds labels outside 0..{len(class_names) - 1}"
                             f" (model classes {class_names})")
    log.info("npz input %s: %s %s%s", path, npz_key, images.shape,
             f", labels {labels_key}" if labels is not None else "")
    return [
        InputItem(str(i), None if labels is None else int(labels[i]), array=images[i])
        for i in range(len(images))
    ]


def collect_inputs(
    source: str | Path, class_names: list[str], npz_key: str | None = None,
    labels_key: str | None = None,
) -> tuple[list[InputItem], str]:
    """Items to predict and the CSV key column ("path" or "index")."""
    source = Path(source)
    if source.is_dir():
        return folder_items(source, class_names), "path"
    if not source.is_file():
        raise FileNotFoundError(f"input {source} does not exist")
    if source.suffix.lower() == ".npz":
        return npz_items(source, class_names, npz_key, labels_key), "index"
    return [InputItem(str(source), path=source)], "path"


# ---------------------------------------------------------------------------------------------
# Preprocessing (the training pipeline's own functions)


def preprocess(item: InputItem, image_size: int, channels: int) -> np.ndarray:
    """float32 (image_size, image_size, channels) in [0, 1]; raises on undecodable input."""
    from data.pipeline import preprocess_for_model

    if item.path is not None:
        return preprocess_for_model(item.path.read_bytes(), image_size, channels).numpy()
    return preprocess_for_model(item.array, image_size, channels).numpy()


def display_image(item: InputItem, size: int = DISPLAY_SIZE) -> np.ndarray:
    """The original image as float gray (H, W) in [0, 1], longest side `size` (for overlays)."""
    import tensorflow as tf

    if item.path is not None:
        from data.pipeline import decode_native

        image = decode_native(tf.constant(item.path.read_bytes()), 1, size)
    else:
        array = item.array if item.array.ndim == 3 else item.array[..., np.newaxis]
        image = tf.convert_to_tensor(array)
        if image.shape[-1] == 3:
            image = tf.image.rgb_to_grayscale(image)
    image = tf.image.resize(tf.cast(image, tf.float32), (size, size), method="bilinear",
                            preserve_aspect_ratio=True, antialias=True)
    return np.clip(image.numpy()[..., 0] / 255.0, 0.0, 1.0)


def batches(items: list[InputItem], size: int, image_size: int, channels: int,
             skipped: list[tuple[str, str]]) -> Iterator[tuple[list[InputItem], np.ndarray]]:
    """Preprocessed batches; an unreadable item is recorded in `skipped` and left out."""
    import tensorflow as tf

    batch: list[InputItem] = []
    arrays: list[np.ndarray] = []
    for item in items:
        try:
            arrays.append(preprocess(item, image_size, channels))
        except (tf.errors.OpError, ValueError, OSError) as error:
            message = getattr(error, "message", None) or str(error)
            reason = f"{type(error).__name__}: {message.splitlines()[0][:300]}"
            skipped.append((item.key, reason))
            log.warning("skipped %s (%s)", item.key, reason)
            continue
        batch.append(item)
        if len(batch) == size:
            yield batch, np.stack(arrays)
            batch, arrays = [], []
    if batch:
        yield batch, np.stack(arrays)
