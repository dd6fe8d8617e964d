"""A damaged resumable state never costs the trial it should save (issue 27, item 4).

One trial of a real sweep (real CLI, Optuna and MLflow stores, PneumoniaMNIST) is SIGKILLed
through `search.faults`' ``mid_epoch`` point after its first epoch's state is written. Its
real state (``state.npz`` and the best-checkpoint copy beside it) is then damaged in many
ways, each read back in process (cheap), and two damages are re-run for real: a truncated
file (refused when read) and arrays whose shapes do not fit the model (refused before the
fit restores them). Every time the state is renamed ``<name>.damaged-<time>`` and kept, one
warning names it and why, and the retry trains from epoch 0 and completes.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import optuna
import pytest
from mlflow.tracking import MlflowClient

from hydra_plugins.optuna_pruning_sweeper._study import count_toward_budget
from search.training import resume
from tests.faults.invariants import fault_env

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow

EPOCHS = 3
STUDY = "damaged-resume"


def command(tmp: Path, stores: str, sweep: str) -> list[str]:
    return [
        sys.executable, str(REPO / "search" / "run.py"), "-m",
        f"hydra.sweep.dir={tmp / sweep}",
        f"hydra.sweeper.storage=sqlite:///{tmp / stores / 'optuna.db'}",
        "tracking.artifact_root=" + (tmp / "artifacts").as_uri(),
        f"tracking.experiment={STUDY}", f"hydra.sweeper.study_name={STUDY}",
        "hydra.sweeper.n_trials=1", "hydra.sweeper.n_jobs=1",
        "hydra.sweeper.trials_per_worker=null", "hydra.sweeper.heartbeat_interval=1",
        f"hydra.sweeper.retry.state_dir={tmp / 'shared'}",  # both store copies resume there
        "data.subset_fraction=0.05", f"trainer.max_epochs={EPOCHS}", "trainer.patience=10",
        "model.depth=2", "model.base_filters=8", "model.dense_units=16",
        "optimizer=adam", "data.batch_size=32", f"registry.model_name={STUDY}-cnn",
    ]


def run(tmp: Path, stores: str, sweep: str, kill: bool = False) -> subprocess.CompletedProcess:
    (tmp / stores).mkdir(exist_ok=True)
    # SIGKILL of the whole command inside epoch 2 (0-based 1): one state written
    env = fault_env(tmp, tmp / stores / "mlflow.db", "mid_epoch@group" if kill else None, 1)
    return subprocess.run(command(tmp, stores, sweep), cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=900, start_new_session=True)


def output(proc: subprocess.CompletedProcess) -> str:
    return proc.stdout[-3000:] + proc.stderr[-6000:]


def trials(tmp: Path, stores: str) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=STUDY,
                             storage=f"sqlite:///{tmp / stores / 'optuna.db'}").get_trials()


@dataclass(frozen=True)
class Killed:
    tmp: Path
    folder: Path  # the killed trial's state folder (shared by both store copies)
    pristine: Path  # a copy of it as the kill left it
    config_hash: str


@pytest.fixture(scope="module")
def killed(tmp_path_factory) -> Killed:
    """One real trial killed after epoch 1, its stores copied (``a`` and ``b``) for two
    independent re-runs, its state folder copied as the kill left it."""
    tmp = tmp_path_factory.mktemp("damaged-resume")
    proc = run(tmp, "a", "sweep-a", kill=True)
    assert proc.returncode == -signal.SIGKILL, output(proc)
    (first,) = trials(tmp, "a")
    folder = Path(first.user_attrs["resume_dir"])
    assert sorted(p.name for p in folder.iterdir()) == ["best-e1.keras", "state.npz"]
    shutil.copytree(tmp / "a", tmp / "b")
    shutil.copytree(folder, tmp / "pristine")
    with np.load(folder / "state.npz") as stored:
        meta = json.loads(str(stored["meta"]))
    assert meta["epoch"] == 1
    return Killed(tmp, folder, tmp / "pristine", meta["config_hash"])


def fresh_copy(killed: Killed, folder: Path) -> Path:
    """``folder`` holding the state exactly as the kill left it."""
    if folder.is_dir():
        shutil.rmtree(folder)
    shutil.copytree(killed.pristine, folder)
    return folder


def rewrite(folder: Path, change: Callable[[dict, dict], None]) -> None:
    """Write ``state.npz`` again with ``change(arrays, meta)`` applied (a ``meta`` entry
    that ``change`` replaced or removed stays as it left it)."""
    with np.load(folder / "state.npz") as stored:
        arrays = {k: stored[k] for k in stored.files}
    original = arrays["meta"]
    meta = json.loads(str(original))
    change(arrays, meta)
    if arrays.get("meta") is original:
        arrays["meta"] = np.array(json.dumps(meta))
    np.savez(folder / "state.npz", **arrays)


def set_meta(text: str) -> Callable[[Path], None]:
    return lambda folder: rewrite(folder, lambda arrays, meta: arrays.update(
        meta=np.array(text)))


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) * 2 // 3] ^= 0xFF  # inside an array's bytes: only the CRC can tell
    path.write_bytes(bytes(data))


def pickled(folder: Path) -> None:
    """As an attacker or an old tool would write it: an object array (np.save pickles it)."""
    rewrite(folder, lambda arrays, meta: arrays.update(
        model_0=np.array([{"weights": 1}, None], dtype=object)))


def as_npy(folder: Path) -> None:
    with open(folder / "state.npz", "wb") as f:
        np.save(f, np.zeros(3))


def folder_is_a_file(folder: Path) -> None:
    shutil.rmtree(folder)
    folder.write_text("not a folder")


def state_is_a_folder(folder: Path) -> None:
    (folder / "state.npz").unlink()
    (folder / "state.npz").mkdir()


STATE, BEST, FOLDER = "state.npz", "best-e1.keras", ""
DAMAGES: dict[str, tuple[Callable[[Path], None], str, tuple[str, ...]]] = {
    # name: (damage, words of the reason, what is set aside)
    "truncated": (lambda f: truncate(f / STATE), "not a readable .npz archive", (STATE,)),
    "random bytes": (lambda f: (f / STATE).write_bytes(os.urandom(4096)),
                     "not a readable .npz archive", (STATE,)),
    "empty": (lambda f: (f / STATE).write_bytes(b""), "not a readable .npz archive", (STATE,)),
    "a flipped byte": (lambda f: flip_a_byte(f / STATE), "cannot be read", (STATE,)),
    "pickled objects": (pickled, "'model_0' holds pickled Python objects", (STATE,)),
    "an .npy, not an .npz": (as_npy, "single .npy array", (STATE,)),
    "no meta": (lambda f: rewrite(f, lambda a, m: a.pop("meta")), "no 'meta' entry", (STATE,)),
    "meta not JSON": (set_meta("{epoch: 1"), "'meta' entry is not valid JSON", (STATE,)),
    "meta a list": (set_meta("[1, 2]"), "not a JSON object", (STATE,)),
    "meta an array": (lambda f: rewrite(f, lambda a, m: a.update(meta=np.zeros(2))),
                      "'meta' entry is not a JSON string", (STATE,)),
    "epoch not a number": (lambda f: rewrite(f, lambda a, m: m.update(epoch="1")),
                           "'epoch' is '1'", (STATE,)),
    "history garbled": (lambda f: rewrite(f, lambda a, m: m.update(history={"loss": ["x"]})),
                        "'history'", (STATE,)),
    "callbacks garbled": (lambda f: rewrite(f, lambda a, m: m.update(callbacks=[{"best": "?"}])),
                          "'callbacks'", (STATE,)),
    "an array missing": (lambda f: rewrite(f, lambda a, m: a.pop("opt_0")),
                         "'opt_0' is missing", (STATE,)),
    "a text array": (lambda f: rewrite(f, lambda a, m: a.update(model_1=np.array(["w"]))),
                     "'model_1' is not numeric", (STATE,)),
    "best copy truncated": (lambda f: truncate(f / BEST), f"best-checkpoint copy {BEST}",
                            (STATE, BEST)),
    "best copy flipped": (lambda f: flip_a_byte(f / BEST), f"best-checkpoint copy {BEST}",
                          (STATE, BEST)),
    "best copy missing": (lambda f: (f / BEST).unlink(), f"copy {BEST} is missing", (STATE,)),
    "best copy outside": (lambda f: rewrite(
        f, lambda a, m: m.update(best_checkpoint="../../etc/passwd")),
        "not a best-e<N>.keras name", (STATE,)),
    "state a folder": (state_is_a_folder, "it is not a file", (STATE,)),
    "folder a file": (folder_is_a_file, "a file where the state folder should be", (FOLDER,)),
}


def test_the_state_as_the_kill_left_it_reads_back(killed, tmp_path):
    point = resume.read_state(fresh_copy(killed, tmp_path / "state"), killed.config_hash)
    assert point is not None and point.epoch == 1 and point.best_checkpoint.is_file()


@pytest.mark.parametrize("name", DAMAGES)
def test_a_damaged_state_is_set_aside_with_one_warning(killed, tmp_path, caplog, name):
    damage, reason, aside = DAMAGES[name]
    folder = fresh_copy(killed, tmp_path / "state")
    damage(folder)
    before = {item: (folder / item).read_bytes() for item in aside
              if item and (folder / item).is_file()}
    with caplog.at_level(logging.WARNING, logger="search.training.resume"):
        assert resume.read_state(folder, killed.config_hash) is None
    warnings = [r.getMessage() for r in caplog.records if r.name == "search.training.resume"]
    assert len(warnings) == 1, warnings
    (warning,) = warnings
    named = folder / aside[0] if aside[0] else folder
    assert str(named) in warning and reason in warning and "epoch 0" in warning, warning
    for item in aside:
        path = folder / item if item else folder
        (kept,) = path.parent.glob(f"{path.name}.damaged-*")
        assert kept.name in warning and not path.exists()
        if item in before:  # kept as it was, for inspection
            assert kept.read_bytes() == before[item]


def completed_from_epoch_0(killed: Killed, stores: str, sweep: str) -> tuple[str, str]:
    """The re-run's one counted trial, COMPLETE from epoch 0: (its run.log, its run id)."""
    all_trials = trials(killed.tmp, stores)
    assert count_toward_budget(all_trials) == 1, [(t.number, t.state.name) for t in all_trials]
    (done,) = [t for t in all_trials if t.state.name == "COMPLETE"]
    assert "resumed_from_epoch" not in done.user_attrs, done.user_attrs
    assert sorted(done.intermediate_values) == list(range(EPOCHS))
    run_id = done.user_attrs["mlflow_run_id"]
    client = MlflowClient(f"sqlite:///{killed.tmp / stores / 'mlflow.db'}")
    run_ = client.get_run(run_id)
    assert run_.info.status == "FINISHED" and "resume.from_epoch" not in run_.data.tags
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == list(range(EPOCHS))
    return (killed.tmp / sweep / str(done.number) / "run.log").read_text(), run_id


