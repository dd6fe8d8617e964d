"""Progress of a sweep: a line when a trial starts, one when it ends (state, value, best),
and one live status (done/total, running, pruned, failed, best so far, elapsed, ETA, time
left before the timeout): a tqdm bar under the log lines on a terminal, and at the end of
each trial's line (CI logs, files).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ._study import count_toward_budget
from ._warm_start import own_best

if TYPE_CHECKING:
    import optuna
    from optuna.trial import FrozenTrial

    from ._worker import TrialOutcome

# Named as before the module went private, so its log lines read as they did.
log = logging.getLogger(__name__.replace("._", "."))

PARAMS_SHOWN = 140  # characters of params on a trial's start line


def trial_started(
    number: int, slot: int, gpu: str | None, params: dict[str, Any], elapsed: float
) -> None:
    """``[trial N] started slot S [gpu G] | params | elapsed``."""
    shown = " ".join(f"{k}={_fmt(v)}" for k, v in params.items())
    if len(shown) > PARAMS_SHOWN:  # all of them are in the trial's overrides and its run
        shown = shown[:PARAMS_SHOWN].rsplit(" ", 1)[0] + f" … ({len(params)} params)"
    log.info(
        "[trial %d] started  slot %d%s | %s | elapsed %s",
        number,
        slot,
        f" gpu {gpu}" if gpu is not None else "",
        shown,
        _hms(elapsed),
    )


def trial_finished(o: TrialOutcome, trials: Sequence[FrozenTrial], status: str) -> None:
    """``[trial N] STATE value | duration | status | reason`` (status: `status_text`)."""
    if o.values is not None:
        value = " ".join(f"{v:.6g}" for v in o.values)
    elif o.state == "PRUNED":
        t = next((t for t in trials if t.number == o.number), None)
        value = f"{t.value:.6g} (last report)" if t is not None and t.value is not None else "-"
    else:
        value = "-"
    reason = f" | {o.reason[:200]}" if o.reason else ""
    log.info("[trial %d] %-8s value %s | %.1fs | %s%s", o.number, o.state, value,
             o.duration_s, status, reason)


def best_text(trials: Sequence[FrozenTrial], study: optuna.Study) -> str:
    """The best value so far (or the Pareto front's size), "-" before any COMPLETE trial."""
    best_trials = own_best(trials, study.directions)  # never a warm-start copy
    if not best_trials:
        return "-"
    if len(study.directions) > 1:
        return f"pareto front of {len(best_trials)}"
    best = best_trials[0]
    return f"{best.value:.6g} (#{best.number})"


def _hms(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}"


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def finished_counted(trials: Sequence[FrozenTrial]) -> int:
    """Trials that used up the budget and ended (running ones are not done yet)."""
    return count_toward_budget([t for t in trials if t.state.is_finished()])


def status_text(trials: Sequence[FrozenTrial], study: optuna.Study, n_trials: int,
                elapsed: float, finished_here: int, timeout: float | None) -> str:
    """``done 12/40 · running 2 · pruned 5 · failed 1 · best … · elapsed … · ETA … · …``.

    ETA: this session's wall time per finished trial (slots included) times what is left.
    """
    done = finished_counted(trials)
    states = [t.state.name for t in trials]
    parts = [f"done {done}/{n_trials}", f"running {states.count('RUNNING')}",
             f"pruned {states.count('PRUNED')}", f"failed {states.count('FAIL')}",
             f"best {best_text(trials, study)}", f"elapsed {_hms(elapsed)}"]
    left = max(n_trials - done, 0)
    if finished_here and left:
        parts.append(f"ETA {_hms(elapsed / finished_here * left)}")
    if timeout:
        parts.append(f"timeout in {_hms(timeout - elapsed)}" if elapsed < timeout
                     else "timeout passed: no new trials")
    return " · ".join(parts)


class LiveView:
    """The sweep's status: a tqdm bar on a terminal (log lines print above it); elsewhere
    each trial's end line carries it. `XRAY_PLAIN_PROGRESS=1` forces plain lines."""

    def __init__(self, n_trials: int, done: int = 0) -> None:
        self.bar = None
        self._redirect: contextlib.AbstractContextManager | None = None
        if sys.stderr.isatty() and not os.environ.get("XRAY_PLAIN_PROGRESS"):
            # only on a terminal; tqdm comes with Optuna (not a dependency of ours)
            from tqdm import tqdm
            from tqdm.contrib.logging import logging_redirect_tqdm

            self.bar = tqdm(total=n_trials, initial=done, unit="trial", dynamic_ncols=True,
                            file=sys.stderr, bar_format="{l_bar}{bar}| {postfix}")
            self._redirect = logging_redirect_tqdm()
            self._redirect.__enter__()

    def update(self, text: str, done: int) -> None:
        if self.bar is None:
            return  # plain output: the status ends each trial's line
        self.bar.n = done
        self.bar.set_postfix_str(text, refresh=True)

    def close(self) -> None:
        if self._redirect is not None:
            self._redirect.__exit__(None, None, None)
        if self.bar is not None:
            self.bar.close()
