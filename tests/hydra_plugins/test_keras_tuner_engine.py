"""keras-tuner's oracles over the project's real search space, without training: the same
conditional rule as Optuna's side, FAIL never best, projects never silently reused."""

from __future__ import annotations

import json
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


def engine(resolver, tmp_path, algorithm="random", **conf) -> KerasTunerEngine:
    settings = {"algorithm": algorithm, "seed": 3, "max_epochs": 4, "factor": 3,
                "hyperband_iterations": 1, "num_initial_points": 3, "directory": None,
                "resume": None, **conf}
    return KerasTunerEngine(
        OmegaConf.create(settings), resolver, objective="val_loss", direction="minimize",
        fingerprint=resolver.space.fingerprint(), base_name="study", sweep_dir=tmp_path,
        n_trials=12, default_epochs=10)


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
