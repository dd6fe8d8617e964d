"""Resumable trials: every epoch leaves a state a retried trial continues from.

Keras' ``BackupAndRestore`` keeps weights, optimizer and epoch, but not what makes a resumed
run the same run: the early-stopping and plateau callbacks' state (best value, wait counter,
best weights), the best-only checkpoint's best value, the dropout seed generators' state
(``save_weights`` leaves RNG state out), the epoch history the pruner and MLflow saw, and the
data order. So this module writes its own, one ``.npz`` file per write (temporary name, then
``os.replace``), and a copy of the best checkpoint beside it:

- every variable of the model (weights and seed-generator states) and of the optimizer
  (iterations, hence the learning-rate schedule's step; the learning rate a plateau cut);
- the epochs done, the epoch logs so far, the callbacks' state, the MLflow run id.

The data order is restored by skipping the batches already trained (``resume_data``): the
train pipeline is a pure function of its seed, and skipping runs its shuffle and augmentation
(their RNG advances exactly as in the first attempt) without training on them.

Only the last state is kept; the trial removes its folder when it ends, except when it was
killed or preempted (the retry needs it). Where the folder lives: ``hydra.sweeper.retry``.

A state never fails the trial it should save: one that cannot be read or does not fit the
run (truncated, overwritten, pickled, missing entries, a broken best-checkpoint copy, the
wrong shapes) is renamed ``<name>.damaged-<time>`` and kept, with one warning naming it and
why, and the trial starts from epoch 0 (``read_state``, ``ResumableState.adopt``). A folder
that cannot take a state costs the trial its resumability, not the trial.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import shutil
import time
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import keras
import numpy as np

from search import sweep_context
from search.tracking import tags as tag_keys

log = logging.getLogger(__name__)

STATE_FILE = "state.npz"
DAMAGED = ".damaged-"  # a damaged state set aside: <name>.damaged-<time>, kept
FORMAT = 1
RESUME_DIR_ATTR = sweep_context.RESUME_DIR_ATTR  # a retry copy inherits the user attr
# Callback attributes that a resumed fit must see as the interrupted one left them.
STATEFUL: dict[type, tuple[str, ...]] = {
    keras.callbacks.EarlyStopping: ("wait", "stopped_epoch", "best", "best_epoch"),
    keras.callbacks.ReduceLROnPlateau: ("wait", "best", "cooldown_counter"),
    keras.callbacks.ModelCheckpoint: ("best",),
}


@dataclass
class ResumePoint:
    """A state read back: ``epoch`` epochs are done."""

    epoch: int
    meta: dict[str, Any]
    arrays: dict[str, np.ndarray]
    directory: Path

    @property
    def history(self) -> dict[str, list[float]]:
        return {k: list(v) for k, v in self.meta["history"].items()}

    @property
    def run_id(self) -> str | None:
        return self.meta.get("run_id")

    @property
    def best_checkpoint(self) -> Path | None:
        name = self.meta.get("best_checkpoint")
        return self.directory / name if name else None


@dataclass
class ResumePlan:
    """Where this trial's state lives, how often it is written, and what it resumes from."""

    directory: Path
    write: bool
    every_epochs: int = 1
    point: ResumePoint | None = None
    attempts: list[int] = field(default_factory=list)

    @property
    def initial_epoch(self) -> int | None:
        return self.point.epoch if self.point is not None else None


