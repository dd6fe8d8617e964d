"""The sweep's descriptions, next-step lines and its all-trials curve figure."""

from __future__ import annotations

import numpy as np

from search.sweep.figures import curves_figure
from search.tracking import descriptions as d

SERVER = "http://alice:s3cret@127.0.0.1:5000"
SUMMARY = {"counts": {"COMPLETE": 3, "PRUNED": 5, "FAIL": 1},
           "best": {"number": 7, "value": 0.0761, "params": {"optimizer": "adamax",
                                                              "model.depth": 4}}}
DECISION = {"model_name": "pneumonia-cnn", "version": 3, "alias": "champion", "promoted": True,
            "reason": "beats v2", "metric": "roc_auc", "tie_break": "sensitivity",
            "champion_version": 2, "new_metrics": {"roc_auc": 0.9712, "sensitivity": 0.95,
                                                   "specificity": 0.88}}


def test_parent_description_links_the_best_trial_and_gives_the_pull_command():
    note = d.parent_description("study-a", SUMMARY, "val_loss", ("4", "abc123"), DECISION,
                                SERVER, "pneumonia-cnn")
    assert "3 complete, 5 pruned, 1 fail" in note
    assert ("[trial 7](http://127.0.0.1:5000/#/experiments/4/runs/abc123"
            "?workflowType=machine_learning)") in note
    assert "val_loss = 0.0761" in note and "`optimizer` = adamax" in note
    assert "v3 → @champion (promoted: beats v2); held-out roc_auc = 0.9712" in note
    assert ("python search/pull.py --name pneumonia-cnn --tracking-uri "
            "http://127.0.0.1:5000") in note
    assert "s3cret" not in note and "alice" not in note
    empty = d.parent_description("s", {"counts": {"FAIL": 2}}, "val_loss", None, None,
                                 "sqlite:///x.db", "m")
    assert "No trial completed" in empty and "nothing promoted" in empty


def test_next_steps_for_a_local_store_start_the_ui_and_open_the_chart_view():
    lines = d.next_steps("sqlite:////data/mlruns/mlflow.db", "1", "run9", "m", DECISION)
    text = "\n".join(lines)
    assert "mlflow ui --backend-store-uri sqlite:////data/mlruns/mlflow.db --host 127.0.0.1" in text
    assert ("http://127.0.0.1:5000/#/experiments/1/runs?workflowType=machine_learning"
            "&compareRunsMode=CHART") in text
    assert "http://127.0.0.1:5000/#/experiments/1/runs/run9?workflowType=machine_learning" in text
    assert "models:/m/3 is champion; serve models:/m@champion" in text
    assert "pull:    python search/pull.py --name m --tracking-uri" in text
    server = "\n".join(d.next_steps(SERVER, "1", "r", "m", None))
    assert "mlflow ui" not in server and "s3cret" not in server and "pull:" not in server


def test_version_and_model_descriptions_say_what_won_and_where_it_operates():
    class Run:
        class info:  # noqa: N801 - the shape of mlflow.entities.Run
            run_id = "r1"

        class data:  # noqa: N801
            tags = {"optuna.trial_number": "7", "optuna.study": "s"}
            params = {"data": "pneumoniamnist", "data.n_train": "4237", "data.n_val": "471"}

    meta = {"threshold": 0.4123, "threshold_rule": "max_f1", "data_fingerprint": "f" * 40,
            "config_hash": "h1", "class_names": ["normal", "pneumonia"],
            "preprocessing": {"image_size": 28, "channels": 1}}
    text = d.version_description(Run, meta, DECISION)
    assert "trial 7 of study `s`" in text and "`pneumoniamnist` (4237 train / 471 val" in text
    assert "**Threshold:** 0.4123 (max_f1, chosen on val)" in text
    assert "held-out roc_auc = 0.9712" in text
    assert "sensitivity 0.95, specificity 0.88" in text
    assert "`runs:/r1/config/config.yaml`" in text
    assert "raw 0–255 pixels, float32 `(N, 28, 28, 1)`" in text
    assert "`p_normal`, `p_pneumonia` (probabilities, classes in output order)" in text
    model = d.model_description("m", {**DECISION, "promoted": False}, SERVER)
    assert "**Champion:** v2 (`models:/m@champion`)" in model and "s3cret" not in model
    assert "mlflow models serve -m models:/m@champion --env-manager local" in model


def test_the_curve_figure_reads_with_forty_trials():
    rng = np.random.default_rng(0)
    curves = {n: list(1 / np.arange(1, 11) + rng.random(10) * 0.1)[: 2 + n % 9]
              for n in range(40)}
    states = {n: "PRUNED" if n % 3 else "COMPLETE" for n in range(40)}
    states[5] = "FAIL"
    figure = curves_figure(curves, states, best=9, metric="val_loss", best_value=0.1234)
    legend = [t.get_text() for t in figure.axes[0].get_legend().get_texts()]
    assert legend[0] == "best: trial 9 (0.1234)"
    assert sorted(legend[1:]) == ["complete (13)", "fail (1)", "pruned (25)"]
    # one line per trial, a cross where each pruned one stopped
    assert len(figure.axes[0].lines) == 40 + 25


def test_model_card_names_the_runs_own_training_data():
    from search.model_registry.model_card import training_data

    info = {"data_fingerprint": "abcdef1234567890",
            "training_data": {"data": "chest_xray", "data.n_train": "12", "data.n_val": "2",
                              "data.n_test": "2"}}
    line = training_data(info)
    assert line == ("Training data: `chest_xray` (12/2/2 train/val/test images, fingerprint "
                    "`abcdef123456`).")
    assert "Kermany" not in line  # the built-in set's attribution only for the built-in set
    builtin = training_data({**info, "training_data": {**info["training_data"],
                                                         "data": "pneumoniamnist"}})
    assert "Kermany et al. (2018)" in builtin and "MedMNIST v2" in builtin
    assert "see the run's config" in training_data({})


def test_model_card_says_how_a_label_is_chosen():
    from search.model_registry.model_card import decision

    assert decision({"class_names": ["normal", "pneumonia"], "threshold": 0.38,
                     "threshold_rule": "max_f1"}) == (
        "P(pneumonia) >= 0.3800 (threshold rule `max_f1`, chosen on validation)")
    assert decision({"class_names": ["a", "b", "c"], "threshold": None,
                     "threshold_rule": "max_f1"}) == (
        "the most probable of the 3 classes (argmax; no threshold)")


def test_model_card_says_what_the_probabilities_mean():
    from search.model_registry.model_card import calibrated

    assert calibrated({"calibration": None}) == "as trained (no calibration)"
    assert calibrated({"calibration": {"method": "temperature", "temperature": 1.25,
                                       "shift": 0.0}}) == (
        "calibrated on validation (temperature, temperature 1.2500, folded into the output "
        "layer)")
    assert "each member's" in calibrated({"calibration": {"method": "members"}})
