"""A single run that stops on a named error prints that one line, not a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.parametrize(("override", "expected"), [
    ("trainer.max_epochs=0", "error: trainer.max_epochs must be an integer >= 1, got 0"),
    ("tracking.uri=http://bob:Pw-9f3a@127.0.0.1:9", "error: the MLflow tracking server "
                                                     "http://bob:***@127.0.0.1:9"),
], ids=["config", "store"])
def test_a_named_error_is_one_line(tmp_path, override, expected):
    proc = subprocess.run(
        [sys.executable, str(REPO / "search" / "run.py"), "+debug=tiny", override,
         f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=REPO, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}, capture_output=True,
        text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out[-3000:]
    assert expected in out, out[-3000:]
    assert "Traceback" not in out and "HYDRA_FULL_ERROR" not in out and "Pw-9f3a" not in out
