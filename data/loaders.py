"""Loaders: read a MedMNIST-style npz or a class-folder tree into plain, validated arrays.

The npz reader lives here, the class-folder scan in `data.folder_loader` (re-exported).
Nothing here builds a tf.data pipeline; every problem with the input is raised here, before
any training starts, naming the file or folder and the fix.
"""

from __future__ import annotations

import hashlib
import os
import zipfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data.folder_loader import (  # noqa: F401 - re-exported: the loaders' one import path
    CAUSE_CLASSES,
    LABEL_MODES,
    FolderData,
    check_label_mode,
    find_undecodable,
    scan_folder,
)
from data.splits import SPLITS

BUILTIN_NPZ = Path(__file__).resolve().parent / "builtin" / "pneumoniamnist_28_trainval.npz"


@dataclass
class NpzData:
    """The splits of an npz file.

    Attributes:
        images: Split name -> uint8 array (N, H, W, C) with C in {1, 3}.
        labels: Split name -> int64 array (N,).
        class_names: One name per class index.
        path: The file read.
        sha256: Digest of the file, identifying the data exactly.
    """

    images: dict[str, np.ndarray]
    labels: dict[str, np.ndarray]
    class_names: list[str]
    path: Path
    sha256: str


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_npz(
    path: str | os.PathLike | None = None,
    class_names: Sequence[str] | None = None,
    label_mode: str = "binary",
) -> NpzData:
    """Read and validate a MedMNIST-layout npz ({train,val,test}_images / _labels).

    Args:
        path: The .npz file; None for the built-in PneumoniaMNIST copy.
        class_names: Names per class index; default ["normal", "pneumonia"] for 2 classes,
            else "class_0", "class_1", ...
        label_mode: "binary" (exactly 2 classes) or "multiclass"; "cause" needs file names and
            is only for the folder source.

    Returns:
        The validated splits.

    Raises:
        FileNotFoundError: The file does not exist.
        ValueError: Missing keys, bad shapes or dtypes, a pickled object array (refused by key,
            never loaded) or a damaged one, label/image count mismatch, labels out of range, a
            single class, or a class count that contradicts ``label_mode``.
    """
    check_label_mode(label_mode)
    if label_mode == "cause":
        raise ValueError(
            "data.label_mode='cause' derives the cause from file names and needs source=folder; "
            "use label_mode=binary or multiclass for an npz"
        )
    npz_path = BUILTIN_NPZ if path is None else Path(path).expanduser()
    if not npz_path.is_file():
        raise FileNotFoundError(
            f"npz file not found: {npz_path}; set data.path to an existing MedMNIST-layout .npz, "
            f"or null for the built-in PneumoniaMNIST copy"
        )
    try:
        archive = np.load(npz_path, allow_pickle=False)
        keys = set(archive.files)
    except Exception as error:  # np.load raises several types for a non-npz file
        # Not numpy's own advice: it suggests allow_pickle, which would run code from the file.
        raise ValueError(
            f"{npz_path} is not a readable .npz archive ({type(error).__name__}); data.path must "
            "be a MedMNIST-layout .npz of uint8 image arrays (np.savez); pickled files are "
            "never loaded"
        ) from None

    images: dict[str, np.ndarray] = {}
    labels: dict[str, np.ndarray] = {}
    with archive:
        for split in SPLITS:
            image_key, label_key = f"{split}_images", f"{split}_labels"
            if image_key not in keys and label_key not in keys:
                continue
            if image_key not in keys or label_key not in keys:
                have, missing = (
                    (label_key, image_key) if image_key not in keys else (image_key, label_key)
                )
                raise ValueError(
                    f"{npz_path} has '{have}' but no '{missing}'; each split needs both "
                    f"<split>_images and <split>_labels"
                )
            images[split] = _as_image_array(
                read_npz_array(archive, image_key, npz_path), image_key, npz_path)
            labels[split] = _as_label_array(
                read_npz_array(archive, label_key, npz_path), label_key, npz_path)
            if len(labels[split]) != len(images[split]):
                raise ValueError(
                    f"{npz_path}: '{label_key}' has {len(labels[split])} labels but "
                    f"'{image_key}' has {len(images[split])} images; they must match one to one"
                )
    if "train" not in images:
        raise ValueError(
            f"{npz_path} has no 'train_images'/'train_labels' (keys: {sorted(keys)}); a "
            f"MedMNIST-layout npz needs at least the train split (val_/test_ are optional)"
        )
    shapes = {s: a.shape[1:] for s, a in images.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"{npz_path}: splits have different image shapes {shapes}")

    names = _npz_class_names(labels, class_names, label_mode, npz_path)
    return NpzData(images, labels, names, npz_path, _sha256(npz_path))


def _stored_dtype(archive: np.lib.npyio.NpzFile, key: str) -> np.dtype | None:
    """The dtype an npz member holds, read from its .npy header (no data is read); None when
    the header cannot be read (the load then says what is wrong)."""
    try:
        with archive.zip.open(f"{key}.npy") as member:
            version = np.lib.format.read_magic(member)
            # Format 3.0 differs from 2.0 only in how field names are encoded.
            read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                    else np.lib.format.read_array_header_2_0)
            return np.dtype(read(member)[2])
    except (KeyError, OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error):
        return None


