"""A warning about the data is said once (per data fingerprint, or for the same skipped files),
not on every run or trial."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import pytest

from data import decoded_cache
from data.build import build_data


def _straddling_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno == logging.WARNING and "more than one split" in r.getMessage()]


def test_identical_images_warning_once_per_fingerprint(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("XRAY_CACHE_DIR", str(tmp_path / "cache"))
    caplog.set_level(logging.WARNING, logger="data")
    first = build_data(seed=42)  # the built-in file keeps 8 images in train and val as given
    assert [m.split(" ", 1)[0] for m in _straddling_warnings(caplog)] == ["8"]
    caplog.clear()
    again = build_data(seed=42)  # the next run, or the next dry-run trial
    assert again.fingerprint == first.fingerprint and not _straddling_warnings(caplog)
    assert again.source_info["groups_in_several_splits"] == 8  # still recorded on the run
    other = build_data(seed=7)  # other splits: said for them once
    assert other.fingerprint != first.fingerprint and len(_straddling_warnings(caplog)) == 1


def test_first_time_survives_an_unreadable_record(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XRAY_CACHE_DIR", str(tmp_path / "cache"))
    assert decoded_cache.first_time("k") and not decoded_cache.first_time("k")
    (tmp_path / "cache" / "decoded" / "warnings_said.json").write_text("{broken")
    assert decoded_cache.first_time("k")  # said again rather than lost
    assert not decoded_cache.first_time("k")


def _skipped_warnings(caught: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in caught if "not decodable images" in str(w.message)]


def test_skipped_files_warning_once_for_the_same_files(
        chest_xray_tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every run and dry-run trial builds the data again: the skipped files are named once."""
    monkeypatch.setenv("XRAY_CACHE_DIR", str(tmp_path / "cache"))
    pneumonia = chest_xray_tree / "val" / "PNEUMONIA"
    (pneumonia / "notes.txt").write_text("not an image")  # among 16 real X-rays
    build = dict(source="folder", root=chest_xray_tree, image_size=16, resplit=True,
                 val_fraction=0.25, test_fraction=0.25, batch_size=4, seed=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # Python's own once-per-place filter out of the way
        first = build_data(**build)
        again = build_data(**build)  # the next trial, in the same process
    said = _skipped_warnings(caught)
    assert len(said) == 1 and "skipped 1 file" in said[0], said
    assert "val/PNEUMONIA/notes.txt" in said[0]  # the file is still named
    assert first.source_info["skipped"] == again.source_info["skipped"] == [
        "val/PNEUMONIA/notes.txt"]  # and recorded on every run
    (pneumonia / "broken.jpeg").write_bytes(b"\xff\xd8 not a whole JPEG")  # a new bad file
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        build_data(**build)
    said = _skipped_warnings(caught)
    assert len(said) == 1 and "skipped 2 file" in said[0] and "broken.jpeg" in said[0], said