def plan_for_trial(trial: sweep_context.SweepTrial | None, output_dir: Path,
                   config_hash: str) -> ResumePlan | None:
    """The trial's state folder (inherited from the attempt it retries) and its last state.

    None outside a sweep. ``retry.resume=false``: no state is written or read (preemption
    still stops the trial cleanly; its retry starts from epoch 0).
    """
    policy = sweep_context.retry_policy()
    if trial is None or policy is None:
        return None
    attrs = trial.trial.user_attrs
    inherited = attrs.get(RESUME_DIR_ATTR)
    if inherited:
        directory = Path(inherited)
    elif policy.get("state_dir"):
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", trial.study)
        root = Path(policy["state_dir"]).expanduser().resolve()
        directory = root / safe / f"trial-{trial.number}"
    else:
        directory = (output_dir / "resume").resolve()
    trial.trial.set_user_attr(RESUME_DIR_ATTR, str(directory))
    write = bool(policy.get("resume", True))
    plan = ResumePlan(directory, write, int(policy.get("every_epochs") or 1))
    if write and inherited:
        plan.point = read_state(directory, config_hash)
    elif write:
        _clear_way(directory)
    return plan


class DamagedState(Exception):
    """A state that cannot be resumed from: ``path`` (and ``also``) go aside for ``reason``."""

    def __init__(self, path: Path, reason: str, also: Sequence[Path] = ()) -> None:
        super().__init__(f"{path}: {reason}")
        self.path, self.reason, self.also = path, reason, tuple(also)


def read_state(directory: Path, config_hash: str) -> ResumePoint | None:
    """The last state in ``directory``; None (with the reason logged) when there is none
    usable: not reachable from this machine, written for another config, or damaged.

    A damaged state (unreadable, truncated, pickled, missing or malformed entries, a missing
    or broken best-checkpoint copy) never fails the trial: it is moved aside for inspection
    (``set_aside``) with one warning, and the trial starts again from epoch 0.
    """
    path = directory / STATE_FILE
    try:
        if _clear_way(directory):
            return None
        if not os.path.lexists(path):
            log.warning("no resumable state at %s (the attempt before saved none, or its "
                        "folder is not reachable from this machine: hydra.sweeper.retry."
                        "state_dir names one every worker can reach): the retry starts "
                        "from epoch 0", directory)
            return None
        if not path.is_file():
            raise DamagedState(path, "it is not a file")
        return _load_point(path, config_hash)
    except DamagedState as damage:
        set_aside(damage.path, damage.reason, damage.also)
    except OSError as error:  # e.g. the folder cannot be listed: set the folder aside
        set_aside(directory, f"it cannot be read ({_describe(error)})")
    return None


def _clear_way(directory: Path) -> bool:
    """Set aside a file standing where the state folder goes (a write would fail on it)."""
    if os.path.lexists(directory) and not directory.is_dir():
        set_aside(directory, "it is a file where the state folder should be")
        return True
    return False


def _load_point(path: Path, config_hash: str) -> ResumePoint | None:
    """The state in ``path`` (None: another config's); DamagedState when it is unusable."""
    arrays = _load_arrays(path)
    meta = _meta(arrays, path)
    if meta.get("format") != FORMAT or meta.get("config_hash") != config_hash:
        log.warning("the resumable state %s belongs to another config: starting from epoch 0",
                    path)
        return None
    problem = _meta_problem(meta) or _arrays_problem(meta, arrays)
    if problem:
        raise DamagedState(path, problem)
    point = ResumePoint(int(meta["epoch"]), meta, arrays, path.parent)
    _check_best_copy(point, path)
    return point


def _load_arrays(path: Path) -> dict[str, np.ndarray]:
    """Every entry of the ``.npz`` at ``path``; never a pickled object (it could run code)."""
    try:
        stored = np.load(path, allow_pickle=False)
    except Exception as error:  # noqa: BLE001 - whatever the bytes are, they are no state
        raise DamagedState(path, f"it is not a readable .npz archive ({_describe(error)})"
                           ) from error
    if not isinstance(stored, np.lib.npyio.NpzFile):
        raise DamagedState(path, "it is a single .npy array, not the state's .npz archive")
    arrays = {}
    with stored:
        for key in stored.files:
            try:
                arrays[key] = stored[key]
            except ValueError as error:
                if "allow_pickle" in str(error):
                    raise DamagedState(path, f"its entry {key!r} holds pickled Python "
                                       "objects, which are never loaded") from error
                raise DamagedState(path, f"its entry {key!r} cannot be read "
                                   f"({_describe(error)})") from error
            except Exception as error:  # noqa: BLE001 - a truncated or corrupt member
                raise DamagedState(path, f"its entry {key!r} cannot be read "
                                   f"({_describe(error)})") from error
    return arrays


