"""Class-folder trees: scan a `root/<class>/` or `root/{train,val,test}/<class>/` tree into
validated file lists and labels (undecodable files skipped and named), and the label modes.

Nothing here builds a tf.data pipeline; every problem with the input is raised here, before
any training starts, naming the folder and the fix. `data.loaders` re-exports it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from data.decoded_cache import first_time, load_decode_checks, save_decode_checks
from data.splits import SPLITS, patient_id_from_filename

LABEL_MODES = ("binary", "multiclass", "cause")
CAUSE_CLASSES = ["normal", "bacteria", "virus"]
_CAUSE = re.compile(r"_(bacteria|virus)_", re.IGNORECASE)
_MAX_NAMED = 20  # how many skipped files a warning names before summarising
# (path, size, mtime) -> undecodable. Sweeps build the data once per trial in one process; the
# check costs ~3 ms per full-size JPEG on 2 cores (~17 s for the 5,856-image dataset), so repeat
# it only for files that changed.
_DECODE_CHECKS: dict[tuple[str, int, int], bool] = {}


@dataclass
class FolderData:
    """The image files of a class-folder tree, one entry per decodable file.

    Attributes:
        paths: Absolute file paths.
        rel_paths: Paths relative to the root (posix), stable ids for fingerprints.
        labels: int64 label per file.
        patients: Patient id per file (see ``patient_id_from_filename``).
        given_split: "train"/"val"/"test" from the layout ("train" for a flat class-folder root).
        class_names: One name per class index.
        root: The root folder.
        layout: "splits" for root/{train,val,test}/<class>/, "classes" for root/<class>/.
        skipped: Relative paths of files that could not be decoded as images.
    """

    paths: np.ndarray
    rel_paths: np.ndarray
    labels: np.ndarray
    patients: np.ndarray
    given_split: np.ndarray
    class_names: list[str]
    root: Path
    layout: str
    skipped: list[str] = field(default_factory=list)


def check_label_mode(label_mode: str) -> None:
    if label_mode not in LABEL_MODES:
        raise ValueError(f"data.label_mode must be one of {LABEL_MODES}, got {label_mode!r}")


def _visible_dirs(folder: Path) -> list[Path]:
    return sorted(
        (p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")),
        key=lambda p: p.name.lower(),
    )


def _visible_files(folder: Path) -> list[Path]:
    # Dotfiles (.DS_Store, ._foo.jpeg from macOS archives) are metadata, not images: ignored.
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def find_undecodable(paths: Sequence[Path], workers: int | None = None) -> list[Path]:
    """Return the files TensorFlow's image decoder rejects (non-images, truncated files).

    Uses the pipeline's TensorFlow decoders, so a file that passes will not stop training. JPEGs
    are decoded at 1/8 scale (DCT scaling still reads the whole stream, so truncation shows);
    other formats are decoded to RGB, as the pipeline does. Results are remembered per (path,
    size, mtime) for the life of the process and in the project's cache folder
    (data/decoded_cache.py), so a new sweep worker does not decode every file
    again (about 2.5 ms a full-size X-ray).

    Args:
        paths: Files to check.
        workers: Threads (TF ops release the GIL); default: the usable CPU count.

    Returns:
        The undecodable paths, in input order.
    """
    import tensorflow as tf  # heavy; only the folder source needs it here

    def is_bad(path: Path) -> bool:
        try:
            raw = tf.io.read_file(str(path))
            if tf.io.is_jpeg(raw):
                tf.io.decode_jpeg(raw, ratio=8)  # the file's own channels: CMYK decodes too
            else:
                tf.io.decode_image(raw, channels=3, expand_animations=False)
        except tf.errors.OpError:  # not an image, truncated, unreadable
            return True
        return False

    def key(path: Path) -> tuple[str, int, int]:
        stat = path.stat()
        return str(path), stat.st_size, stat.st_mtime_ns

    keys = [key(Path(p)) for p in paths]
    todo = [k for k in dict.fromkeys(keys) if k not in _DECODE_CHECKS]
    if todo:  # another worker or an earlier run may have checked them: the on-disk record
        _DECODE_CHECKS.update(load_decode_checks())
        todo = [k for k in todo if k not in _DECODE_CHECKS]
    if todo:
        workers = workers or len(os.sched_getaffinity(0))
        with ThreadPoolExecutor(max_workers=workers) as pool:
            found = dict(zip(todo, pool.map(lambda k: is_bad(Path(k[0])), todo), strict=True))
        _DECODE_CHECKS.update(found)
        save_decode_checks(found)
    return [p for p, k in zip(paths, keys, strict=True) if _DECODE_CHECKS[k]]


def _class_folders(root: Path) -> tuple[str, dict[str, list[Path]]]:
    """Detect the layout and return (layout, split -> class folders)."""
    split_dirs = {s: root / s for s in SPLITS if (root / s).is_dir() and _visible_dirs(root / s)}
    if split_dirs:
        return "splits", {s: _visible_dirs(d) for s, d in split_dirs.items()}
    classes = _visible_dirs(root)
    if not classes:
        raise ValueError(
            f"no class folders in {root}; expected {root}/<class>/*.jpeg or "
            f"{root}/{{train,val,test}}/<class>/*.jpeg (e.g. chest_xray/train/NORMAL/)"
        )
    return "classes", {"train": classes}


def scan_folder(root: str | os.PathLike | None, label_mode: str = "binary") -> FolderData:
    """List, label and validate the images of a class-folder tree.

    ``root`` is either ``root/<class>/`` or the public layout ``root/{train,val,test}/<class>/``.
    Files that TensorFlow cannot decode are skipped, named in one warning (once for the same
    files: `data.decoded_cache.first_time`) and in `FolderData.skipped`.

    Args:
        root: The folder.
        label_mode: "binary" (exactly two class folders, sorted: NORMAL -> 0, PNEUMONIA -> 1),
            "multiclass" (one class per folder) or "cause" (normal / bacteria / virus from the
            NORMAL folder and the ``_bacteria_`` / ``_virus_`` part of the file names).

    Returns:
        The labelled files.

    Raises:
        FileNotFoundError: ``root`` is missing.
        ValueError: No class folders, splits with different class folders, an empty class folder,
            a label mode the folders do not fit, or a pneumonia file name without a cause.
    """
    check_label_mode(label_mode)
    if root is None:
        raise ValueError(
            "data.root is required for source=folder; set data.root=/path/to/chest_xray"
        )
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise FileNotFoundError(
            f"data.root not found or not a folder: {root}; point data.root at a folder with one "
            f"sub-folder per class, or at chest_xray/ with train/val/test sub-folders"
        )
    layout, folders = _class_folders(root)
    names_per_split = {s: [d.name for d in dirs] for s, dirs in folders.items()}
    folder_names = next(iter(names_per_split.values()))
    for split, names in names_per_split.items():
        if [n.lower() for n in names] != [n.lower() for n in folder_names]:
            raise ValueError(
                f"class folders differ between splits under {root}: {names_per_split}; every "
                f"split needs the same class folders (missing in {split}: "
                f"{sorted(set(folder_names) ^ set(names))})"
            )
    class_names, folder_label = _folder_classes(folder_names, label_mode, root)

    files: list[Path] = []
    splits: list[str] = []
    for split, dirs in folders.items():
        for class_dir in dirs:
            found = _visible_files(class_dir)
            if not found:
                raise ValueError(
                    f"empty class folder: {class_dir} has no files; add images or remove the folder"
                )
            files += found
            splits += [split] * len(found)

    bad = set(find_undecodable(files))
    skipped = [p.relative_to(root).as_posix() for p in files if p in bad]
    # Once for the same files (the list stays in FolderData.skipped, logged on every run)
    if skipped and first_time(_skipped_key(root, sorted(bad))):
        shown = ", ".join(skipped[:_MAX_NAMED])
        more = f" and {len(skipped) - _MAX_NAMED} more" if len(skipped) > _MAX_NAMED else ""
        warnings.warn(
            f"skipped {len(skipped)} file(s) under {root} that are not decodable images "
            f"(JPEG/PNG/GIF/BMP/WebP; truncated or not an image): {shown}{more}",
            UserWarning,
            stacklevel=2,
        )
    kept = [(p, s) for p, s in zip(files, splits, strict=True) if p not in bad]
    for dirs in folders.values():
        for class_dir in dirs:
            if not any(p.parent == class_dir for p, _ in kept):
                raise ValueError(
                    f"class folder {class_dir} has no decodable images (all its files were "
                    f"skipped); add valid images or remove the folder"
                )

    labels = []
    for path, _ in kept:
        if label_mode == "cause":
            labels.append(_cause_label(path, root))
        else:
            labels.append(folder_label[path.parent.name])
    labels_arr = np.array(labels, dtype=np.int64)
    absent = [n for i, n in enumerate(class_names) if not np.any(labels_arr == i)]
    if absent:
        raise ValueError(
            f"no images of class(es) {absent} under {root} (label_mode={label_mode!r}); every "
            f"class needs images ({len(class_names) - len(absent)} of {len(class_names)} "
            f"classes have some: {[n for n in class_names if n not in absent]}); add images "
            "of the missing class(es) or choose a label_mode without them"
        )
    return FolderData(
        paths=np.array([str(p) for p, _ in kept]),
        rel_paths=np.array([p.relative_to(root).as_posix() for p, _ in kept]),
        labels=labels_arr,
        patients=np.array([patient_id_from_filename(p.name) for p, _ in kept]),
        given_split=np.array([s for _, s in kept]),
        class_names=class_names,
        root=root,
        layout=layout,
        skipped=skipped,
    )


def _skipped_key(root: Path, bad: list[Path]) -> str:
    """The said-once key of a skipped-files warning: the root and each file's name, size and
    time, so a new or changed undecodable file is said again."""
    def stamp(path: Path) -> tuple[str, int, int]:
        try:
            stat = path.lstat()  # lstat: a symlink loop is one of the files skipped
            return path.relative_to(root).as_posix(), stat.st_size, stat.st_mtime_ns
        except OSError:
            return path.relative_to(root).as_posix(), -1, -1
    text = json.dumps([str(root), [stamp(p) for p in bad]])
    return "skipped:" + hashlib.sha256(text.encode()).hexdigest()[:24]


def _folder_classes(
    folder_names: list[str], label_mode: str, root: Path
) -> tuple[list[str], dict[str, int]]:
    """Class names and the folder-name -> label map for a label mode."""
    if label_mode == "cause":
        lowered = sorted(n.lower() for n in folder_names)
        if lowered != ["normal", "pneumonia"]:
            raise ValueError(
                f"label_mode='cause' needs exactly the class folders NORMAL and PNEUMONIA under "
                f"{root}, found {folder_names}; use label_mode=binary or multiclass"
            )
        return list(CAUSE_CLASSES), {}
    if len(folder_names) < 2:
        raise ValueError(
            f"only one class folder ({folder_names}) under {root}; a classifier needs at least "
            f"two classes"
        )
    if label_mode == "binary" and len(folder_names) != 2:
        raise ValueError(
            f"label_mode='binary' needs exactly 2 class folders under {root}, found "
            f"{folder_names}; set data.label_mode=multiclass"
        )
    # Sorted case-insensitively (NORMAL -> 0, PNEUMONIA -> 1); names lower-cased for display.
    return [n.lower() for n in folder_names], {n: i for i, n in enumerate(folder_names)}


def _cause_label(path: Path, root: Path) -> int:
    """normal / bacteria / virus label of one file for label_mode='cause'."""
    if path.parent.name.lower() == "normal":
        return 0
    match = _CAUSE.search(path.name)
    if match is None:
        raise ValueError(
            f"label_mode='cause' cannot tell bacteria from virus for {path.relative_to(root)}: "
            f"the name has neither '_bacteria_' nor '_virus_'; rename it (personN_virus_K.jpeg) "
            f"or use label_mode=binary"
        )
    return CAUSE_CLASSES.index(match.group(1).lower())
