"""Read-only files that hold for the tests' commands even when the tests run as root.

Root ignores file modes (its CAP_DAC_OVERRIDE), and the tests run as root here and in CI
containers, so a plain `chmod 444` proves nothing there. `as_ordinary_user(cmd)` starts the
command without the capabilities that bypass file permissions (dropped from its bounding set
before it starts, as `setpriv --bounding-set=-dac_override,...` does): modes then hold for it
as for any user. Needs CAP_SETPCAP, which root has in a default container; the `ordinary_user`
fixture skips, saying why, where it is missing. A non-root user needs nothing.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

# CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER (linux/capability.h); PR_CAPBSET_DROP = 24
_DROP_AND_EXEC = """
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
for cap in (1, 2, 3):
    if libc.prctl(24, cap, 0, 0, 0) != 0:
        sys.exit(f"cannot drop capability {cap}: errno {ctypes.get_errno()}")
os.execv(sys.argv[1], sys.argv[1:])
"""


def as_ordinary_user(cmd: list[str]) -> list[str]:
    """`cmd` run so that file modes hold for it (unchanged for a non-root user)."""
    if os.geteuid() != 0:
        return cmd
    return [sys.executable, "-c", _DROP_AND_EXEC, *cmd]


def make_read_only(*paths: Path) -> None:
    """chmod a-w: 444 for a file, 555 for a folder."""
    for path in paths:
        mode = path.stat().st_mode
        path.chmod(mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))


@pytest.fixture
def ordinary_user(tmp_path: Path) -> Iterator[None]:
    """Skip unless a read-only file refuses a write from `as_ordinary_user`; give write
    permission back to everything under tmp_path afterwards (pytest removes it)."""
    probe = tmp_path / "read-only-probe"
    probe.write_text("")
    make_read_only(probe)
    tried = subprocess.run(as_ordinary_user(
        [sys.executable, "-c", f"open({str(probe)!r}, 'a')"]), capture_output=True, text=True)
    probe.unlink()
    if tried.returncode == 0:
        pytest.skip("a read-only file stays writable for this user here (root whose "
                    "capabilities cannot be dropped: no CAP_SETPCAP)")
    if "PermissionError" not in tried.stderr:
        pytest.skip(f"cannot run a command as an ordinary user here: {tried.stderr[-300:]}")
    yield
    for folder, _, _ in os.walk(tmp_path):
        Path(folder).chmod(Path(folder).stat().st_mode | stat.S_IWUSR)
