"""A warning about the data is said once per data fingerprint, not on every run or trial."""

from __future__ import annotations

import logging
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
