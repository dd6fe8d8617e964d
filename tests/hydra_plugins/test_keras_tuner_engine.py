"""keras-tuner's oracles over the project's real search space, without training: the same
conditional rule as Optuna's side, FAIL never best, projects never silently reused."""

from __future__ import annotations

import json
import re
from pathlib import Path

import optuna
import pytest
from hydra._internal.config_loader_impl import ConfigLoaderImpl
from hydra._internal.utils import create_config_search_path
from hydra.types import RunMode
from omegaconf import OmegaConf

from hydra_plugins.optuna_pruning_sweeper._conditions import ConditionResolver, sample_trial
from hydra_plugins.optuna_pruning_sweeper._distributions import (
    params_to_overrides,
    parse_search_space,
)
from hydra_plugins.optuna_pruning_sweeper._keras_tuner_engine import (
    KerasTunerEngine,
    build_hyperparameters,
)
from search.config_checks import register_resolvers

CONF = Path(__file__).resolve().parents[2] / "conf"


@pytest.fixture(scope="module")
def resolver() -> ConditionResolver:
    """The default search space as the sweeper resolves it (real Hydra composition)."""
    register_resolvers()
    loader = ConfigLoaderImpl(config_search_path=create_config_search_path(str(CONF)))
    config = loader.load_configuration("config", overrides=[], run_mode=RunMode.MULTIRUN)
    params = OmegaConf.to_container(config.hydra.sweeper.params, resolve=False)
    lines, conditions = params_to_overrides(params)
    space = parse_search_space(lines, conditions)
    swept = frozenset(p.key for p in space.params.values())
    return ConditionResolver(space, loader, config, swept)


def engine(resolver, tmp_path, algorithm="random", default_epochs=10,
           **conf) -> KerasTunerEngine:
    settings = {"algorithm": algorithm, "seed": 3, "max_epochs": 4, "factor": 3,
                "hyperband_iterations": 1, "num_initial_points": 3, "directory": None,
                "resume": None, **conf}
    return KerasTunerEngine(
        OmegaConf.create(settings), resolver, objective="val_loss", direction="minimize",
        fingerprint=resolver.space.fingerprint(), base_name="study", sweep_dir=tmp_path,
        n_trials=12, default_epochs=default_epochs)


def test_translation_keeps_kinds_scales_and_conditions(resolver):
    hp, _ = build_hyperparameters(resolver)
    by_name = {h.name: h for h in hp.space}
    assert set(by_name) == set(resolver.space.params)
    assert by_name["optimizer.learning_rate"].sampling == "log"
    assert type(by_name["model.depth"]).__name__ == "Int"
    assert type(by_name["model.base_filters"]).__name__ == "Choice"
    # a group option's keys only under that option; `when:` as written; the rest free
    momentum = by_name["optimizer.momentum"].conditions
    assert [(c.name, sorted(c.values)) for c in momentum] == [("optimizer", ["rmsprop", "sgd"])]
    rate = by_name["model.conv_dropout_rate"].conditions
    assert [(c.name, sorted(c.values)) for c in rate] == [
        ("model.conv_dropout", ["all", "every_other", "last"])]
    assert by_name["model.depth"].conditions == []


@pytest.mark.parametrize("algorithm", ["random", "bayesian", "hyperband"])
def test_every_proposal_obeys_the_optuna_sides_conditional_rule(resolver, tmp_path, algorithm):
    kt = engine(resolver, tmp_path, algorithm)
    study = optuna.create_study()
    seen_momentum = seen_without = continued = False
    for number in range(6):
        proposal = kt.propose(slot=0)
        assert not isinstance(proposal, str), proposal
        study.enqueue_trial(proposal.params)
        trial = study.ask()
        params, _ = sample_trial(trial, resolver)
        assert params == proposal.params  # the very same active set and values
        seen_momentum |= "optimizer.momentum" in params
        seen_without |= params["optimizer"] in ("adam", "adamax")
        kt.started(proposal, trial.number)
        best = tmp_path / str(trial.number) / "checkpoints" / "best.keras"  # as train() leaves
        best.parent.mkdir(parents=True)
        best.touch()
        continued |= any(line.startswith("trainer.init_weights=") for line in proposal.lines)
        value = 0.5 + 0.01 * number
        study.tell(trial, value)
        kt.finish(trial.number, "COMPLETE", [value], None)
        epochs = [line for line in proposal.lines if line.startswith("trainer.max_epochs=")]
        assert epochs and (algorithm == "hyperband" or epochs == ["trainer.max_epochs=4"])
        if algorithm == "hyperband":  # a round's schedule spans the whole budget
            assert "trainer.schedule_epochs=4" in proposal.lines
    assert seen_momentum and seen_without  # both sides of the condition were proposed
    # Hyperband's second round continues a first-round model from its checkpoint
    assert continued == (algorithm == "hyperband")


