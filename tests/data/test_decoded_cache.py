"""Decoded images kept between runs, DCT-scaled JPEG decoding, lazy reading from the cache file,
and the on-disk record of decode checks: same pixels and batches as decoding every time."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from data import decoded_cache, folder_loader, pipeline
from data.build import build_data
from data.decoded_cache import decoded_images, load_decode_checks


def _direct(paths: list[Path], size: int, channels: int) -> np.ndarray:
    return np.stack([pipeline.decode_to_uint8(tf.io.read_file(str(p)), size, channels).numpy()
                     for p in paths])


def test_cache_holds_the_pipelines_pixels_and_is_reused(tmp_path, chest_xray_sample_files,
                                                         monkeypatch):
    paths = chest_xray_sample_files[:6]
    images = decoded_images(paths, 64, 1, tmp_path)
    assert isinstance(images, np.memmap) and images.shape == (6, 64, 64, 1)
    np.testing.assert_array_equal(images, _direct(paths, 64, 1))
    assert [f.suffix for f in tmp_path.iterdir()] == [".npy"]  # no temporary left behind

    def no_decoding(*_):
        raise AssertionError("decoded again despite the cache")

    monkeypatch.setattr(decoded_cache, "_decode_into", no_decoding)
    np.testing.assert_array_equal(decoded_images(paths, 64, 1, tmp_path), images)
    # another size, or a changed file, is another key
    with pytest.raises(AssertionError, match="decoded again"):
        decoded_images(paths, 32, 1, tmp_path)
    assert decoded_cache.cache_key(paths, 64, 1) != decoded_cache.cache_key(paths[1:], 64, 1)


def test_a_changed_file_is_decoded_again(chest_xray_tree, tmp_path):
    paths = sorted(chest_xray_tree.rglob("*.jpeg"))[:3]
    before = decoded_cache.cache_key(paths, 64, 1)
    os.utime(paths[0], ns=(10**18, 10**18))
    assert decoded_cache.cache_key(paths, 64, 1) != before


def test_unwritable_folder_decodes_in_memory(tmp_path, chest_xray_sample_files, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with caplog.at_level(logging.WARNING, logger="data.decoded_cache"):
        images = decoded_images(chest_xray_sample_files[:2], 32, 1, blocker / "cache")
    assert not isinstance(images, np.memmap) and images.shape == (2, 32, 32, 1)
    assert "not writable" in caplog.text


def test_dct_scaled_decoding_stays_close_to_full_decoding(chest_xray_sample_files, monkeypatch):
    raw = tf.io.read_file(str(chest_xray_sample_files[0]))  # 1776 x 1416
    height, width, _ = tf.io.extract_jpeg_shape(raw).numpy()
    # the largest scale-down that keeps the short side at least twice the target
    assert pipeline.decode_jpeg_scaled(raw, 1, 224).shape[:2] == (height // 2, width // 2)
    assert pipeline.decode_jpeg_scaled(raw, 1, 177).shape[:2] == (height // 4, width // 4)
    assert pipeline.decode_jpeg_scaled(raw, 1, 400).shape[:2] == (height, width)
    scaled = pipeline.decode_to_uint8(raw, 224, 1).numpy().astype(int)
    monkeypatch.setattr(pipeline, "DCT_SCALING", False)
    full = pipeline.decode_to_uint8(raw, 224, 1).numpy().astype(int)
    assert np.abs(scaled - full).mean() < 1.0  # grey levels of 255


def test_folder_build_with_the_cache_gives_the_same_batches(chest_xray_tree, tmp_path,
                                                           monkeypatch):
    args = dict(source="folder", root=str(chest_xray_tree), image_size=48, channels=1,
                resplit=True, val_fraction=0.25, test_fraction=0.25, batch_size=4, seed=3)
    plain = build_data(**args)
    cached = build_data(**args, decoded_cache=str(tmp_path / "c"))
    # larger than a tiny memory budget: read row by row from the memory-mapped file
    monkeypatch.setattr("data.build.memory_budget", lambda: 1)
    lazy = build_data(**args, decoded_cache=str(tmp_path / "c"))
    assert plain.fingerprint == cached.fingerprint == lazy.fingerprint
    for name in ("val", "test"):
        want = np.concatenate([x for x, _ in getattr(plain, name).as_numpy_iterator()])
        for other in (cached, lazy):
            got = np.concatenate([x for x, _ in getattr(other, name).as_numpy_iterator()])
            np.testing.assert_array_equal(got, want)
    steps = plain.steps_per_epoch * 2  # two passes: the reshuffled second epoch too
    train = [list(d.train.take(steps).as_numpy_iterator()) for d in (plain, cached, lazy)]
    for batches in train[1:]:
        for (x, y), (x0, y0) in zip(batches, train[0], strict=True):
            np.testing.assert_array_equal(x, x0)
            np.testing.assert_array_equal(y, y0)


def test_decode_checks_are_recorded_for_new_workers(chest_xray_tree, monkeypatch):
    bad = chest_xray_tree / "val" / "NORMAL" / "truncated.jpeg"
    bad.write_bytes(next(chest_xray_tree.rglob("*.jpeg")).read_bytes()[:2000])
    paths = sorted(chest_xray_tree.rglob("*.jpeg"))
    assert folder_loader.find_undecodable(paths) == [bad]
    recorded = {key[0]: is_bad for key, is_bad in load_decode_checks().items()}
    assert recorded[str(bad)] is True and recorded[str(paths[0])] is False
    # a fresh worker: nothing in memory, the record answers without decoding
    monkeypatch.setattr(folder_loader, "_DECODE_CHECKS", {})
    monkeypatch.setattr(tf.io, "decode_jpeg", None)  # any decoding would now fail loudly
    assert folder_loader.find_undecodable(paths) == [bad]


def test_least_recently_used_files_go_when_the_folder_passes_its_budget(
        tmp_path, chest_xray_sample_files, monkeypatch):
    paths = chest_xray_sample_files[:2]
    first = decoded_images(paths, 32, 1, tmp_path)  # 2 KB each, plus the .npy header
    size = next(tmp_path.glob("*.npy")).stat().st_size
    decoded_images(paths, 33, 1, tmp_path)
    os.utime(next(p for p in tmp_path.glob("*.npy") if p.stat().st_size == size),
             (1, 1))  # the 32 px file: least recently used
    decoded_images(paths, 32, 1, tmp_path)  # a hit marks it used again
    monkeypatch.setenv("XRAY_DECODED_CACHE_GB", str(2.5 * size / 1024**3))
    decoded_images(paths, 34, 1, tmp_path)  # over budget: the 33 px file goes, not the 32 px
    left = sorted(np.load(p, mmap_mode="r").shape[1] for p in tmp_path.glob("*.npy"))
    assert left == [32, 34]
    np.testing.assert_array_equal(first, _direct(paths, 32, 1))  # an open map stays readable
