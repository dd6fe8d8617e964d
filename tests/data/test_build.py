"""build_data end to end: the built-in npz, synthetic npz files, the real JPEG sample, Hydra."""

from __future__ import annotations

import hashlib
import math
import shutil
from collections.abc import Callable
from pathlib import Path

import hydra
import numpy as np
import pytest
import tensorflow as tf
from omegaconf import OmegaConf
from omegaconf.errors import MissingMandatoryValue

import data
from data.build import DataBundle, build_data
from data.splits import patient_id_from_filename

CONF_DATA = Path(data.__file__).resolve().parents[1] / "conf" / "data"


@pytest.fixture(scope="module")
def builtin() -> DataBundle:
    """The default: built-in PneumoniaMNIST, test carved from train."""
    return build_data(seed=42)


def _images(dataset: tf.data.Dataset, steps: int | None = None) -> np.ndarray:
    batches = dataset.take(steps) if steps else dataset
    return np.concatenate([np.rint(x.numpy() * 255).astype(np.uint8) for x, _ in batches])


def _hashes(images: np.ndarray) -> set[str]:
    return {hashlib.sha1(image.tobytes()).hexdigest() for image in images}


def test_builtin_bundle_contract(builtin: DataBundle) -> None:
    assert builtin.class_names == ["normal", "pneumonia"] and builtin.n_classes == 2
    assert builtin.input_shape == (28, 28, 1)
    assert builtin.n_val == 524  # the given val split is kept
    assert builtin.n_train + builtin.n_test == 4708  # test carved from train
    assert abs(builtin.n_test / 4708 - 0.1) < 0.01
    assert builtin.steps_per_epoch == math.ceil(builtin.n_train / 64)
    counts = builtin.source_info["counts"]
    assert counts["val"] == {"normal": 135, "pneumonia": 389}
    test_share = counts["test"]["pneumonia"] / builtin.n_test
    assert abs(test_share - 3494 / 4708) < 0.02  # stratified
    assert builtin.y_test.shape == (builtin.n_test,) and builtin.y_val.dtype == np.int64
    assert builtin.preprocessing == {
        "image_size": 28, "channels": 1, "scale": 1 / 255, "resize": "bilinear",
        "antialias": True, "aspect": "stretch", "dtype_before_scale": "uint8",
    }  # fmt: skip
    assert builtin.source_info["duplicate_images"]["across_given_splits"] == 8
    x, y = next(iter(builtin.train))
    assert x.shape == (64, 28, 28, 1) and x.dtype == tf.float32
    assert y.shape == (64,) and y.dtype == tf.float32


def test_val_order_matches_y_val_and_is_finite(builtin: DataBundle) -> None:
    labels = np.concatenate([y.numpy() for _, y in builtin.val])
    assert np.array_equal(labels, builtin.y_val)
    assert len(list(builtin.test)) == math.ceil(builtin.n_test / 64)
    assert len(builtin.split_ids["val"]) == 524 and builtin.split_ids["val"][0] == "val/0"


def test_train_repeats_forever(builtin: DataBundle) -> None:
    batches = list(builtin.train.take(builtin.steps_per_epoch + 1))
    assert len(batches) == builtin.steps_per_epoch + 1
    assert batches[builtin.steps_per_epoch - 1][0].shape[0] == builtin.n_train % 64  # pass ends
    assert batches[builtin.steps_per_epoch][0].shape[0] == 64  # next pass begins


def test_duplicate_images_never_straddle_train_and_test(builtin: DataBundle) -> None:
    train = _images(builtin.train, builtin.steps_per_epoch)
    assert len(train) == builtin.n_train
    assert len(_hashes(train)) < len(train)  # the real file has duplicates within train...
    assert not _hashes(train) & _hashes(_images(builtin.test))  # ...never split apart


def test_balanced_class_weights(builtin: DataBundle) -> None:
    counts = builtin.source_info["counts"]["train"]
    n = builtin.n_train
    assert builtin.class_weight == pytest.approx(
        {0: n / (2 * counts["normal"]), 1: n / (2 * counts["pneumonia"])}
    )
    assert builtin.class_weight[0] > 1 > builtin.class_weight[1]  # normal is the minority


def test_fingerprint_is_stable_and_follows_the_seed(builtin: DataBundle) -> None:
    assert build_data(seed=42, class_weight=None).fingerprint == builtin.fingerprint
    other = build_data(seed=7)
    assert other.fingerprint != builtin.fingerprint
    assert other.n_val == builtin.n_val  # only the carved test split moved


def test_resplit_pools_train_and_val(builtin: DataBundle) -> None:
    bundle = build_data(resplit=True, val_fraction=0.1, test_fraction=0.1, seed=42)
    assert bundle.n_train + bundle.n_val + bundle.n_test == 4708 + 524
    assert abs(bundle.n_val / 5232 - 0.1) < 0.01 and abs(bundle.n_test / 5232 - 0.1) < 0.01
    # the 8 images published in both train and val now sit in one split only
    assert bundle.source_info["groups_in_several_splits"] == 0
    assert builtin.source_info["groups_in_several_splits"] == 8
    assert bundle.fingerprint != builtin.fingerprint


