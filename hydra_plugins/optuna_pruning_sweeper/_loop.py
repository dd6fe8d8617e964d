"""The slot loop: keeps every slot busy, watches the limits, finds stale trials, reports.

Decides (Optuna, in this process) and runs (an executor's slots, see ``_executors``) stay
apart: the loop asks a trial under the ask lock and samples its params here; the executor
runs the job and the worker tells the final state (see ``_worker``).

Stale trials: at start and every ``heartbeat_interval`` seconds the loop runs
``optuna.storages.fail_stale_trials``: a RUNNING trial whose heartbeat stopped for
``grace_period`` seconds (its sweeper or machine died) becomes FAIL and a WAITING copy with
the same params is queued (up to ``max_retry`` times). A loop that has nothing left to
ask but sees other processes' RUNNING trials waits up to ``grace_period + 2 *
heartbeat_interval`` seconds for them to turn stale, so a re-run right after a crash ends
with the crashed trial retried and exactly ``n_trials`` counted (a live trial outlasts the
wait; its own sweeper finishes it). Ctrl-C: workers tell their trials FAIL and queue a
retry, so re-running the same command continues without losing or repeating a trial.

Own trials beat from a thread of their own (as Optuna's ``optimize`` does), not from the loop:
a loop blocked behind another sweeper's ask lock, or replacing a worker process, must not
let the trial it just asked (whose worker is still starting) turn stale under a short grace.

Optuna is imported inside the functions: the public ``sweeper`` imports this module at
Hydra's plugin scan, in every Hydra process, and a plain run should not pay for Optuna.
"""

import collections
import contextlib
import dataclasses
import logging
import math
import os
import signal
import threading
import time
import warnings
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, OmegaConf

from . import _preemption as preemption
from . import _progress as progress
from . import _worker as worker
from . import trial_context as tc
from ._conditions import ConditionResolver, sample_trial
from ._distributions import config_key, format_override
from ._executors import TrialExecutor
from ._hooks import extend_trial
from ._storage import AskLock, redact
from ._study import OVERRIDES_ATTR, ask_within_budget, count_toward_budget
from ._warm_start import own_trials
from .config import OptunaPruningSweeperConf

if TYPE_CHECKING:
    import optuna

    from ._keras_tuner_engine import KerasTunerEngine, Proposal

# Named as before the module went private, so its log lines read as they did.
log = logging.getLogger(__name__.replace("._", "."))


def retry_settings(conf: OptunaPruningSweeperConf) -> dict[str, Any]:
    """``hydra.sweeper.retry`` as a plain dict (a dataclass, or a DictConfig from Hydra)."""
    retry = getattr(conf, "retry", None)
    if retry is None:
        return {}
    if dataclasses.is_dataclass(retry):
        return dataclasses.asdict(retry)
    return dict(OmegaConf.to_container(retry, resolve=True))


def remove_state_dir(folder: Path, number: int) -> None:
    """Remove the resumable-state folder of a trial that will not be retried, keeping the
    damaged states its attempts set aside: nothing else says why the trial started again."""
    kept = tc.remove_state_folder(folder)
    if kept:
        log.info("trial %d is not retried: its resumable state is removed; the damaged "
                 "state(s) set aside stay in %s for inspection: %s", number, folder,
                 ", ".join(kept))


@dataclass
class _InFlight:
    trial_id: int
    number: int
    slot: int
    started: float


