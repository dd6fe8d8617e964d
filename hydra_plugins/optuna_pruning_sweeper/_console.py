"""What a trial's worker writes to the terminal: warnings and errors, each warning once per
sweep; its INFO lines go to the trial's own log file only (`hydra.verbose` shows them).

Every trial's job logs ~8 INFO lines (data, run id, metrics...) and repeats the same warnings
(a data note, a library's deprecation) in each worker process; with 40 trials that buried the
sweep's own progress. Python's `warnings` "once" filter is per process and cannot span the
sweep's worker processes, so the warnings seen are recorded in a file of the sweep folder.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import re
import sys
from pathlib import Path

SEEN_FILE = ".warnings_seen"
# Numbers and addresses differ between repeats of one warning (`at 0x7fa...`, `trial 3`).
_VARYING = re.compile(r"0x[0-9a-fA-F]+|\d+(\.\d+)?")


def _is_console(handler: logging.Handler) -> bool:
    return (isinstance(handler, logging.StreamHandler)
            and not isinstance(handler, logging.FileHandler)
            and getattr(handler, "stream", None) in (sys.stdout, sys.stderr,
                                                     sys.__stdout__, sys.__stderr__))


class OncePerSweep(logging.Filter):
    """Drops a WARNING this sweep already showed (numbers ignored: `trial 3` = `trial 7`).

    The record still reaches the trial's log file: only the console handler is filtered.
    """

    def __init__(self, seen_file: Path) -> None:
        super().__init__()
        self.seen_file = seen_file

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno != logging.WARNING:
            return True  # errors are never dropped
        key = hashlib.sha1(_VARYING.sub("#", record.getMessage()).encode()).hexdigest()[:16]
        try:
            with open(self.seen_file, "a+") as handle:
                fcntl.flock(handle, fcntl.LOCK_EX)  # two workers may warn at once
                handle.seek(0)
                if key in handle.read().split():
                    return False
                handle.write(key + "\n")
        except OSError:
            return True  # cannot record: show it rather than lose it
        return True


def quiet_console(seen_file: str | Path, verbose: bool) -> None:
    """Inside a trial's job, after Hydra configured its logging: console handlers show
    warnings (each once per sweep, recorded in `seen_file`) and errors; INFO stays in the
    job's log file."""
    logging.captureWarnings(True)  # Python warnings through logging: deduplicated, filed
    if verbose:
        return
    once = OncePerSweep(Path(seen_file))
    for handler in logging.getLogger().handlers:
        if _is_console(handler):
            handler.setLevel(max(handler.level, logging.WARNING))
            handler.addFilter(once)
