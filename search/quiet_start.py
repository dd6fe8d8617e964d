"""TensorFlow's native start-up lines off the terminal, and nothing else.

TF 2.21 prints, from C++, before its log flags are read (so ``TF_CPP_MIN_LOG_LEVEL`` cannot
hide them), in every process that imports it: ``All log messages before
absl::InitializeLog()...``, oneDNN's and the CUDA stub's notes, the CPU-feature line, and on
a machine without a GPU driver ``failed call to cuInit ... (303)``. A sweep prints them once
per worker. ``quiet_native_start()`` captures the process's stderr file descriptor around the
import and the first device query, drops exactly those known lines and writes everything
else back (Python warnings and errors included, in order). ``XRAY_STARTUP_LOGS=1`` or
``hydra.verbose`` shows them all. ``start_tensorflow()`` is that start for the commands (pull,
predict, the served model, the serve request); ``search/serve.py`` filters the model server's
stream with ``filter_lines``.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
from collections.abc import Iterator

ENV = "XRAY_STARTUP_LOGS"
_NATIVE = r"^[IWE]\d{4} \S+\s+\d+ "
NO_DRIVER = re.compile(_NATIVE + r"cudart_stub\.cc:\d+\] Could not find cuda drivers on your")
NOISE = [NO_DRIVER, *(re.compile(p) for p in (
    r"^WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR",
    _NATIVE + r"port\.cc:\d+\] oneDNN custom operations are on",
    _NATIVE + r"cpu_feature_guard\.cc:\d+\] This TensorFlow binary is optimized",
    r"^To enable the following instructions: .* in other operations, rebuild TensorFlow",
))]
# Only noise where no driver is installed (the stub said so); elsewhere it is a real error.
NO_DRIVER_CUINIT = re.compile(_NATIVE + r"cuda_platform\.cc:\d+\] failed call to cuInit: .*\(303\)")


def wanted(verbose: bool = False) -> bool:
    """Whether start-up lines should be shown (``XRAY_STARTUP_LOGS=1`` or verbose)."""
    return verbose or os.environ.get(ENV, "") not in ("", "0")


def filter_lines(text: str, no_driver: bool) -> tuple[str, bool]:
    """``text`` without the known start-up lines; also whether the CUDA stub found no driver."""
    kept = []
    for line in text.splitlines(keepends=True):
        if NO_DRIVER.match(line):
            no_driver = True
        if any(p.match(line) for p in NOISE) or (no_driver and NO_DRIVER_CUINIT.match(line)):
            continue
        kept.append(line)
    return "".join(kept), no_driver


_NO_DRIVER = {"seen": False}
_STARTED = {"done": False}


@contextlib.contextmanager
def quiet_native_start(verbose: bool = False) -> Iterator[None]:
    """Capture fd 2 for the block, then write back all but the known start-up lines."""
    if wanted(verbose):
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            text, _NO_DRIVER["seen"] = filter_lines(
                capture.read().decode(errors="replace"), _NO_DRIVER["seen"])
            if text:
                sys.stderr.write(text)
                sys.stderr.flush()


def start_tensorflow(verbose: bool = False) -> None:
    """Import TensorFlow and query its devices (cuInit) quietly; later calls cost nothing.

    Call it before the first ``import keras``/``tensorflow`` of a command: whatever imports
    TF afterwards finds it started, so no start-up line reaches the terminal.
    """
    if _STARTED["done"]:
        return
    with quiet_native_start(verbose):
        import tensorflow as tf

        tf.config.list_physical_devices("GPU")
    _STARTED["done"] = True
