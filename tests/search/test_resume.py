"""Resumable state (search/training/resume.py) in one process: real PneumoniaMNIST, a real CNN with
dropout, augmentation, a plateau schedule, early stopping and the best-only checkpoint.

A fit stopped after epoch 3 and resumed from its state in a fresh model must give the same
epochs, values and weights as a fit that ran through: the state must hold everything the
run depends on (weights, optimizer slots and step, the plateau's cut learning rate, the
callbacks' counters, the dropout and augmentation RNG, the data order)."""

from __future__ import annotations

import time
from pathlib import Path

import keras
import numpy as np
import pytest
from hydra.utils import instantiate

from hydra_plugins.optuna_pruning_sweeper import _preemption as preemption
from search import sweep_context
from search.tracking.model_logging import config_hash
from search.training import resume
from search.training.keras_callbacks import AtomicModelCheckpoint
from search.training.model_setup import compile_model

OVERRIDES = ("data.subset_fraction=0.1", "model.depth=2", "model.base_filters=8",
             "model.dense_units=16", "data.augment.flip=true", "data.augment.noise=0.05",
             "lr_schedule=plateau", "lr_schedule.patience=1", "optimizer=adam",
             "optimizer.learning_rate=0.02", "trainer.patience=3")
EPOCHS = 6


def fit(cfg, folder: Path, epochs: int, plan: resume.ResumePlan | None):
    """Build everything as train() does and fit up to ``epochs`` (from the plan's state)."""
    keras.utils.set_random_seed(int(cfg.seed))  # as train() seeds before building the data
    data = instantiate(cfg.data, seed=int(cfg.seed), _convert_="all")
    keras.backend.clear_session()
    keras.utils.set_random_seed(3)
    model = instantiate(cfg.model, input_shape=tuple(data.input_shape), num_classes=2)
    steps = int(data.steps_per_epoch)
    schedule = instantiate(cfg.lr_schedule, initial_learning_rate=0.02,
                           steps_per_epoch=steps, epochs=EPOCHS)
    compile_model(model, instantiate(cfg.optimizer, learning_rate=schedule.learning_rate), True)
    checkpoint = folder / "best.keras"
    stateful = [keras.callbacks.EarlyStopping(patience=3, restore_best_weights=True),
                AtomicModelCheckpoint(checkpoint, save_best_only=True), *schedule.callbacks]
    state = resume.ResumableState(plan, stateful, checkpoint, steps, EPOCHS,
                                  {"run_id": None, "config_hash": config_hash(cfg)})
    start = plan.initial_epoch if plan is not None and plan.point is not None else 0
    model.fit(resume.resume_data(data.train, plan, 0, steps), steps_per_epoch=steps,
              epochs=epochs, initial_epoch=start, validation_data=data.val,
              class_weight=data.class_weight, callbacks=[*stateful, state], verbose=0)
    return model, state, stateful


@pytest.fixture(scope="module")
def runs(tmp_path_factory, compose_cfg):
    cfg = compose_cfg(*OVERRIDES)
    base = tmp_path_factory.mktemp("resume")
    through = fit(cfg, base / "through", EPOCHS, None)
    folder = base / "state"
    fit(cfg, base / "first", 3, resume.ResumePlan(folder, write=True))  # "killed" after 3
    plan = resume.ResumePlan(folder, write=True)
    plan.point = resume.read_state(folder, config_hash(cfg))
    resumed = fit(cfg, base / "second", EPOCHS, plan)
    return cfg, through, resumed, plan, folder


def test_resumed_fit_equals_a_fit_that_ran_through(runs):
    _, (model_a, state_a, cbs_a), (model_b, state_b, cbs_b), plan, _ = runs
    assert plan.point is not None and plan.point.epoch == 3
    # the resumed run trained epochs 4 to 6 only, on top of the saved history
    assert len(state_b.history["loss"]) == EPOCHS == len(state_a.history["loss"])
    for key in ("loss", "val_loss", "learning_rate"):
        np.testing.assert_allclose(state_b.history[key], state_a.history[key], atol=1e-5,
                                   err_msg=key)
    assert state_a.history["learning_rate"][-1] < state_a.history["learning_rate"][0], (
        "the plateau schedule never cut the rate: the test would not check its state")
    for a, b in zip(model_a.get_weights(), model_b.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)
    for a, b in zip(cbs_a, cbs_b, strict=True):  # early stopping, checkpoint, plateau
        for name in ("wait", "best", "best_epoch", "cooldown_counter"):
            assert getattr(a, name, None) == pytest.approx(getattr(b, name, None)), name
    assert int(model_b.optimizer.iterations.numpy()) == int(model_a.optimizer.iterations.numpy())


def test_state_is_one_file_with_the_best_checkpoint_beside_it(runs):
    cfg, *_, folder = runs
    names = sorted(p.name for p in folder.iterdir())
    assert names[-1] == resume.STATE_FILE and all(
        n == resume.STATE_FILE or (n.startswith("best-e") and n.endswith(".keras"))
        for n in names), names
    point = resume.read_state(folder, config_hash(cfg))
    assert point.best_checkpoint.is_file()
    keras.models.load_model(point.best_checkpoint, safe_mode=True, compile=False)
    # another config (another trial's params) never resumes from it
    assert resume.read_state(folder, "another-config") is None


