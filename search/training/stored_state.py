"""A stored resumable state read back and checked: unreadable, truncated, mismatched or
ill-fitting states are set aside (kept as `<name>.damaged-<time>`) so the trial starts from
epoch 0. Writing the state and using it in a fit is `search.training.resume`."""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np

from search import sweep_context
from search.model_registry.model_store import keras_archive_problem

log = logging.getLogger("search.training.resume")  # its lines read as resume's

STATE_FILE = "state.npz"
# a damaged state set aside: <name>.damaged-<time>, kept (the sweeper keeps it too)
DAMAGED = sweep_context.SET_ASIDE_MARK
FORMAT = 1
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
    problem = keras_archive_problem(best)
    if problem:
        raise DamagedState(path, f"its best-checkpoint copy {best.name} is {problem}", [best])


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
    kept = (" (kept for inspection: neither the trial's end nor the sweeper removes it; "
            "delete it when done)")
    log.warning("the resumable state %s cannot be resumed from: %s. %s; the trial starts "
                "again from epoch 0", path, reason,
                "; ".join([*(["Moved aside to " + ", ".join(moved) + kept] if moved else []),
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