def test_failed_trial_is_failed_in_keras_tuner_and_never_best(resolver, tmp_path):
    kt = engine(resolver, tmp_path, "random")
    first, second = kt.propose(0), kt.propose(1)
    kt.started(first, 0)
    kt.started(second, 1)
    kt.finish(0, "FAIL", None, "MemoryError: out of memory")
    kt.finish(1, "COMPLETE", [0.9], None)
    summary = kt.summary()
    assert summary["states"] == {"FAILED": 1, "COMPLETED": 1}
    assert summary["best_optuna_trial"] == 1 and summary["best_score"] == pytest.approx(0.9)
    assert kt.oracle.trials[first.trial_id].message == "MemoryError: out of memory"


def test_projects_are_new_unless_resumed_with_the_same_space(resolver, tmp_path):
    a = engine(resolver, tmp_path / "a", "random")
    b = engine(resolver, tmp_path / "b", "random")
    assert a.project_dir != b.project_dir and a.study_name.startswith("study-kt-random-")
    proposal = a.propose(0)
    a.started(proposal, 0)
    a.finish(0, "COMPLETE", [0.4], None)
    again = engine(resolver, tmp_path / "c", "random", resume=str(a.project_dir))
    assert again.study_name == a.study_name and len(again.oracle.trials) == 1
    assert again.numbers == {proposal.trial_id: 0}
    with pytest.raises(ValueError, match="another space or algorithm"):
        engine(resolver, tmp_path / "d", "bayesian", resume=str(a.project_dir))
    record = a.project_dir / "sweep_project.json"
    stored = json.loads(record.read_text())
    stored["fingerprint"]["params"].pop("model.depth")
    record.write_text(json.dumps(stored))
    with pytest.raises(ValueError, match="resume only with the same params"):
        engine(resolver, tmp_path / "e", "random", resume=str(a.project_dir))
    with pytest.raises(FileNotFoundError, match="no keras-tuner project"):
        engine(resolver, tmp_path / "f", "random", resume=str(tmp_path / "nowhere"))


@pytest.mark.parametrize(("algorithm", "setting", "message"), [
    # keras-tuner would read 0 as "unset" (max_epochs, num_initial_points) or "forever"
    # (hyperband_iterations), or refuse factor=1 without naming the key
    ("random", {"max_epochs": 0}, "keras_tuner.max_epochs=0 must be an integer >= 1, or null"),
    ("hyperband", {"max_epochs": -2}, "keras_tuner.max_epochs=-2 must be an integer >= 1"),
    ("hyperband", {"factor": 1}, "keras_tuner.factor=1 must be an integer >= 2"),
    ("hyperband", {"hyperband_iterations": 0},
     "keras_tuner.hyperband_iterations=0 must be an integer >= 1"),
    ("bayesian", {"num_initial_points": 0},
     "keras_tuner.num_initial_points=0 must be an integer >= 1, or null"),
    ("grid", {}, "keras_tuner.algorithm='grid'; use one of hyperband, bayesian, random"),
    ("bayesian", {"seed": -1}, "keras_tuner.seed=-1 must be an integer in 0 .. 2**32 - 1"),
    # a Hyperband with no round to halve stops after a trial or two, whatever n_trials says
    ("hyperband", {"max_epochs": 1}, "max_epochs=1 is below hydra.sweeper.keras_tuner.factor=3:"
     " Hyperband has no round to halve and would run 1 trial(s) of 1 epoch(s), then stop"),
    ("hyperband", {"max_epochs": 2, "factor": 5}, "would run 2 trial(s) of 2 epoch(s)"),
    ("hyperband", {"max_epochs": None, "default_epochs": 1},
     "trainer.max_epochs=1 is below hydra.sweeper.keras_tuner.factor=3"),
])
def test_settings_the_oracle_would_misread_are_refused_by_key(resolver, tmp_path, algorithm,
                                                              setting, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        engine(resolver, tmp_path, algorithm, **setting)
    assert not any(tmp_path.iterdir())  # refused before any project (or trial) exists


def test_settings_that_work_pass(resolver, tmp_path):
    engine(resolver, tmp_path / "a", "hyperband", max_epochs=3, factor=3)
    engine(resolver, tmp_path / "b", "random", max_epochs=1)  # one-epoch random trials
    engine(resolver, tmp_path / "c", "bayesian", num_initial_points=None)


def test_summary_of_a_search_whose_every_trial_failed_names_no_best(resolver, tmp_path):
    kt = engine(resolver, tmp_path, "random")
    first = kt.propose(0)
    kt.started(first, 0)
    kt.finish(0, "FAIL", None, "ValueError: lr_schedule.warmup_epochs=1 leaves no steps")
    summary = kt.summary()  # keras-tuner's best is then a FAILED trial with no score
    assert summary["states"] == {"FAILED": 1}
    assert summary["best_trial"] is None and summary["best_score"] is None
    assert summary["best_optuna_trial"] is None