def test_subset_fraction_is_stratified(builtin: DataBundle) -> None:
    small = build_data(subset_fraction=0.1, seed=42)
    for split in ("train", "val", "test"):
        full, part = builtin.source_info["counts"][split], small.source_info["counts"][split]
        for cls in ("normal", "pneumonia"):
            assert part[cls] == max(1, round(0.1 * full[cls])), (split, cls)
    assert small.steps_per_epoch == math.ceil(small.n_train / 64)


def test_class_weight_options(make_npz: Callable[..., Path]) -> None:
    rng = np.random.default_rng(0)
    path = make_npz(
        train_images=rng.integers(0, 256, (60, 8, 8), dtype=np.uint8),
        train_labels=np.r_[np.zeros(45), np.ones(15)].astype(np.uint8),
    )
    common = {"path": path, "image_size": 8, "batch_size": 8}
    assert build_data(class_weight="none", **common).class_weight is None
    assert build_data(class_weight={0: 1, 1: 3}, **common).class_weight == {0: 1.0, 1: 3.0}
    with pytest.raises(ValueError, match="data.class_weight must be 'balanced'"):
        build_data(class_weight="inverse", **common)


def test_multiclass_npz_resize_and_rgb(make_npz: Callable[..., Path]) -> None:
    rng = np.random.default_rng(1)
    path = make_npz(
        train_images=rng.integers(0, 256, (90, 28, 28), dtype=np.uint8),
        train_labels=(np.arange(90) % 3).reshape(-1, 1),
        val_images=rng.integers(0, 256, (30, 28, 28), dtype=np.uint8),
        val_labels=(np.arange(30) % 3).reshape(-1, 1),
    )
    bundle = build_data(
        path=path, label_mode="multiclass", image_size=32, channels=3, batch_size=16,
        class_names=["normal", "bacteria", "virus"], test_fraction=0.2,
    )  # fmt: skip
    assert bundle.class_names == ["normal", "bacteria", "virus"]
    assert bundle.input_shape == (32, 32, 3)
    assert bundle.n_val == 30 and bundle.n_test == 18 and bundle.n_train == 72
    x, y = next(iter(bundle.val))
    assert x.shape == (16, 32, 32, 3) and y.dtype == tf.int32 and y.shape == (16,)
    assert set(bundle.class_weight) == {0, 1, 2}


def test_mixup_reaches_train_only_and_is_refused_for_k_classes(
    make_npz: Callable[..., Path],
) -> None:
    rng = np.random.default_rng(3)
    path = make_npz(
        train_images=rng.integers(0, 256, (60, 8, 8), dtype=np.uint8),
        train_labels=(np.arange(60) % 2).astype(np.uint8),
    )
    bundle = build_data(path=path, image_size=8, batch_size=16, mixup=0.4, class_weight="none")
    y = next(iter(bundle.train))[1].numpy()
    assert y.dtype == np.float32 and np.any((y > 0) & (y < 1))  # mixed
    assert set(np.concatenate([b.numpy() for _, b in bundle.val])) <= {0.0, 1.0}  # never
    assert set(np.concatenate([b.numpy() for _, b in bundle.test])) <= {0.0, 1.0}
    for label_mode in ("multiclass", "cause"):
        with pytest.raises(ValueError, match=r"data\.mixup=0\.2 needs data\.label_mode=binary"):
            build_data(path=path, image_size=8, mixup=0.2, label_mode=label_mode)
    with pytest.raises(ValueError, match=r"data\.mixup must be a number >= 0"):
        build_data(path=path, image_size=8, mixup=-1)
    assert build_data(path=path, image_size=8, mixup=None).n_train == bundle.n_train  # off


def test_single_class_after_splitting_raises(make_npz: Callable[..., Path]) -> None:
    rng = np.random.default_rng(2)
    path = make_npz(
        train_images=rng.integers(0, 256, (21, 8, 8), dtype=np.uint8),
        train_labels=np.r_[np.zeros(20), np.ones(1)].astype(np.uint8),  # one pneumonia image
    )
    with pytest.raises(ValueError, match=r"cannot carve a test split.*pneumonia: 1 images"):
        build_data(path=path, image_size=8)


def test_argument_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="absent.npz"):
        build_data(path=tmp_path / "absent.npz")
    with pytest.raises(ValueError, match="data.source must be 'npz' or 'folder'"):
        build_data(source="csv")
    with pytest.raises(ValueError, match="data.channels must be 1"):
        build_data(channels=2)
    with pytest.raises(ValueError, match="data.root is for source=folder"):
        build_data(root=tmp_path)
    with pytest.raises(ValueError, match="data.subset_fraction"):
        build_data(subset_fraction=0.0)