def kept_aside(folder: Path, data: bytes) -> None:
    """The ended trial removed its state but kept the damaged one, as it was."""
    assert not (folder / "state.npz").exists()
    assert any(p.read_bytes() == data for p in folder.glob("state.npz.damaged-*"))


def test_a_truncated_state_is_set_aside_and_the_retry_completes_from_epoch_0(killed):
    folder = fresh_copy(killed, killed.folder)
    truncate(folder / "state.npz")
    data = (folder / "state.npz").read_bytes()
    again = run(killed.tmp, "a", "sweep-a")
    assert again.returncode == 0, output(again)
    log, _ = completed_from_epoch_0(killed, "a", "sweep-a")
    assert log.count("cannot be resumed from") == 1, log
    assert f"{folder / 'state.npz'} cannot be resumed from: it is not a readable .npz" in log
    kept_aside(folder, data)


def test_a_state_whose_arrays_do_not_fit_the_model_is_set_aside_before_the_fit(killed):
    folder = fresh_copy(killed, killed.folder)
    rewrite(folder, lambda arrays, meta: arrays.update(
        model_0=np.zeros((*arrays["model_0"].shape, 2), arrays["model_0"].dtype)))
    data = (folder / "state.npz").read_bytes()
    again = run(killed.tmp, "b", "sweep-b")
    assert again.returncode == 0, output(again)
    log, _ = completed_from_epoch_0(killed, "b", "sweep-b")
    assert log.count("cannot be resumed from") == 1, log
    assert "does not fit this run (its entry 'model_0' has shape" in log, log
    assert "Resuming after" not in log and "Resumed from" not in log, log
    kept_aside(folder, data)