@pytest.fixture
def preempted():
    """A SIGTERM as the worker's handler records it (no signal: pytest stays alive)."""
    def ask(grace_s: float) -> None:
        preemption._STATE.update(requested=time.monotonic(), grace=grace_s)
    yield ask
    preemption.reset()


def tiny_state(tmp_path: Path, steps: int) -> resume.ResumableState:
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    model.compile(optimizer="adam", loss="mse")
    model.fit(np.zeros((4, 3)), np.zeros((4, 1)), epochs=1, verbose=0)
    state = resume.ResumableState(resume.ResumePlan(tmp_path, write=True), [], tmp_path / "x",
                                  steps, 10, {"config_hash": "h"})
    state.set_model(model)
    state.on_epoch_begin(3)
    return state


def test_sigterm_with_time_left_finishes_the_epoch_saves_and_stops(tmp_path, preempted):
    state = tiny_state(tmp_path, steps=50)
    preempted(600.0)
    state.on_train_batch_end(0)  # the epoch fits in the grace: go on
    assert state.finishing
    state.on_train_batch_end(1)
    state.on_epoch_end(3, {"loss": 0.5})  # saved; MLflow and the pruner see the epoch next
    assert resume.read_state(tmp_path, "h").epoch == 4
    with pytest.raises(sweep_context.TrialInterrupted, match="finished within the grace"):
        state.on_epoch_begin(4)


def test_sigterm_without_time_stops_at_the_next_batch(tmp_path, preempted):
    state = tiny_state(tmp_path, steps=50)
    preempted(0.0)
    with pytest.raises(sweep_context.TrialInterrupted, match="batch 1: the epoch would not"):
        state.on_train_batch_end(0)
    assert not (tmp_path / resume.STATE_FILE).exists()  # the last state stays what it was


# --- damaged states: set aside with one warning, never the trial's end (issue 27) -----------

def saved_tiny_state(tmp_path: Path, units: int = 1) -> tuple[Path, keras.Model]:
    """A real state of a tiny model after its 4th epoch (with a best-checkpoint copy)."""
    state = tiny_state(tmp_path / "state", steps=1)
    model = state.model
    if units != 1:  # the same layout with a wider output: its arrays fit no 1-unit model
        model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(units)])
        model.compile(optimizer="adam", loss="mse")
        model.fit(np.zeros((4, 3)), np.zeros((4, units)), epochs=1, verbose=0)
        state.set_model(model)
    state.checkpoint = tmp_path / "best.keras"
    model.save(state.checkpoint)
    state.on_epoch_end(3, {"loss": 0.5})
    return tmp_path / "state", model


def ours(caplog: pytest.LogCaptureFixture) -> list[str]:
    """This project's warnings (not TensorFlow's or absl's)."""
    return [r.getMessage() for r in caplog.records
            if r.levelname == "WARNING" and r.name.startswith("search.")]


def damaged(caplog: pytest.LogCaptureFixture, path: Path) -> str:
    """The one warning about ``path``; the file itself is gone, renamed beside it."""
    warnings = ours(caplog)
    assert len(warnings) == 1 and str(path) in warnings[0], warnings
    assert "starts again from epoch 0" in warnings[0], warnings[0]
    assert not path.exists() and list(path.parent.glob(f"{path.name}.damaged-*")), list(
        path.parent.iterdir())
    return warnings[0]


def test_a_tiny_state_reads_back(tmp_path):
    folder, _ = saved_tiny_state(tmp_path)
    point = resume.read_state(folder, "h")
    assert point.epoch == 4 and point.best_checkpoint.is_file()


def test_a_state_that_does_not_fit_the_model_is_set_aside_before_the_fit(tmp_path, caplog):
    folder, _ = saved_tiny_state(tmp_path, units=2)  # written by a 2-unit model
    plan = resume.ResumePlan(folder, write=True)
    plan.point = resume.read_state(folder, "h")  # a whole file: read_state takes it
    other = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    other.compile(optimizer="adam", loss="mse")
    state = resume.ResumableState(plan, [], folder / "x", 1, 10, {"config_hash": "h"})
    assert state.history and state.saved_epoch == 4
    assert state.adopt(other) is None
    assert "does not fit this run" in damaged(caplog, folder / resume.STATE_FILE)
    assert plan.point is None and state.history == {} and state.saved_epoch is None


def test_a_folder_that_cannot_take_the_state_costs_resumability_not_the_trial(tmp_path,
                                                                             caplog):
    state = tiny_state(tmp_path / "state", steps=1)
    (tmp_path / "state").write_text("a file where the folder goes")
    state.on_epoch_end(3, {"loss": 0.5})  # no error: one warning, no more writes
    state.on_epoch_end(4, {"loss": 0.4})
    warnings = ours(caplog)
    assert len(warnings) == 1 and "cannot be written to" in warnings[0], warnings
    assert not state.plan.write and state.history["loss"] == [0.5, 0.4]


def test_an_ended_trial_keeps_only_the_damaged_state_it_set_aside(tmp_path):
    folder, _ = saved_tiny_state(tmp_path)
    (folder / resume.STATE_FILE).write_bytes(b"not a zip")
    assert resume.read_state(folder, "h") is None
    resume.remove_state(resume.ResumePlan(folder, write=True))
    (kept,) = folder.iterdir()
    assert kept.name.startswith("state.npz.damaged-") and kept.read_bytes() == b"not a zip"