class SweepLoop:
    """Keeps every slot busy: a new trial is submitted as soon as any slot frees."""

    def __init__(
        self,
        conf: OptunaPruningSweeperConf,
        study: "optuna.Study",
        storage: "optuna.storages.RDBStorage",
        lock: AskLock,
        resolver: ConditionResolver,
        executor: TrialExecutor,
        t0: float,
        config: "DictConfig | None" = None,
        custom: "Callable[..., Any] | None" = None,
        engine: "KerasTunerEngine | None" = None,
    ) -> None:
        self.conf = conf
        self.study = study
        self.storage = storage
        self.lock = lock
        self.resolver = resolver
        self.executor = executor
        self.t0 = t0
        self.config = config  # passed to the custom_search_space hook
        self.custom = custom
        self.engine = engine  # keras-tuner's oracle chooses the values (engine=keras_tuner)
        self.in_flight: dict[Future, _InFlight] = {}
        self.view: progress.LiveView | None = None  # run() opens it
        self.outcomes: list[worker.TrialOutcome] = []
        self.interrupted = False  # SIGTERM: no new trials, running ones save and stop
        self.count_attempts = retry_settings(conf).get("count") == "attempts"
        self.min_finished = (
            conf.failure_rate_min_trials
            if conf.failure_rate_min_trials is not None
            else max(3, conf.n_jobs)
        )

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def run(self) -> str:
        """Run until the budget is used, the timeout passes or failures exceed the limit."""
        self.view = progress.LiveView(self.conf.n_trials)
        previous = self._catch_sigterm()
        stop = threading.Event()
        if self.conf.heartbeat_interval:
            threading.Thread(target=self._beat_own, args=(self.conf.heartbeat_interval, stop),
                             name="sweeper-heartbeat", daemon=True).start()
        try:
            return self._run()
        except KeyboardInterrupt:
            log.warning(
                "Interrupted: waiting for %d running trial(s) to be told FAIL and re-queued "
                "(re-run the same command to continue the study).",
                len(self.in_flight),
            )
            raise
        finally:
            stop.set()
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
            self.view.close()
            self.executor.shutdown()

    def _catch_sigterm(self) -> "Any":
        """SIGTERM (a preemption): stop asking, relay it to the workers, wait for them to
        save and stop; a second one ends this process at once. Returns the old handler."""
        if threading.current_thread() is not threading.main_thread():
            return None

        def on_term(signum: int, frame: object) -> None:
            if self.interrupted:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                os.kill(os.getpid(), signal.SIGTERM)
                return
            self.interrupted = True
            log.warning("SIGTERM: no new trials; %d running trial(s) save their state and "
                        "stop (re-run the same command to resume them)", len(self.in_flight))
            self.executor.signal_workers(preemption.FORWARDED)

        return signal.signal(signal.SIGTERM, on_term)

    def _run(self) -> str:
        conf = self.conf
        free = list(range(conf.n_jobs))
        stop_reason: str | None = None
        last_stale_check = -math.inf
        idle_since: float | None = None
        poll = 1.0
        while True:
            beat = conf.heartbeat_interval
            if beat and time.monotonic() - last_stale_check >= min(beat, 10):
                self._fail_stale()
                last_stale_check = time.monotonic()
            if stop_reason is None and self.interrupted:
                stop_reason = "interrupted"
            if stop_reason is None:
                stop_reason = self._limit_reached()
            while free and stop_reason is None:
                proposal = None
                if self.engine is not None:
                    proposal = self._propose(free[0])
                    if proposal in ("idle", "budget"):  # idle: Hyperband awaits its round
                        break
                    if proposal == "stopped":
                        stop_reason = "keras_tuner"
                        log.info("keras-tuner's oracle has no more trials.")
                        break
                trial = ask_within_budget(
                    self.study, self.storage, self.lock, conf.n_trials, conf.heartbeat_interval,
                    attempts=self.count_attempts,
                )
                if trial is None:
                    if proposal is not None:  # asked of the oracle, never run
                        self.engine.abandon(proposal, "not run: the study reached n_trials")
                    break
                self._submit(trial, free.pop(0), proposal)
            if not self.in_flight:
                if stop_reason is not None:
                    return stop_reason
                if beat and self._foreign_running():
                    # Another process's trial may be dead: it turns stale within the grace
                    # period and is re-queued for us. A live one outlasts this wait.
                    idle_since = time.monotonic() if idle_since is None else idle_since
                    grace = conf.grace_period or 2 * beat
                    if time.monotonic() - idle_since <= grace + 2 * beat:
                        time.sleep(min(beat, 2))
                        continue
                return "n_trials"
            idle_since = None
            done, _ = wait(list(self.in_flight), timeout=poll, return_when=FIRST_COMPLETED)
            for fut in done:
                info = self.in_flight.pop(fut)
                self._collect(fut, info)
                free.append(info.slot)
            free.sort()

    def _limit_reached(self) -> str | None:
        if self.conf.timeout is not None and self.elapsed() >= self.conf.timeout:
            log.info("Timeout of %ss reached: no new trials.", self.conf.timeout)
            return "timeout"
        budget = self.conf.max_epochs_total
        if budget is not None and self.epochs_spent() >= budget:
            log.info("Epoch budget of %d reached: no new trials.", budget)
            return "epoch_budget"
        # an interrupted trial (preempted) is neither a failure nor finished
        finished = sum(1 for o in self.outcomes if o.state != "INTERRUPTED")
        fails = sum(1 for o in self.outcomes if o.state == "FAIL")
        if finished >= self.min_finished and fails / finished > self.conf.max_failure_rate:
            log.error(self.failure_message())
            return "failure_rate"
        return None

    def epochs_spent(self) -> int:
        """Epochs the study's trials trained: one per reported intermediate value."""
        # warm-start copies trained in another study: not this study's epochs
        trials = own_trials(self.storage.get_all_trials(self.study._study_id, deepcopy=False))
        # a resumed retry carries its earlier epochs' values: count those epochs once
        carried = sum(int(t.user_attrs.get("resumed_from_epoch") or 0) for t in trials)
        return sum(len(t.intermediate_values) for t in trials) - carried

    def failure_message(self) -> str:
        finished = len(self.outcomes)
        fails = [o for o in self.outcomes if o.state == "FAIL"]
        reasons = collections.Counter(o.reason or "?" for o in fails).most_common(3)
        listed = "\n".join(f"  {n}x {r[:300]}" for r, n in reasons)
        return (
            f"Sweep stopped: {len(fails)} of {finished} finished trials failed "
            f"({len(fails) / max(finished, 1):.0%} > max_failure_rate "
            f"{self.conf.max_failure_rate:.0%}) in study '{self.study.study_name}'. "
            f"Most common fail reasons:\n{listed}\n"
            "Fix the cause (see each trial's log in the sweep dir), or raise "
            "hydra.sweeper.max_failure_rate."
        )

    def _propose(self, slot: int) -> "Proposal | str":
        """The oracle's next trial, queued in the study so the next ask returns it."""
        if count_toward_budget(self.storage.get_all_trials(self.study._study_id, deepcopy=False),
                               attempts=self.count_attempts) >= self.conf.n_trials:
            return "budget"  # n_trials reached: never ask the oracle for a trial not run
        proposal = self.engine.propose(slot)
        if not isinstance(proposal, str):
            self.study.enqueue_trial(proposal.params, user_attrs=proposal.attrs)
        return proposal

    def _submit(self, trial: "optuna.trial.Trial", slot: int,
                proposal: "Proposal | None" = None) -> None:
        try:
            params, lines = sample_trial(trial, self.resolver)
            if proposal is not None:
                lines = self._engine_lines(trial, proposal, params, lines)
            extra = extend_trial(
                self.custom, self.config, trial, params, set(self.resolver.space.fixed)
            )
            params = {**params, **extra}
            lines = lines + [format_override(k, v) for k, v in extra.items()]
        except Exception as e:
            info = _InFlight(trial._trial_id, trial.number, slot, time.monotonic())
            self._tell_fail(info, f"sampling failed: {type(e).__name__}: {e}")
            raise
        trial.set_user_attr(OVERRIDES_ATTR, lines)
        task = worker.TrialTask(trial_id=trial._trial_id, number=trial.number, overrides=lines)
        fut = self.executor.submit(slot, task)
        self.in_flight[fut] = _InFlight(trial._trial_id, trial.number, slot, time.monotonic())
        progress.trial_started(
            trial.number, slot, self.executor.gpu_of(slot), params, self.elapsed()
        )
        if self.view is not None and self.view.bar is not None:  # the bar shows it running
            self._show(self.storage.get_all_trials(self.study._study_id, deepcopy=False))

    def _engine_lines(self, trial: "optuna.trial.Trial", proposal: "Proposal",
                      params: dict[str, Any], lines: list[str]) -> list[str]:
        """The trial's lines with the engine's own (epochs, continuation) replacing any fixed
        line for the same key."""
        if params != proposal.params:  # the same conditional rule on both sides
            log.warning("trial %d: keras-tuner proposed %s, the space sampled %s",
                        trial.number, proposal.params, params)
        self.engine.started(proposal, trial.number)
        own = {config_key(line.split("=", 1)[0]) for line in proposal.lines}
        kept = [line for line in lines if config_key(line.split("=", 1)[0]) not in own]
        return kept + proposal.lines

    def _show(self, trials: "list[optuna.trial.FrozenTrial]") -> str:
        """The sweep's status, shown on the live view; returned for the trial's end line."""
        text = progress.status_text(trials, self.study, self.conf.n_trials, self.elapsed(),
                                    len(self.outcomes), self.conf.timeout)
        if self.view is not None:
            self.view.update(text, progress.finished_counted(trials))
        return text

    def _collect(self, fut: Future, info: _InFlight) -> None:
        try:
            outcome: worker.TrialOutcome = fut.result()
        except BaseException as e:  # noqa: BLE001 - the worker could not tell: tell here
            reason, retry = self.executor.failure(info.slot, e)
            untold = self._still_running(info)  # False: the worker told its state, then died
            # preempted: the sweeper got SIGTERM, or the worker's grace period ran out
            interrupted = retry and (self.interrupted or "preempted" in reason)
            if interrupted:
                with contextlib.suppress(Exception):
                    self.storage.set_trial_user_attr(info.trial_id, "interrupted", reason)
            self._tell_fail(info, reason)
            if retry and untold and self._requeue(info, interrupted):
                reason += "; re-queued with the same params"
            outcome = worker.TrialOutcome(
                number=info.number,
                state="INTERRUPTED" if interrupted else "FAIL",
                values=None,
                reason=reason,
                duration_s=time.monotonic() - info.started,
                pid=-1,
            )
        self.outcomes.append(outcome)
        if outcome.state == "INTERRUPTED":  # that worker was told to stop: a new one follows
            self.executor.retire(info.slot)
        if self.engine is not None:
            self.engine.finish(outcome.number, "FAIL" if outcome.state == "INTERRUPTED"
                               else outcome.state, outcome.values, outcome.reason)
        trials = self.storage.get_all_trials(self.study._study_id, deepcopy=False)
        progress.trial_finished(outcome, trials, self._show(trials))

    def _still_running(self, info: _InFlight) -> bool:
        try:
            return self.storage.get_trial(info.trial_id).state.name == "RUNNING"
        except Exception:  # noqa: BLE001 - storage trouble: treat as not told
            return True

    def _requeue(self, info: _InFlight, interrupted: bool = False) -> bool:
        """Queue a retry of a trial whose worker died (the stale-trial policy, max_retry; a
        preemption never uses up a restart). Without a retry its resumable state goes."""
        try:
            failed = self.storage.get_trial(info.trial_id)
            queued = worker.requeue_trial(self.study, failed,
                                          None if interrupted else self.conf.max_retry)
            state_dir = failed.user_attrs.get(tc.RESUME_DIR_ATTR)
            if not queued and state_dir:
                remove_state_dir(Path(state_dir), info.number)
            return queued
        except Exception:  # noqa: BLE001 - the FAIL stands; the sweep goes on
            log.exception("Could not re-queue trial %d", info.number)
            return False

    def _tell_fail(self, info: _InFlight, reason: str) -> None:
        from optuna.trial import TrialState

        with contextlib.suppress(Exception):
            self.storage.set_trial_user_attr(info.trial_id, "fail_reason", redact(reason))
        try:
            self.study.tell(info.number, state=TrialState.FAIL, skip_if_finished=True)
        except Exception:  # noqa: BLE001 - storage trouble: stale detection will fail it
            log.exception("Could not tell trial %d as FAIL", info.number)

    def _fail_stale(self) -> None:
        import optuna

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            try:
                optuna.storages.fail_stale_trials(self.study)
            except Exception:  # noqa: BLE001 - retried next interval
                log.warning("fail_stale_trials failed", exc_info=True)

    def _beat_own(self, interval: float, stop: threading.Event) -> None:
        """Beat for own trials too (covers a worker still starting up), until ``stop``."""
        infos: tuple[_InFlight, ...] = ()
        while not stop.wait(min(interval, 10) / 2):
            with contextlib.suppress(RuntimeError):  # in_flight changed while copied: next
                infos = tuple(self.in_flight.values())
            for info in infos:
                with contextlib.suppress(Exception):
                    self.storage.record_heartbeat(info.trial_id)

    def _foreign_running(self) -> bool:
        from optuna.trial import TrialState

        own = {i.trial_id for i in self.in_flight.values()}
        trials = self.storage.get_all_trials(
            self.study._study_id, deepcopy=False, states=(TrialState.RUNNING,)
        )
        return any(t._trial_id not in own for t in trials)
