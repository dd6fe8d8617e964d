"""An npz the loader cannot take as plain numbers is refused by file and key, never unpickled.

Each row is a real file written with numpy (object arrays are pickled by np.savez); the
message must name the file and the array, say how to re-save it, and never repeat numpy's own
"allow_pickle" advice (which would run code from the file).
"""

from __future__ import annotations

import numpy as np
import pytest

from data.loaders import load_npz

U8 = np.uint8


def images(n: int) -> np.ndarray:
    return np.random.default_rng(n).integers(0, 256, (n, 8, 8), dtype=U8)


def objects(values: list) -> np.ndarray:
    array = np.empty(len(values), dtype=object)
    array[:] = values
    return array


def plain() -> dict[str, np.ndarray]:
    return {"train_images": images(6), "train_labels": np.arange(6) % 2}


# (case, arrays replacing the plain ones, the key the message must name, the fix it gives)
PICKLED = [
    ("object images", {"train_images": objects(list(images(6)))}, "train_images",
     "np.stack(images).astype('uint8')"),
    ("object labels", {"train_labels": objects([0, 1, 0, 1, 0, 1])}, "train_labels",
     "np.asarray(labels, dtype='int64')"),
    ("record with an object field", {"train_labels": np.zeros(6, [("y", "O"), ("w", "f4")])},
     "train_labels", "np.asarray(labels, dtype='int64')"),
    ("object val split", {"val_images": objects(list(images(4))),
                          "val_labels": np.arange(4) % 2}, "val_images", "np.stack(images)"),
]


@pytest.mark.parametrize(("case", "arrays", "key", "fix"), PICKLED, ids=[r[0] for r in PICKLED])
def test_pickled_object_arrays_are_refused_by_file_and_key(make_npz, case, arrays, key, fix):
    path = make_npz(**{**plain(), **arrays})
    with pytest.raises(ValueError) as caught:
        load_npz(path)
    message = str(caught.value)
    assert str(path) in message and f"'{key}'" in message, message
    assert "pickled data is never loaded" in message and fix in message, message
    assert "allow_pickle" not in message and "Object arrays cannot be loaded" not in message


def test_a_damaged_member_is_named_not_a_raw_zip_error(make_npz):
    path = make_npz(**plain())
    raw = bytearray(path.read_bytes())
    start = raw.index(b"train_images.npy") + 200  # inside that member's stored bytes
    raw[start:start + 16] = bytes(16)
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=r"'train_images' cannot be read \(BadZipFile") as caught:
        load_npz(path)
    assert str(path) in str(caught.value) and "damaged or truncated" in str(caught.value)


def test_plain_numeric_arrays_still_load(make_npz):
    data = load_npz(make_npz(**plain()))
    assert data.images["train"].shape == (6, 8, 8, 1) and data.labels["train"].tolist() == [
        0, 1, 0, 1, 0, 1]
