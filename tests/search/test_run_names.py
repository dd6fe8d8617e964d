"""Run names: what a trial tried and how it ended, readable in MLflow's run table."""

from __future__ import annotations

from omegaconf import OmegaConf

from search.tracking.run_names import final_name, initial_name


def cfg(**tracking):
    return OmegaConf.create({
        "optimizer": {"name": "adamax", "learning_rate": 0.0026},
        "model": {"depth": 4, "base_filters": 16},
        "tracking": {"run_name": None, **tracking},
    })


def test_trial_names_carry_number_optimizer_learning_rate_and_depth():
    assert initial_name(cfg(), 25) == "t025 · adamax · lr 2.6e-3 · d4"
    assert initial_name(cfg(), None) == "adamax · lr 2.6e-3 · d4"  # a single run


def test_transfer_models_show_their_backbone_and_a_given_name_wins():
    transfer = cfg()
    transfer.model = {"backbone": "resnet50", "weights": "imagenet"}
    assert initial_name(transfer, 3) == "t003 · adamax · lr 2.6e-3 · resnet50"
    assert initial_name(cfg(run_name="baseline"), 3) == "baseline"


def test_final_names_say_how_the_run_ended():
    name = "t025 · adamax · lr 2.6e-3 · d4"
    assert final_name(name, "COMPLETE", "val_loss", 0.07612, 9) == f"{name} → val_loss 0.076"
    assert final_name(name, "PRUNED", "val_loss", None, 3) == f"{name} · pruned @ epoch 3"
    assert final_name(name, "FAIL", "val_loss", None, None) == f"{name} · failed"
