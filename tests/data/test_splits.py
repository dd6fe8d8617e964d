"""Splitting: patient ids, stratified group-disjoint carving, subsets, fingerprints (no TF)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import data.splits as splits_module
from data.splits import (
    SPLITS,
    assign_splits,
    assign_splits_cached,
    carve,
    groups_in_several_splits,
    image_hash_groups,
    patient_id_from_filename,
    split_fingerprint,
    stratified_subset,
)


@pytest.mark.parametrize(
    ("name", "patient"),
    [
        ("person1946_bacteria_4874.jpeg", "person1946"),
        ("person1946_bacteria_4875.jpeg", "person1946"),
        ("person1_virus_6.jpeg", "person1"),
        ("NORMAL2-IM-1427-0001.jpeg", "IM-1427"),
        ("IM-0115-0001.jpeg", "IM-0115"),
        ("NORMAL2-IM-0381-0001.jpeg", "IM-0381"),
        ("chest_xray/val/PNEUMONIA/person1952_bacteria_4883.jpeg", "person1952"),
        ("scan_0042.png", "scan_0042"),  # unknown scheme: the image is its own group
        ("personal_photo.jpeg", "personal_photo"),
    ],
)
def test_patient_id_from_filename(name: str, patient: str) -> None:
    assert patient_id_from_filename(name) == patient


def test_patient_ids_of_the_real_sample(chest_xray_sample_files: list[Path]) -> None:
    patients = [patient_id_from_filename(p.name) for p in chest_xray_sample_files]
    assert len(patients) == 16
    # 8 normal patients with one image each, 7 pneumonia patients (person1946 has two images).
    assert len(set(patients)) == 15
    assert patients.count("person1946") == 2
    assert {p for p in patients if p.startswith("IM-")} == {
        "IM-1427", "IM-1430", "IM-1431", "IM-1436", "IM-1437", "IM-1438", "IM-1440", "IM-1442"
    }  # fmt: skip


def _synthetic_names(
    rng: np.random.Generator, n_patients: int = 300
) -> tuple[list[str], list[int]]:
    """Real-looking file names: several images per patient, both normal naming schemes."""
    names, labels = [], []
    for p in range(n_patients):
        n_images = int(rng.integers(1, 6))
        kind = p % 3
        for k in range(n_images):
            if kind == 0:
                names.append(f"NORMAL2-IM-{p:04d}-{k + 1:04d}.jpeg")
                labels.append(0)
            elif kind == 1:
                cause = "bacteria" if p % 2 else "virus"
                names.append(f"person{p}_{cause}_{1000 * p + k}.jpeg")
                labels.append(1)
            else:
                names.append(f"IM-{p:04d}-{k + 1:04d}.jpeg")
                labels.append(0)
    return names, labels


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_patient_aware_split_never_straddles_on_many_names(seed: int) -> None:
    names, labels_list = _synthetic_names(np.random.default_rng(seed))
    labels = np.array(labels_list)
    groups = np.array([patient_id_from_filename(n) for n in names])
    given = np.full(len(names), "train")
    splits = assign_splits(
        labels, groups, given, resplit=True, val_fraction=0.15, test_fraction=0.15, seed=seed
    )
    assert groups_in_several_splits(splits, groups) == []
    assert sorted(np.concatenate(list(splits.values())).tolist()) == list(range(len(names)))
    overall = labels.mean()
    for name, target in (("val", 0.15), ("test", 0.15), ("train", 0.70)):
        share = len(splits[name]) / len(names)
        assert abs(share - target) < 0.05, (name, share)
        # stratified: each split keeps the overall class balance
        assert abs(labels[splits[name]].mean() - overall) < 0.06, name


@pytest.mark.parametrize("seed", range(5))
def test_patient_aware_split_on_the_real_16_files(
    chest_xray_sample_files: list[Path], seed: int
) -> None:
    names = [p.name for p in chest_xray_sample_files]
    labels = np.array([int(p.parent.name == "PNEUMONIA") for p in chest_xray_sample_files])
    groups = np.array([patient_id_from_filename(n) for n in names])
    splits = assign_splits(
        labels,
        groups,
        np.full(16, "val"),
        resplit=True,
        val_fraction=0.15,
        test_fraction=0.15,
        seed=seed,
    )
    assert groups_in_several_splits(splits, groups) == []
    for name in SPLITS:
        assert set(labels[splits[name]]) == {0, 1}, name  # every split non-empty, both classes
    twins = [i for i, n in enumerate(names) if n.startswith("person1946_")]
    assert len({s for s in SPLITS for i in twins if i in splits[s]}) == 1


def test_too_few_patients_raises_naming_the_split_and_counts() -> None:
    labels = np.array([0, 0, 1, 1])
    groups = np.array(["a", "a", "b", "b"])  # two patients cannot fill three splits
    with pytest.raises(ValueError, match=r"test split.*images / 1 groups"):
        assign_splits(
            labels, groups, np.full(4, "train"), resplit=True, val_fraction=0.2,
            test_fraction=0.2, seed=0,
        )  # fmt: skip


def test_carve_keeps_duplicate_images_together_and_stratifies() -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(400, 8, 8), dtype=np.uint8)
    images[200:260] = images[0:60]  # 60 exact duplicates, same label below
    labels = np.r_[np.zeros(150, int), np.ones(50, int), np.zeros(60, int), np.ones(140, int)]
    labels[200:260] = labels[0:60]
    groups = image_hash_groups(images)
    assert len(np.unique(groups)) == 340
    rest, test = carve(np.arange(400), labels, groups, 0.2, seed=3, name="test")
    assert groups_in_several_splits({"train": rest, "test": test}, groups) == []
    assert abs(len(test) / 400 - 0.2) < 0.03
    assert abs(labels[test].mean() - labels.mean()) < 0.05


def test_given_splits_are_kept_and_only_the_missing_one_is_carved() -> None:
    labels = np.tile([0, 1], 100)
    groups = np.array([f"g{i}" for i in range(200)])
    given = np.array(["train"] * 160 + ["val"] * 40)
    splits = assign_splits(
        labels, groups, given, resplit=False, val_fraction=0.1, test_fraction=0.25, seed=0
    )
    assert splits["val"].tolist() == list(range(160, 200))
    assert len(splits["test"]) == 40  # 25% of the 160 train images
    assert set(splits["test"]) <= set(range(160))


def test_cached_splits_equal_computed_ones_and_skip_the_carving(tmp_path, monkeypatch) -> None:
    labels = np.tile([0, 1], 100)
    groups = np.array([f"g{i}" for i in range(200)])
    given = np.array(["train"] * 160 + ["val"] * 40)
    args = dict(resplit=False, val_fraction=0.1, test_fraction=0.25, seed=3)
    expected = assign_splits(labels, groups, given, **args)
    monkeypatch.setenv("XRAY_CACHE_DIR", str(tmp_path / "cache"))
    splits_module._split_memory.cache_clear()
    carved = []
    real_carve = splits_module.carve
    monkeypatch.setattr(splits_module, "carve", lambda *a, **k: carved.append(1) or real_carve(
        *a, **k))
    try:
        first = assign_splits_cached(labels, groups, given, **args)
        second = assign_splits_cached(labels, groups, given, **args)
        other_seed = assign_splits_cached(labels, groups, given, **{**args, "seed": 4})
    finally:
        splits_module._split_memory.cache_clear()
    for name in SPLITS:
        assert first[name].tolist() == expected[name].tolist() == second[name].tolist()
    assert len(carved) == 2  # the first call and the other seed; the second came from disk
    assert other_seed["test"].tolist() != expected["test"].tolist()
    assert list((tmp_path / "cache").glob("splits-sklearn*"))


def test_resplit_pools_the_given_splits() -> None:
    labels = np.tile([0, 1], 100)
    groups = np.array([f"g{i}" for i in range(200)])
    given = np.array(["train"] * 160 + ["val"] * 40)
    splits = assign_splits(
        labels, groups, given, resplit=True, val_fraction=0.2, test_fraction=0.2, seed=0
    )
    assert [len(splits[s]) for s in SPLITS] == [120, 40, 40]
    assert splits["val"].tolist() != list(range(160, 200))


def test_zero_test_fraction_gives_an_empty_test_split() -> None:
    labels = np.tile([0, 1], 50)
    splits = assign_splits(
        labels, np.arange(100).astype(str), np.full(100, "train"), resplit=False,
        val_fraction=0.2, test_fraction=0.0, seed=0,
    )  # fmt: skip
    assert len(splits["test"]) == 0 and len(splits["val"]) == 20


@pytest.mark.parametrize(("val", "test"), [(0.0, 0.1), (0.5, 0.5), (0.1, -0.1), (1.0, 0.0)])
def test_bad_fractions_raise(val: float, test: float) -> None:
    with pytest.raises(ValueError, match="fraction"):
        assign_splits(
            np.tile([0, 1], 10), np.arange(20).astype(str), np.full(20, "train"),
            resplit=True, val_fraction=val, test_fraction=test, seed=0,
        )  # fmt: skip


def test_stratified_subset_keeps_class_shares_and_is_seeded() -> None:
    labels = np.r_[np.zeros(300, int), np.ones(100, int), np.full(3, 2)]
    idx = np.arange(len(labels))
    kept = stratified_subset(idx, labels, 0.1, seed=1)
    assert np.bincount(labels[kept]).tolist() == [30, 10, 1]  # rare class keeps one image
    assert np.array_equal(kept, stratified_subset(idx, labels, 0.1, seed=1))
    assert not np.array_equal(kept, stratified_subset(idx, labels, 0.1, seed=2))
    assert np.array_equal(stratified_subset(idx, labels, 1.0, seed=1), idx)


def test_fingerprint_depends_on_membership_and_labels() -> None:
    ids = np.array([f"train/{i}" for i in range(6)])
    labels = np.array([0, 1, 0, 1, 0, 1])
    splits = {"train": np.array([0, 1, 2, 3]), "val": np.array([4]), "test": np.array([5])}
    base = split_fingerprint("npz:x", ids, labels, splits)
    assert base == split_fingerprint("npz:x", ids, labels, dict(splits))
    moved = {"train": np.array([0, 1, 2, 4]), "val": np.array([3]), "test": np.array([5])}
    assert split_fingerprint("npz:x", ids, labels, moved) != base
    assert split_fingerprint("npz:x", ids, 1 - labels, splits) != base
    assert split_fingerprint("npz:y", ids, labels, splits) != base


def test_a_class_missing_from_a_split_stops_before_training_naming_it():
    from data.splits import check_class_coverage

    labels = np.array([0, 0, 1, 1, 2, 2, 0, 1])
    splits = {"train": np.array([0, 2, 4, 6]), "val": np.array([1, 3]),
              "test": np.array([5, 7])}
    with pytest.raises(ValueError, match=r"class\(es\) \['normal', 'virus'\] missing from "
                       r"split\(s\) \['test', 'val'\].*virus: train 1, val 0, test 1"):
        check_class_coverage(splits, labels, ["normal", "bacteria", "virus"])
    check_class_coverage({"train": np.arange(8), "val": np.arange(8),
                          "test": np.array([], dtype=int)}, labels)  # empty test: no test