def _meta(arrays: dict[str, np.ndarray], path: Path) -> dict[str, Any]:
    """The state's JSON ``meta`` entry, taken out of ``arrays``."""
    raw = arrays.pop("meta", None)
    if raw is None:
        raise DamagedState(path, "it has no 'meta' entry")
    if raw.ndim != 0 or raw.dtype.kind != "U":
        raise DamagedState(path, "its 'meta' entry is not a JSON string")
    try:
        meta = json.loads(str(raw))
    except ValueError as error:
        raise DamagedState(path, f"its 'meta' entry is not valid JSON ({error})") from error
    if not isinstance(meta, dict):
        raise DamagedState(path, "its 'meta' entry is not a JSON object")
    return meta


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_number(value: Any) -> bool:
    return (isinstance(value, int | float) and not isinstance(value, bool)) or (
        value in ("inf", "-inf", "nan"))


def _meta_problem(meta: dict[str, Any]) -> str | None:
    """What is wrong with a state's meta (None: nothing), as a phrase for the warning."""
    for key in ("epoch", "n_model", "n_opt"):
        if not _is_int(meta.get(key)):
            return f"its meta key {key!r} is {meta.get(key)!r}, not a whole number"
    history = meta.get("history")
    if not isinstance(history, dict) or not all(
            isinstance(v, list) and len(v) <= meta["epoch"] and all(
                isinstance(x, int | float) and not isinstance(x, bool) for x in v)
            for v in history.values()):
        return ("its meta key 'history' is not a map of metric names to lists of at most "
                "'epoch' numbers")
    callbacks = meta.get("callbacks")
    if not isinstance(callbacks, list) or not all(
            isinstance(s, dict) and all(v is None or _is_number(v) for v in s.values())
            for s in callbacks):
        return "its meta key 'callbacks' is not a list of callback states"
    if not isinstance(meta.get("run_id"), str | None):
        return "its meta key 'run_id' is not a string"
    best = meta.get("best_checkpoint")
    if best is not None and not (isinstance(best, str) and re.fullmatch(r"best-e\d+\.keras",
                                                                         best)):
        return f"its meta key 'best_checkpoint' is {best!r}, not a best-e<N>.keras name"
    return None


def _arrays_problem(meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> str | None:
    """A missing or non-numeric variable array (None: all there)."""
    for prefix in ("model", "opt"):
        for i in range(meta[f"n_{prefix}"]):
            key = f"{prefix}_{i}"
            if key not in arrays:
                return f"its entry {key!r} is missing"
            if arrays[key].dtype.kind not in "biuf":
                return f"its entry {key!r} is not numeric ({arrays[key].dtype})"
    return None


def _check_best_copy(point: ResumePoint, path: Path) -> None:
    """The best checkpoint's copy the state names exists and is a whole ``.keras`` archive
    (the resumed fit starts from it; a broken one would fail the trial after training)."""
    best = point.best_checkpoint
    if best is None:
        return
    if not best.is_file():
        raise DamagedState(path, f"its best-checkpoint copy {best.name} is missing")
    try:
        with zipfile.ZipFile(best) as archive:
            broken = archive.testzip()  # every member's CRC: truncation, overwrites
            names = set(archive.namelist())
    except Exception as error:  # noqa: BLE001 - whatever the bytes are, they are no model
        raise DamagedState(path, f"its best-checkpoint copy {best.name} is not a readable "
                           f".keras archive ({_describe(error)})", [best]) from error
    missing = {"config.json", "model.weights.h5"} - names
    if broken or missing:
        raise DamagedState(path, f"its best-checkpoint copy {best.name} is damaged "
                           f"({broken or ', '.join(sorted(missing))} "
                           f"{'fails its CRC' if broken else 'missing'})", [best])


def _describe(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:200]}" if text else type(error).__name__


