"""The sweep's live status and the console of its workers (real Optuna study, real tqdm on a
pseudo-terminal, real logging handlers)."""

from __future__ import annotations

import fcntl
import logging
import os
import select
import struct
import sys
import termios

import optuna

from hydra_plugins.optuna_pruning_sweeper import _console as console
from hydra_plugins.optuna_pruning_sweeper import _progress as progress


def study_with(states: list[str]) -> optuna.Study:
    study = optuna.create_study(direction="minimize")
    for i, state in enumerate(states):
        trial = study.ask()
        if state == "COMPLETE":
            study.tell(trial, 1.0 / (i + 1))
        elif state != "RUNNING":
            study.tell(trial, state=getattr(optuna.trial.TrialState, state))
    return study


def test_status_counts_only_finished_trials_as_done_and_gives_eta_and_timeout():
    study = study_with(["COMPLETE", "PRUNED", "FAIL", "COMPLETE", "RUNNING", "RUNNING"])
    text = progress.status_text(study.trials, study, 10, elapsed=120.0, finished_here=4,
                                timeout=300.0)
    # 3 done (the FAIL counts against the budget, running ones are not done yet)
    assert text.startswith("done 4/10 · running 2 · pruned 1 · failed 1 · best 0.25 (#3)")
    assert "elapsed 0:02:00" in text
    assert "ETA 0:03:00" in text  # 30 s per finished trial, 6 left
    assert "timeout in 0:03:00" in text
    late = progress.status_text(study.trials, study, 10, 400.0, 4, 300.0)
    assert "timeout passed: no new trials" in late
    assert "timeout" not in progress.status_text(study.trials, study, 10, 5.0, 4, None)


def test_start_line_keeps_params_short(caplog):
    params = {f"model.layer_{i}_units": 128 * i for i in range(30)}
    with caplog.at_level(logging.INFO):
        progress.trial_started(3, 0, None, params, 1.0)
    line = caplog.records[-1].getMessage()
    assert len(line) < progress.PARAMS_SHOWN + 80 and "… (30 params)" in line


def read_all(master: int) -> str:
    """Everything written so far: Linux hands pty output to the reader asynchronously, so
    one read can return only the first of several writes (it did once in CI)."""
    chunks = b""
    while select.select([master], [], [], 1.0)[0]:
        chunks += os.read(master, 65536)
    return chunks.decode(errors="replace")


def test_a_terminal_gets_a_live_bar_with_the_status(monkeypatch):
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 200, 0, 0))
    tty = os.fdopen(slave, "w")
    monkeypatch.setattr(sys, "stderr", tty)
    monkeypatch.delenv("XRAY_PLAIN_PROGRESS", raising=False)
    view = progress.LiveView(40)
    assert view.bar is not None
    view.update("done 3/40 · running 2 · best 0.076 (#2)", 3)
    view.close()
    tty.flush()
    shown = read_all(master)
    assert "running 2 · best 0.076 (#2)" in shown and "8%" in shown
    with open(os.devnull, "w") as pipe:  # stderr that is no terminal (CI logs): no bar
        monkeypatch.setattr(sys, "stderr", pipe)
        assert progress.LiveView(40).bar is None


def test_worker_console_shows_each_warning_once_per_sweep_and_every_error(tmp_path):
    seen = tmp_path / ".warnings_seen.1"
    records: list[str] = []

    class Collect(logging.StreamHandler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.INFO)  # as Hydra's job logging sets it
    for attempt in range(2):  # two trials (two worker processes share the file)
        handler = Collect(sys.stderr)
        root.addHandler(handler)
        try:
            console.quiet_console(seen, verbose=False)
            log = logging.getLogger("search.training.trainer")
            log.info("Loading data (npz)")
            log.warning("found 12 duplicate images in split %d", attempt)
            log.error("trial failed: NaN loss")
        finally:
            root.removeHandler(handler)
            logging.captureWarnings(False)
    assert records == ["found 12 duplicate images in split 0", "trial failed: NaN loss",
                       "trial failed: NaN loss"]
    verbose: list[str] = []
    handler = Collect(sys.stderr)
    handler.emit = lambda record: verbose.append(record.getMessage())
    root.addHandler(handler)
    try:
        console.quiet_console(seen, verbose=True)
        logging.getLogger("search.training.trainer").info("Loading data (npz)")
    finally:
        root.removeHandler(handler)
        logging.captureWarnings(False)
    root.setLevel(level)
    assert verbose == ["Loading data (npz)"]
