"""Loaders: the built-in npz, synthetic npz files, and the real chest X-ray folder sample."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from data.loaders import BUILTIN_NPZ, load_npz, scan_folder

BUILTIN_SHA256 = "ec58ede4674ee658090995f85bfd5985d1372e40bfa29ebd991a9352f176cbff"


def _binary(n: int, size: int = 8) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(n)
    return {
        "train_images": rng.integers(0, 256, (n, size, size), dtype=np.uint8),
        "train_labels": (np.arange(n) % 2).reshape(-1, 1).astype(np.uint8),
    }


def test_builtin_npz_resolves_from_any_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    npz = load_npz()
    assert npz.path == BUILTIN_NPZ
    assert npz.sha256 == BUILTIN_SHA256
    assert npz.images["train"].shape == (4708, 28, 28, 1)
    assert npz.images["val"].shape == (524, 28, 28, 1)
    assert "test" not in npz.images  # the official test split is kept out on purpose
    assert npz.labels["train"].shape == (4708,)
    assert np.bincount(npz.labels["train"]).tolist() == [1214, 3494]
    assert npz.class_names == ["normal", "pneumonia"]


def test_multiclass_and_rgb_npz(make_npz: Callable[..., Path]) -> None:
    rng = np.random.default_rng(0)
    path = make_npz(
        train_images=rng.integers(0, 256, (30, 12, 12, 3), dtype=np.uint8),
        train_labels=np.arange(30) % 3,
    )
    npz = load_npz(path, label_mode="multiclass")
    assert npz.class_names == ["class_0", "class_1", "class_2"]
    assert npz.images["train"].shape == (30, 12, 12, 3)
    named = load_npz(path, class_names=["a", "b", "c"], label_mode="multiclass")
    assert named.class_names == ["a", "b", "c"]
    with pytest.raises(ValueError, match="label_mode='binary' needs 2 classes.*multiclass"):
        load_npz(path)


def test_missing_npz_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope.npz"
    with pytest.raises(FileNotFoundError, match="nope.npz"):
        load_npz(missing)


def test_npz_without_images_key(make_npz: Callable[..., Path]) -> None:
    path = make_npz(train_labels=np.zeros(4))
    with pytest.raises(ValueError, match="has 'train_labels' but no 'train_images'"):
        load_npz(path)
    path = make_npz(images=np.zeros((4, 8, 8), np.uint8))
    with pytest.raises(ValueError, match="no 'train_images'"):
        load_npz(path)


def test_label_count_mismatch(make_npz: Callable[..., Path]) -> None:
    arrays = _binary(10)
    arrays["val_images"], arrays["val_labels"] = arrays["train_images"][:5], np.array([0, 1, 0])
    with pytest.raises(ValueError, match="'val_labels' has 3 labels but 'val_images' has 5"):
        load_npz(make_npz(**arrays))


@pytest.mark.parametrize(
    ("labels", "kwargs", "message"),
    [
        (np.array([0, 1, 2, 1]), {"class_names": ["n", "p"]}, "label 2, out of range"),
        (np.array([0, -1, 1, 1]), {}, "negative label -1"),
        (np.array([0, 0, 0, 0]), {}, r"no images of class\(es\) \['pneumonia'\]"),
        (np.array([0.5, 1, 0, 1]), {}, "non-integer"),
        (np.ones((4, 3)), {}, "multi-label"),
    ],
)
def test_bad_labels(
    make_npz: Callable[..., Path], labels: np.ndarray, kwargs: dict, message: str
) -> None:
    path = make_npz(train_images=np.zeros((4, 8, 8), np.uint8), train_labels=labels)
    with pytest.raises(ValueError, match=message):
        load_npz(path, **kwargs)


def test_float_images_are_rejected_with_the_fix(make_npz: Callable[..., Path]) -> None:
    path = make_npz(train_images=np.zeros((4, 8, 8), np.float32), train_labels=np.array([0, 1] * 2))
    with pytest.raises(ValueError, match=r"uint8 0-255.*astype\('uint8'\)"):
        load_npz(path)


def test_scan_real_chest_xray_sample(chest_xray_tree: Path) -> None:
    folder = scan_folder(chest_xray_tree)
    assert folder.layout == "splits"
    assert folder.class_names == ["normal", "pneumonia"]
    assert len(folder.paths) == 16 and set(folder.given_split) == {"val"}
    assert np.bincount(folder.labels).tolist() == [8, 8]
    by_name = dict(zip(folder.rel_paths, folder.labels, strict=True))
    assert by_name["val/NORMAL/NORMAL2-IM-1427-0001.jpeg"] == 0
    assert by_name["val/PNEUMONIA/person1946_bacteria_4874.jpeg"] == 1
    assert sorted(set(folder.patients))[:2] == ["IM-1427", "IM-1430"]
    assert folder.skipped == []


def test_flat_class_folder_layout(chest_xray_tree: Path) -> None:
    flat = chest_xray_tree / "val"  # root/<class>/ without split folders
    folder = scan_folder(flat)
    assert folder.layout == "classes" and set(folder.given_split) == {"train"}
    assert len(folder.paths) == 16


def _add_virus_images(root: Path, n: int = 3) -> None:
    """Real pneumonia pixels under real-format virus names (the sample has no virus case)."""
    sources = sorted((root / "val" / "PNEUMONIA").glob("*.jpeg"))
    for k in range(n):
        shutil.copyfile(
            sources[k], root / "val" / "PNEUMONIA" / f"person{1960 + k}_virus_{4900 + k}.jpeg"
        )


def test_cause_label_mode(chest_xray_tree: Path) -> None:
    _add_virus_images(chest_xray_tree)
    folder = scan_folder(chest_xray_tree, label_mode="cause")
    assert folder.class_names == ["normal", "bacteria", "virus"]
    assert np.bincount(folder.labels).tolist() == [8, 8, 3]
    by_name = dict(zip(folder.rel_paths, folder.labels, strict=True))
    assert by_name["val/PNEUMONIA/person1960_virus_4900.jpeg"] == 2
    assert by_name["val/PNEUMONIA/person1947_bacteria_4876.jpeg"] == 1


def test_cause_mode_without_virus_images_raises(chest_xray_tree: Path) -> None:
    with pytest.raises(ValueError, match=r"no images of class\(es\) \['virus'\]"):
        scan_folder(chest_xray_tree, label_mode="cause")


def test_corrupt_files_are_skipped_with_one_warning(chest_xray_tree: Path) -> None:
    pneumonia = chest_xray_tree / "val" / "PNEUMONIA"
    (pneumonia / "notes.txt").write_text("not an image")
    whole = (pneumonia / "person1946_bacteria_4874.jpeg").read_bytes()
    (pneumonia / "person1999_bacteria_9999.jpeg").write_bytes(whole[: len(whole) // 2])
    (pneumonia / ".DS_Store").write_bytes(b"\0\1")  # OS metadata: ignored silently
    with pytest.warns(UserWarning, match="skipped 2 file") as record:
        folder = scan_folder(chest_xray_tree)
    assert len(record) == 1
    message = str(record[0].message)
    assert "val/PNEUMONIA/notes.txt" in message
    assert "val/PNEUMONIA/person1999_bacteria_9999.jpeg" in message
    assert sorted(folder.skipped) == [
        "val/PNEUMONIA/notes.txt",
        "val/PNEUMONIA/person1999_bacteria_9999.jpeg",
    ]
    assert len(folder.paths) == 16


def test_missing_root(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="data.root not found.*missing_dir"):
        scan_folder(tmp_path / "missing_dir")
    with pytest.raises(ValueError, match="data.root is required"):
        scan_folder(None)


def test_empty_class_folder(chest_xray_tree: Path) -> None:
    for jpeg in (chest_xray_tree / "val" / "NORMAL").glob("*"):
        jpeg.unlink()
    with pytest.raises(ValueError, match=r"empty class folder: .*val/NORMAL"):
        scan_folder(chest_xray_tree)


def test_single_class_folder(chest_xray_tree: Path) -> None:
    shutil.rmtree(chest_xray_tree / "val" / "NORMAL")
    with pytest.raises(ValueError, match=r"only one class folder \(\['PNEUMONIA'\]\)"):
        scan_folder(chest_xray_tree)


def test_splits_with_different_class_folders(chest_xray_tree: Path) -> None:
    (chest_xray_tree / "test" / "PNEUMONIA").mkdir(parents=True)
    shutil.copy(
        next((chest_xray_tree / "val" / "PNEUMONIA").glob("*.jpeg")),
        chest_xray_tree / "test" / "PNEUMONIA",
    )
    with pytest.raises(ValueError, match=r"class folders differ between splits.*NORMAL"):
        scan_folder(chest_xray_tree)
