"""Run names: how a trial ended, then what it tried, readable in MLflow's run table."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from search.tracking.run_names import final_name, initial_name

# MLflow 3's runs list shows about this many characters of a name before its "…"
VISIBLE = 14


def cfg(**tracking):
    return OmegaConf.create({
        "optimizer": {"name": "adamax", "learning_rate": 0.0026},
        "model": {"depth": 4, "base_filters": 16},
        "tracking": {"run_name": None, **tracking},
    })


def test_trial_names_carry_number_optimizer_depth_and_learning_rate():
    assert initial_name(cfg(), 25) == "t025 adamax d4 lr 2.6e-3"
    assert initial_name(cfg(), None) == "adamax d4 lr 2.6e-3"  # a single run


def test_transfer_models_show_their_backbone_and_a_given_name_wins():
    transfer = cfg()
    transfer.model = {"backbone": "resnet50", "weights": "imagenet"}
    assert initial_name(transfer, 3) == "t003 adamax resnet50 lr 2.6e-3"
    assert initial_name(cfg(run_name="baseline"), 3) == "baseline"


def test_final_names_lead_with_how_the_run_ended():
    name = "t025 adamax d4 lr 2.6e-3"
    assert final_name(name, "COMPLETE", "val_loss", 0.07612, 9) == "t025 0.076 adamax d4 lr 2.6e-3"
    assert final_name(name, "PRUNED", "val_loss", None, 3) == "t025 pruned@3 adamax d4 lr 2.6e-3"
    assert final_name(name, "FAIL", "val_loss", None, None) == "t025 failed adamax d4 lr 2.6e-3"
    assert final_name(name, "INTERRUPTED", "val_loss", None, 2).startswith("t025 interrupted ")
    assert final_name(name, "RUNNING", "val_loss", None, None) == name
    assert final_name("adamax d4", "COMPLETE", "val_loss", 0.5, 3) == "0.500 adamax d4"


@pytest.mark.parametrize(("state", "value", "seen"), [
    ("COMPLETE", 0.0812, "t039 0.081 rms"), ("PRUNED", None, "t039 pruned@2 "),
    ("FAIL", None, "t039 failed rm")])
def test_the_outcome_survives_the_runs_lists_cut(state, value, seen):
    """What the runs list shows of a name (its first characters) holds the outcome."""
    conf = cfg()
    conf.optimizer.name = "rmsprop"
    name = final_name(initial_name(conf, 39), state, "val_loss", value, 2)
    assert name[:VISIBLE] == seen