def read_npz_array(archive: np.lib.npyio.NpzFile, key: str, path: Path) -> np.ndarray:
    """``archive[key]``, refusing a pickled object array by file and key, never loading it.

    Args:
        archive: An npz opened with ``np.load(path, allow_pickle=False)``.
        key: The array's name in the file (e.g. ``train_images``).
        path: The file, for the messages.

    Raises:
        ValueError: The array holds Python objects (numpy would need ``allow_pickle``, which
            runs code from the file), or its data is damaged; both name the file and the key.
    """
    dtype = _stored_dtype(archive, key)
    if dtype is not None and dtype.hasobject:
        raise _pickled(path, key, dtype)
    try:
        return archive[key]
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as error:
        if "allow_pickle" in str(error):  # objects behind a header we could not read
            raise _pickled(path, key, None) from None
        first = str(error).splitlines()[0] if str(error) else "damaged data"
        raise ValueError(
            f"{path}: '{key}' cannot be read ({type(error).__name__}: {first}); the file is "
            "damaged or truncated: write it again with np.savez"
        ) from None


def _pickled(path: Path, key: str, dtype: np.dtype | None) -> ValueError:
    """The refusal of a pickled object array, with the way to re-save it as numbers."""
    fix = ("np.stack(images).astype('uint8')" if key.endswith("_images")
           else "np.asarray(labels, dtype='int64')")
    return ValueError(
        f"{path}: '{key}' is an array of Python objects"
        + (f" (dtype {dtype})" if dtype is not None else "")
        + ", stored pickled; pickled data is never loaded, as unpickling can run code from "
        f"the file. Re-save '{key}' as a plain numeric array: np.savez(..., {key}={fix})"
    )


def _as_image_array(array: np.ndarray, key: str, path: Path) -> np.ndarray:
    """(N,H,W) / (N,H,W,1) / (N,H,W,3) uint8 -> (N,H,W,C)."""
    if array.dtype != np.uint8:
        raise ValueError(
            f"{path}: '{key}' has dtype {array.dtype}; images must be uint8 0-255 as in MedMNIST "
            f"(convert with (x * 255).round().astype('uint8') if they are floats in [0, 1])"
        )
    if array.ndim == 3:
        array = array[..., np.newaxis]
    if array.ndim != 4 or array.shape[-1] not in (1, 3) or 0 in array.shape[1:3]:
        raise ValueError(
            f"{path}: '{key}' has shape {array.shape}; expected (N, H, W), (N, H, W, 1) or "
            f"(N, H, W, 3)"
        )
    return array


def _as_label_array(array: np.ndarray, key: str, path: Path) -> np.ndarray:
    """(N,) or (N,1) integer labels -> int64 (N,)."""
    if array.ndim == 2 and array.shape[1] == 1:
        array = array[:, 0]
    if array.ndim != 1:
        raise ValueError(
            f"{path}: '{key}' has shape {array.shape}; expected (N,) or (N, 1) class indices "
            f"(multi-label targets are not supported)"
        )
    if array.size and not np.array_equal(array, np.round(array)):
        raise ValueError(f"{path}: '{key}' holds non-integer values; labels must be class indices")
    labels = array.astype(np.int64)
    if labels.size and labels.min() < 0:
        raise ValueError(f"{path}: '{key}' has negative label {labels.min()}; labels must be >= 0")
    return labels


def _npz_class_names(
    labels: dict[str, np.ndarray],
    class_names: Sequence[str] | None,
    label_mode: str,
    path: Path,
) -> list[str]:
    """Check the label values against the class names and the label mode."""
    all_labels = np.concatenate(list(labels.values()))
    highest = int(all_labels.max()) if all_labels.size else -1
    if class_names is not None:
        names = [str(n) for n in class_names]
        for split, values in labels.items():
            if values.size and values.max() >= len(names):
                raise ValueError(
                    f"{path}: '{split}_labels' has label {int(values.max())}, out of range for "
                    f"the {len(names)} class_names {names}; fix data.class_names"
                )
    else:
        n_classes = max(highest + 1, 2)
        names = (
            ["normal", "pneumonia"] if n_classes == 2 else [f"class_{i}" for i in range(n_classes)]
        )
    if label_mode == "binary" and len(names) != 2:
        raise ValueError(
            f"{path}: label_mode='binary' needs 2 classes but the labels/class_names give "
            f"{len(names)} ({names}); set data.label_mode=multiclass"
        )
    absent = [names[c] for c in range(len(names)) if not np.any(all_labels == c)]
    if absent:
        present = [names[c] for c in range(len(names)) if names[c] not in absent]
        raise ValueError(
            f"{path}: no images of class(es) {absent} (labels present: "
            f"{sorted(set(all_labels.tolist()))}, {len(present)} of {len(names)} classes have "
            f"images: {present}); a classifier needs images of every class: add them, or drop "
            "the class from data.class_names"
        )
    return names
