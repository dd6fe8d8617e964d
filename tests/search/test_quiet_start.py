"""TensorFlow's native start-up lines are dropped; every other line, errors included, stays."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from search.quiet_start import NO_DRIVER, NO_DRIVER_CUINIT, NOISE, filter_lines

# Real lines from TF 2.21 on a CPU machine (timestamps and pids as TF prints them).
STARTUP = """\
WARNING: All log messages before absl::InitializeLog() is called are written to STDERR
I0000 00:00:1796140756.480049   13317 port.cc:153] oneDNN custom operations are on. You may see slightly different numerical results due to floating-point round-off errors from different computation orders. To turn them off, set the environment variable `TF_ENABLE_ONEDNN_OPTS=0`.
I0000 00:00:1796140756.480384   13317 cudart_stub.cc:31] Could not find cuda drivers on your machine, GPU will not be used.
I0000 00:00:1796140756.530042   13317 cpu_feature_guard.cc:227] This TensorFlow binary is optimized to use available CPU instructions in performance-critical operations.
To enable the following instructions: AVX2 AVX512F FMA, in other operations, rebuild TensorFlow with the appropriate compiler flags.
E0000 00:00:1796140763.528145   13317 cuda_platform.cc:52] failed call to cuInit: INTERNAL: CUDA error: Failed call to cuInit: UNKNOWN ERROR (303)
"""  # noqa: E501


def test_known_startup_lines_go_and_everything_else_stays():
    other = ("/x/keras/trainer.py:74: UserWarning: something the user should see\n"
             "E0000 00:00:1.0   1 some_op.cc:9] a real native error\n"
             "Traceback (most recent call last):\n")
    kept, no_driver = filter_lines(STARTUP + other, no_driver=False)
    assert kept == other and no_driver


def test_cuinit_failure_is_kept_where_a_driver_exists():
    line = STARTUP.splitlines(keepends=True)[-1]
    assert filter_lines(line, no_driver=False)[0] == line  # a GPU box: a real error
    assert filter_lines(line, no_driver=True)[0] == ""


@pytest.mark.slow
def test_importing_tensorflow_quietly_prints_no_startup_lines_and_can_be_asked_for():
    code = ("from search.quiet_start import quiet_native_start\n"
            "with quiet_native_start():\n    import tensorflow as tf\n"
            "    tf.config.list_physical_devices('GPU')\n"
            "import sys; print('after', file=sys.stderr)\n")
    quiet = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           timeout=300)
    assert quiet.returncode == 0, quiet.stderr
    assert "absl::InitializeLog" not in quiet.stderr and "cuda drivers" not in quiet.stderr
    assert quiet.stderr.strip().endswith("after")
    loud = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, env={"XRAY_STARTUP_LOGS": "1", "PATH": "/usr/bin"})
    assert "absl::InitializeLog" in loud.stderr


def startup_lines(text: str) -> list[str]:
    """The known TF start-up lines in a command's output (cuInit's only where no driver)."""
    lines = text.splitlines()
    no_driver = any(NO_DRIVER.match(line) for line in lines)
    return [line for line in lines if any(p.match(line) for p in NOISE)
            or (no_driver and NO_DRIVER_CUINIT.match(line))]


@pytest.mark.slow
def test_pull_and_predict_print_no_startup_lines_unless_asked(registry_store, tmp_path,
                                                              chest_xray_sample_files):
    """The commands as users type them (real processes, a real store and model)."""
    from search.model_registry import registration

    registration.register_and_promote(registry_store.runs.good_run_id)
    image = chest_xray_sample_files[0]
    repo = Path(__file__).resolve().parents[2]

    def command(script: str, *args: str, loud: bool = False) -> str:
        env = {**os.environ, "XRAY_STARTUP_LOGS": "1" if loud else ""}
        done = subprocess.run([sys.executable, str(repo / "search" / script), *args],
                              capture_output=True, text=True, timeout=300, env=env)
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout + done.stderr

    folder = tmp_path / "champion"
    pulled = command("pull.py", "--out", str(folder), "--tracking-uri", registry_store.uri)
    assert "Pulled models:/pneumonia-cnn/1" in pulled and not startup_lines(pulled), pulled
    predicted = command("predict.py", str(folder), str(image), "--out", str(tmp_path / "p"))
    assert "1 prediction(s)" in predicted and not startup_lines(predicted), predicted
    # XRAY_STARTUP_LOGS=1 shows them (oneDNN's and the CPU-feature lines print everywhere)
    loud = command("predict.py", str(folder), str(image), "--out", str(tmp_path / "loud"),
                   loud=True)
    assert "1 prediction(s)" in loud and len(startup_lines(loud)) >= 2, loud
