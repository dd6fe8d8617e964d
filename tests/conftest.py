"""Shared pytest fixtures. Keep one section per package; tests compose configs with compose()."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

# ----------------------------------------------------------------------------------------------
# data: the real shared files (skipped cleanly where the shared folder is absent) and small npz
# files written per test.
# ----------------------------------------------------------------------------------------------

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
CHEST_XRAY_SAMPLE = SHARED_DATA / "chest_xray_sample"


@pytest.fixture(scope="session")
def chest_xray_sample_files() -> list[Path]:
    """The 16 real JPEGs of chest_xray/val/{NORMAL,PNEUMONIA} (skips if not available)."""
    files = sorted(CHEST_XRAY_SAMPLE.glob("val/*/*.jpeg"))
    if not files:
        pytest.skip(f"real chest X-ray sample not found under {CHEST_XRAY_SAMPLE}")
    return files


@pytest.fixture
def chest_xray_tree(tmp_path: Path, chest_xray_sample_files: list[Path]) -> Path:
    """A writable copy of the sample: tmp/chest_xray/val/{NORMAL,PNEUMONIA}/*.jpeg; returns root."""
    root = tmp_path / "chest_xray"
    for source in chest_xray_sample_files:
        target = root / "val" / source.parent.name / source.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
    return root


@pytest.fixture
def make_npz(tmp_path: Path) -> Callable[..., Path]:
    """Factory writing a MedMNIST-layout npz in tmp: ``make_npz(train_images=..., ...) -> path``."""
    counter = iter(range(1_000_000))

    def write(**arrays: np.ndarray) -> Path:
        path = tmp_path / f"data_{next(counter)}.npz"
        np.savez(path, **arrays)
        return path

    return write