def test_folder_source_on_real_jpegs_is_patient_aware(chest_xray_tree: Path) -> None:
    bundle = build_data(
        source="folder", root=chest_xray_tree, image_size=64, resplit=True, val_fraction=0.15,
        test_fraction=0.15, batch_size=4, seed=3,
    )  # fmt: skip
    assert bundle.class_names == ["normal", "pneumonia"]
    assert bundle.n_train + bundle.n_val + bundle.n_test == 16
    assert min(bundle.n_train, bundle.n_val, bundle.n_test) >= 2
    patients = {
        split: {patient_id_from_filename(p) for p in ids} for split, ids in bundle.split_ids.items()
    }
    assert not patients["train"] & patients["val"]
    assert not patients["train"] & patients["test"] and not patients["val"] & patients["test"]
    for split in ("val", "test"):
        assert set(getattr(bundle, f"y_{split}")) == {0, 1}
    x, y = next(iter(bundle.val))
    assert x.shape[1:] == (64, 64, 1) and y.dtype == tf.float32
    assert bundle.source_info["layout"] == "splits" and bundle.source_info["skipped"] == []
    again = build_data(source="folder", root=chest_xray_tree, image_size=64, resplit=True,
                       val_fraction=0.15, test_fraction=0.15, batch_size=4, seed=3)  # fmt: skip
    assert again.fingerprint == bundle.fingerprint


def test_folder_cause_mode_with_a_corrupt_file(chest_xray_tree: Path) -> None:
    pneumonia = chest_xray_tree / "val" / "PNEUMONIA"
    sources = sorted(pneumonia.glob("*.jpeg"))
    for k in range(3):  # the sample has no virus case: real pixels under virus names
        shutil.copyfile(sources[k], pneumonia / f"person{1960 + k}_virus_{4900 + k}.jpeg")
    (pneumonia / "readme.txt").write_text("not an image")
    with pytest.warns(UserWarning, match=r"skipped 1 file.*val/PNEUMONIA/readme.txt"):
        bundle = build_data(
            source="folder", root=chest_xray_tree, label_mode="cause", image_size=32,
            resplit=True, val_fraction=0.15, test_fraction=0.15, batch_size=8, seed=0,
        )  # fmt: skip
    assert bundle.class_names == ["normal", "bacteria", "virus"]
    assert bundle.n_train + bundle.n_val + bundle.n_test == 19
    assert bundle.source_info["skipped"] == ["val/PNEUMONIA/readme.txt"]
    _, y = next(iter(bundle.train))
    assert y.dtype == tf.int32
    assert set(bundle.class_weight) == {0, 1, 2}


def test_folder_errors(tmp_path: Path, chest_xray_tree: Path) -> None:
    with pytest.raises(FileNotFoundError, match="data.root not found"):
        build_data(source="folder", root=tmp_path / "nothing")
    with pytest.raises(ValueError, match="data.path is for source=npz"):
        build_data(source="folder", root=chest_xray_tree, path="x.npz")


def test_hydra_configs_instantiate(chest_xray_tree: Path) -> None:
    for name in ("pneumoniamnist", "chest_xray"):
        first_line = (CONF_DATA / f"{name}.yaml").read_text().splitlines()[0]
        assert first_line.startswith("# ")
    config = OmegaConf.load(CONF_DATA / "pneumoniamnist.yaml")
    config.subset_fraction = 0.05
    bundle = hydra.utils.instantiate(config, seed=42)
    assert isinstance(bundle, DataBundle) and bundle.input_shape == (28, 28, 1)
    assert bundle.class_weight is not None

    chest = OmegaConf.load(CONF_DATA / "chest_xray.yaml")
    with pytest.raises(MissingMandatoryValue):
        hydra.utils.instantiate(chest, seed=42)
    chest.root, chest.image_size = str(chest_xray_tree), 32
    chest.augment.flip = True
    bundle = hydra.utils.instantiate(chest, seed=42)
    assert bundle.input_shape == (32, 32, 1) and bundle.n_train + bundle.n_val + bundle.n_test == 16
    x, _ = next(iter(bundle.train))
    assert x.shape[1:] == (32, 32, 1)


def test_cv_folds_redraw_train_and_val_and_leave_test_alone():
    from data.build import fold_splits

    rng = np.random.default_rng(0)
    labels = (rng.random(300) < 0.7).astype(int)
    groups = np.arange(300) // 2  # pairs of duplicates: never on both sides
    splits = {"train": np.arange(0, 200), "val": np.arange(200, 250), "test": np.arange(250, 300)}
    vals = []
    for fold in range(5):
        found = fold_splits(splits, labels, groups, 5, fold, seed=3)
        assert (found["test"] == splits["test"]).all()
        assert sorted(np.r_[found["train"], found["val"]].tolist()) == list(range(250))
        assert not set(groups[found["train"]]) & set(groups[found["val"]])
        assert abs(labels[found["val"]].mean() - labels[:250].mean()) < 0.1  # stratified
        vals.append(set(found["val"].tolist()))
    assert set().union(*vals) == set(range(250)) and sum(map(len, vals)) == 250  # a partition
    again = fold_splits(splits, labels, groups, 5, 2, seed=3)["val"]
    assert set(again.tolist()) == vals[2]  # seeded
    with pytest.raises(ValueError, match=r"data.cv_folds=5 needs k >= 2 and data.cv_fold=5"):
        fold_splits(splits, labels, groups, 5, 5, seed=3)