def set_aside(path: Path, reason: str, also: Sequence[Path] = ()) -> None:
    """Rename a damaged state (and ``also``: its best copy) to ``<name>.damaged-<time>``
    beside it, kept for inspection, with one warning naming it and ``reason``."""
    stamp = time.strftime("%Y%m%dT%H%M%S")
    moved, failed = [], []
    for item in (path, *also):
        target = item.with_name(f"{item.name}{DAMAGED}{stamp}")
        n = 1
        while os.path.lexists(target):  # two in one second: never overwrite the first
            target, n = item.with_name(f"{item.name}{DAMAGED}{stamp}-{n}"), n + 1
        try:
            os.replace(item, target)
            moved.append(target.name)
        except OSError as error:
            failed.append(f"{item.name} ({_describe(error)}; remove it)")
    log.warning("the resumable state %s cannot be resumed from: %s. %s; the trial starts "
                "again from epoch 0", path, reason,
                "; ".join([*(["Moved aside to " + ", ".join(moved) + " (kept for inspection)"]
                             if moved else []),
                           *(["Could not move aside " + ", ".join(failed)] if failed else [])]))


def check_fit(point: ResumePoint, model: keras.Model,
              stateful: Sequence[keras.callbacks.Callback], max_epochs: int) -> str | None:
    """Why ``point`` cannot be restored into ``model``, its optimizer and the ``stateful``
    callbacks (None: it fits). Builds the optimizer, as the restore does."""
    if point.epoch > max_epochs:
        return f"it is after epoch {point.epoch}, beyond trainer.max_epochs={max_epochs}"
    optimizer = model.optimizer
    if not optimizer.built:
        optimizer.build(model.trainable_variables)
    for prefix, variables in (("model", model.variables), ("opt", optimizer.variables)):
        stored = point.meta[f"n_{prefix}"]
        if stored != len(variables):
            return (f"it holds {stored} {prefix} variables, this {prefix} has "
                    f"{len(variables)}")
        for i, variable in enumerate(variables):
            shape = tuple(point.arrays[f"{prefix}_{i}"].shape)
            if shape != tuple(variable.shape):
                return (f"its entry '{prefix}_{i}' has shape {shape}, this {prefix}'s "
                        f"{variable.path} has {tuple(variable.shape)}")
    states = point.meta["callbacks"]
    if len(states) != len(stateful):
        return f"it holds {len(states)} callback states, this fit has {len(stateful)}"
    weights = [tuple(w.shape) for w in model.weights]
    for i, (callback, state) in enumerate(zip(stateful, states, strict=True)):
        names = next((n for cls, n in STATEFUL.items() if isinstance(callback, cls)), ())
        if set(state) - set(names):
            return f"callback state {i} has keys {sorted(state)}, expected {list(names)}"
        best = _best_weights(point.arrays, i)
        if best and [tuple(a.shape) for a in best] != weights:
            return f"callback {i}'s best weights do not fit this model's weights"
    return None


def _best_weights(arrays: dict[str, np.ndarray], index: int) -> list[np.ndarray]:
    prefix = f"cb{index}_best_"
    keys = sorted((k for k in arrays if k.startswith(prefix)),
                  key=lambda k: int(k[len(prefix):]) if k[len(prefix):].isdigit() else -1)
    return [arrays[k] for k in keys]


def resume_data(dataset: Any, plan: ResumePlan | None, first_epoch: int,
                steps_per_epoch: int) -> Any:
    """The train dataset positioned where the resumed epoch starts (see the module note)."""
    if plan is None or plan.point is None:
        return dataset
    return dataset.skip((plan.point.epoch - first_epoch) * steps_per_epoch)


