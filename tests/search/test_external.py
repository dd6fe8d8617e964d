"""External evaluation sets: parsed with clear errors, read as prediction reads images."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from search.evaluation import external as ext

CLASSES = ["normal", "pneumonia"]


def test_the_real_xrays_load_with_folder_labels(chest_xray_tree):
    [spec] = ext.external_specs([{"name": "xray16", "path": str(chest_xray_tree / "val")}])
    loaded = ext.load_set(spec, CLASSES, 28, 1)
    assert loaded.x.shape == (16, 28, 28, 1) and loaded.x.dtype == np.float32
    assert loaded.x.min() >= 0.0 and loaded.x.max() <= 1.0 and loaded.x.std() > 0.05
    assert sorted(np.bincount(loaded.y).tolist()) == [8, 8]  # NORMAL / PNEUMONIA folders
    by_key = dict(zip(loaded.keys, loaded.y, strict=True))
    assert all(by_key[k] == (1 if "/PNEUMONIA/" in k else 0) for k in by_key)
    sets = ext.ExternalSets([spec], CLASSES)
    assert sets.at(32, 3)[0].x.shape == (16, 32, 32, 3) and sets.at(32, 3) is sets.at(32, 3)


def test_npz_set_uses_its_labels(make_npz):
    images = np.random.default_rng(0).integers(0, 255, (12, 28, 28), dtype=np.uint8)
    path = make_npz(val_images=images, val_labels=np.arange(12)[:, None] % 2)
    [spec] = ext.external_specs([{"name": "other", "path": str(path), "npz_key": "val_images"}])
    loaded = ext.load_set(spec, CLASSES, 28, 1)
    assert loaded.y.tolist() == [0, 1] * 6
    np.testing.assert_allclose(loaded.x[3, ..., 0], images[3] / 255.0, atol=1e-6)


@pytest.mark.parametrize(("entry", "message"), [
    ({"name": "x_1", "path": "."}, r"evaluation.external\[0\].name='x_1' must be letters"),
    ({"name": "a"}, r"evaluation.external\[0\].path is missing"),
    ({"name": "a", "path": "/nonexistent/xrays"}, "does not exist"),
    ({"name": "a", "path": ".", "split": "test"}, r"unknown key\(s\) \['split'\]"),
])
def test_bad_entries_name_the_key(entry, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        ext.external_specs([entry])


def test_duplicate_names_and_unlabelled_images_are_refused(chest_xray_tree, tmp_path):
    folder = str(chest_xray_tree / "val")
    with pytest.raises(ValueError, match="'a' is used twice"):
        ext.external_specs([{"name": "a", "path": folder}, {"name": "a", "path": folder}])
    flat = tmp_path / "flat"
    flat.mkdir()
    for source in sorted((chest_xray_tree / "val" / "NORMAL").iterdir())[:2]:
        shutil.copyfile(source, flat / source.name)
    [spec] = ext.external_specs([{"name": "flat", "path": str(flat)}])
    with pytest.raises(ValueError, match="2 of 2 images .* have no label"):
        ext.load_set(spec, CLASSES, 28, 1)