def callback_state(callbacks: Sequence[keras.callbacks.Callback]) -> tuple[list, dict]:
    """(JSON-able attrs per callback, arrays) of the callbacks' resumable state."""
    states, arrays = [], {}
    for i, callback in enumerate(callbacks):
        names = next((n for cls, n in STATEFUL.items() if isinstance(callback, cls)), ())
        states.append({n: _json_number(getattr(callback, n, None)) for n in names})
        for k, weight in enumerate(getattr(callback, "best_weights", None) or []):
            arrays[f"cb{i}_best_{k}"] = np.asarray(weight)
    return states, arrays


def restore_callbacks(callbacks: Sequence[keras.callbacks.Callback], states: list,
                      arrays: dict[str, np.ndarray]) -> None:
    for i, (callback, state) in enumerate(zip(callbacks, states, strict=True)):
        for name, value in state.items():
            setattr(callback, name, value)
        best = _best_weights(arrays, i)
        if best:
            callback.best_weights = best


def _json_number(value: Any) -> Any:
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)  # inf, nan: restored by float()
    return value


def _restore_number(value: Any) -> Any:
    return float(value) if value in ("inf", "-inf", "nan") else value


class ResumableState(keras.callbacks.Callback):
    """Writes the state after every ``every_epochs`` epochs, restores it at the start of a
    resumed fit, and ends the trial cleanly when a preemption (SIGTERM) is asked for.

    Place it after the callbacks whose state it keeps (they reset theirs in on_train_begin)
    and before the ones that report an epoch outward (MLflow, the pruner), so a state never
    lags behind what was reported (a resumed trial re-reports from its own history). After a
    preemption it stops the fit at the next epoch's start, when every callback has seen the
    finished epoch.
    """

    def __init__(self, plan: ResumePlan | None, stateful: Sequence[keras.callbacks.Callback],
                 checkpoint: Path, steps_per_epoch: int, max_epochs: int,
                 meta: dict[str, Any]) -> None:
        super().__init__()
        self.plan = plan
        self.stateful = list(stateful)
        self.checkpoint = checkpoint
        self.steps = steps_per_epoch
        self.max_epochs = max_epochs
        self.meta = meta
        self.history: dict[str, list[float]] = (plan.point.history if plan and plan.point
                                                else {})
        self.saved_epoch = plan.point.epoch if plan and plan.point else None
        self.finishing = False  # preempted: this epoch ends within the grace, then stop
        self.epoch_start = self.val_seconds = 0.0
        self.write_seconds = 0.0
        self.epoch = 0
        self.best_copy: tuple[str, str] | None = None  # (checkpoint mtime, copy's name)

    # --- restore ---------------------------------------------------------------------------

    def adopt(self, model: keras.Model) -> ResumePoint | None:
        """The plan's state if it fits ``model``, its optimizer and the callbacks; else it is
        set aside (one warning) and this fit starts from epoch 0, as if there were none.
        Called before the fit reports or restores anything of it."""
        point = self.plan.point if self.plan else None
        if point is None:
            return None
        problem = check_fit(point, model, self.stateful, self.max_epochs)
        if problem is None:
            return point
        set_aside(point.directory / STATE_FILE, f"it does not fit this run ({problem})")
        self.plan.point, self.history, self.saved_epoch = None, {}, None
        return None

    def on_train_begin(self, logs: dict | None = None) -> None:
        point = self.plan.point if self.plan else None
        if point is None:
            return
        problem = check_fit(point, self.model, self.stateful, self.max_epochs)
        if problem is not None:  # adopt() sets such a state aside before the fit
            raise ValueError(f"the resumable state {point.directory / STATE_FILE} does not "
                             f"fit this run ({problem}); remove it to start again")
        optimizer = self.model.optimizer
        for prefix, variables in (("model", self.model.variables), ("opt", optimizer.variables)):
            for i, variable in enumerate(variables):
                variable.assign(point.arrays[f"{prefix}_{i}"])
        states = [{k: _restore_number(v) for k, v in s.items()} for s in point.meta["callbacks"]]
        restore_callbacks(self.stateful, states, point.arrays)
        log.info("Resumed from %s after epoch %d", point.directory, point.epoch)

    # --- write -----------------------------------------------------------------------------

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        if self.finishing:  # the preempted epoch ended, was saved and reported: stop here
            raise sweep_context.TrialInterrupted(
                f"SIGTERM during epoch {epoch}: it finished within the grace period; the "
                f"retry resumes after epoch {self.saved_epoch or 0}")
        self.epoch, self.epoch_start = epoch, time.monotonic()

    def on_test_begin(self, logs: dict | None = None) -> None:
        self._test_start = time.monotonic()

    def on_test_end(self, logs: dict | None = None) -> None:
        self.val_seconds = time.monotonic() - getattr(self, "_test_start", time.monotonic())

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        for key, value in (logs or {}).items():
            self.history.setdefault(key, []).append(float(value))
        preempted = sweep_context.preemption_deadline() is not None
        done = epoch + 1
        due = (done % self.plan.every_epochs == 0) if self.plan else False
        last = done >= self.max_epochs and not preempted
        if self.plan is not None and self.plan.write and (due or preempted) and not last:
            start = time.monotonic()
            self.write_or_stop_writing(done)
            self.write_seconds = time.monotonic() - start
        # preempted: the next epoch's start stops the trial, once MLflow and the pruner
        # (after this callback) have the epoch; a last epoch lets the trial end normally
        self.finishing = self.finishing or preempted

    def write_or_stop_writing(self, epoch: int) -> None:
        """Write the state; a folder that cannot take it (read-only, full, a file in the way)
        costs the trial its resumability, never the trial: one warning, no more writes."""
        try:
            self.write(epoch)
        except OSError as error:
            self.plan.write = False
            with contextlib.suppress(OSError):  # what the failed write left half-written
                for partial in self.plan.directory.glob(".*.partial*"):
                    partial.unlink(missing_ok=True)
            log.warning("the resumable state cannot be written to %s (%s): the trial goes on "
                        "without one, so a kill restarts it from epoch %d; point "
                        "hydra.sweeper.retry.state_dir at a writable folder", self.plan.directory,
                        _describe(error), self.saved_epoch or 0)

    def write(self, epoch: int) -> None:
        """Write the state after ``epoch`` epochs (atomic: a kill leaves the previous one)."""
        directory = self.plan.directory
        directory.mkdir(parents=True, exist_ok=True)
        best = self._copy_best(epoch)
        states, arrays = callback_state(self.stateful)
        variables = self.model.variables
        opt_vars = self.model.optimizer.variables
        for i, v in enumerate(variables):
            arrays[f"model_{i}"] = keras.ops.convert_to_numpy(v)
        for i, v in enumerate(opt_vars):
            arrays[f"opt_{i}"] = keras.ops.convert_to_numpy(v)
        meta = {**self.meta, "format": FORMAT, "epoch": epoch, "history": self.history,
                "callbacks": states, "n_model": len(variables), "n_opt": len(opt_vars),
                "stopped": bool(self.model.stop_training), "best_checkpoint": best,
                "written": time.time()}
        arrays["meta"] = np.array(json.dumps(meta))
        partial = directory / f".{STATE_FILE}.{os.getpid()}.partial.npz"
        np.savez(partial, **arrays)
        os.replace(partial, directory / STATE_FILE)
        self.saved_epoch = epoch
        for old in directory.glob("best-e*.keras"):  # only the state's own copy stays
            if old.name != best:
                old.unlink(missing_ok=True)

    def _copy_best(self, epoch: int) -> str | None:
        """The best checkpoint's copy beside the state (a retry elsewhere needs it)."""
        if not self.checkpoint.exists():
            return None
        directory = self.plan.directory
        stamp = f"{self.checkpoint.stat().st_mtime_ns}"
        if self.best_copy is not None and self.best_copy[0] == stamp:
            return self.best_copy[1]  # no better epoch since the last copy
        name = f"best-e{epoch}.keras"
        partial = directory / f".{name}.partial"
        shutil.copyfile(self.checkpoint, partial)
        os.replace(partial, directory / name)
        self.best_copy = (stamp, name)
        return name

    # --- preemption ------------------------------------------------------------------------

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        deadline = sweep_context.preemption_deadline()
        if deadline is None or self.finishing:
            return
        now = time.monotonic()
        per_batch = (now - self.epoch_start) / (batch + 1)
        need = (self.steps - batch - 1) * per_batch + self.val_seconds + self.write_seconds
        if self.plan is not None and self.plan.write and now + 1.5 * need < deadline:
            self.finishing = True  # the epoch ends in time: on_epoch_end saves, then stops
            log.warning("SIGTERM: finishing epoch %d (about %.1f s) before stopping",
                        self.epoch + 1, need)
            return
        raise sweep_context.TrialInterrupted(
            f"SIGTERM at epoch {self.epoch + 1}, batch {batch + 1}: the epoch would not end "
            f"within the grace period (about {need:.0f} s left); the retry resumes after "
            f"epoch {self.saved_epoch or 0}")


def remove_state(plan: ResumePlan | None) -> None:
    """The trial ended (not killed, not preempted): its state is no longer needed. A damaged
    state set aside in its folder stays there for inspection (``set_aside``)."""
    if plan is None:
        return
    try:
        children = list(plan.directory.iterdir())
    except OSError:  # no folder (nothing was written), or not one: nothing of ours to remove
        return
    if not any(DAMAGED in child.name for child in children):
        shutil.rmtree(plan.directory, ignore_errors=True)
        return
    for child in children:
        if DAMAGED in child.name:
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                child.unlink()


def merged_history(callback: ResumableState | None,
                   fit_history: dict[str, list[float]]) -> dict[str, list[float]]:
    """The whole trial's epoch history: what the interrupted attempts trained, then this
    fit's epochs (the callback keeps both; without a callback, the fit's own)."""
    return callback.history if callback is not None else fit_history


def run_tags(point: ResumePoint | None) -> dict[str, str]:
    """Tags linking a resumed trial's new MLflow run to the interrupted attempt's run.

    A new run rather than the old one reopened: every Optuna trial keeps its own run (the
    interrupted one stays KILLED with its partial curve), and the new run holds the whole
    curve, the earlier epochs copied from the state (``carry_over``)."""
    if point is None:
        return {}
    return {tag_keys.RESUME_FROM_EPOCH: str(point.epoch),
            **({tag_keys.RESUME_PREVIOUS_RUN_ID: point.run_id} if point.run_id else {})}


def carry_over(point: ResumePoint, checkpoint: Path, run_id: str,
               trial: sweep_context.SweepTrial | None, prune_on: str | None,
               first_epoch: int) -> None:
    """What the resumed fit starts with besides the variables: the best checkpoint so far,
    the earlier epochs' metrics in the new MLflow run (from the state's history, so an epoch
    the interrupted attempt never logged is there too; none is logged twice), and the
    pruner's values for those epochs (the retry is a new Optuna trial: each epoch reported
    once on it)."""
    from mlflow.tracking import MlflowClient

    best = point.best_checkpoint
    if best is not None and best.is_file():
        shutil.copyfile(best, checkpoint)
    from mlflow.entities import Metric

    history = point.history
    now = int(time.time() * 1000)
    # the run is new: every earlier epoch goes in once (MLflow takes 1000 per batch)
    metrics = [Metric(key, value, now, first_epoch + i)
               for key, values in history.items() for i, value in enumerate(values)]
    for start in range(0, len(metrics), 1000):
        MlflowClient().log_batch(run_id, metrics=metrics[start:start + 1000], synchronous=True)
    if trial is not None and prune_on in history:
        for i, value in enumerate(history[prune_on]):
            trial.report(value, first_epoch + i)
