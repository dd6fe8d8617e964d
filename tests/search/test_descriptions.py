"""The sweep's descriptions, next-step lines and its all-trials curve figure."""

from __future__ import annotations

import numpy as np

from search.sweep.figures import curves_figure, curves_html_figure
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
    # relative to the UI's page: the link works on any host and port
    assert "[trial 7](#/experiments/4/runs/abc123?workflowType=machine_learning)" in note
    assert "val_loss = 0.0761" in note and "`optimizer` = adamax" in note
    assert "v3 → @champion (promoted: beats v2); held-out roc_auc = 0.9712" in note
    assert ("python search/pull.py --name pneumonia-cnn --tracking-uri "
            "http://127.0.0.1:5000") in note
    assert "s3cret" not in note and "alice" not in note
    empty = d.parent_description("s", {"counts": {"FAIL": 2}}, "val_loss", None, None,
                                 "sqlite:///x.db", "m")
    assert "No trial completed" in empty and "nothing promoted" in empty


def test_next_steps_for_a_local_store_start_the_ui_and_open_the_figures_file():
    lines = d.next_steps("sqlite:////data/mlruns/mlflow.db", "1", "run9", "m", DECISION,
                         artifact_uri="file:///data/mlruns/artifacts/1/run9/artifacts")
    text = "\n".join(lines)
    assert "UI:      python search/ui.py --tracking-uri sqlite:////data/mlruns/mlflow.db" in text
    # no server is known for a local store: the figure's file, no guessed host or port
    assert ("curves:  file:///data/mlruns/artifacts/1/run9/artifacts/val_loss_all_trials.html"
            in text) and ":5000" not in text
    assert "sweep:   parent run run9, experiment 1" in text
    assert "models:/m/3 is champion; serve models:/m@champion" in text
    assert "pull:    python search/pull.py --name m --tracking-uri" in text
    server = "\n".join(d.next_steps(SERVER, "1", "r", "m", None))
    assert "UI:" not in server and "s3cret" not in server and "pull:" not in server


def test_next_steps_on_a_server_open_the_all_trials_figure_in_one_click():
    text = "\n".join(d.next_steps(SERVER, "1", "r9", "m", DECISION))
    assert ("curves:  http://127.0.0.1:5000/#/experiments/1/runs/r9/artifactPath/"
            "val_loss_all_trials.html?workflowType=machine_learning") in text
    assert "sweep:   http://127.0.0.1:5000/#/experiments/1/runs/r9?workflowType" in text
    assert "s3cret" not in text
    assert d.ui_command("sqlite:///" + str(d.DEFAULT_STORE / "mlflow.db")) == "python search/ui.py"


def test_parent_description_leads_with_decision_commands_and_best_and_ends_with_params():
    """MLflow folds a run's description after about three lines: those hold the decision,
    the champion's commands and the best trial with every trial's curves."""
    note = d.parent_description("study-a", SUMMARY, "val_loss", ("4", "abc"), DECISION,
                                "sqlite:////data/m.db", "pneumonia-cnn",
                                experiment_id="4", parent_run_id="p1")
    first = note.splitlines()[:3]
    assert first[0].startswith("- **Registry:** `pneumonia-cnn` v3 → @champion (promoted")
    assert "`python search/pull.py --name pneumonia-cnn --tracking-uri sqlite:////data/m.db`" \
        in first[1] and "predict.py models:/pneumonia-cnn@champion" in first[1]
    assert first[2].startswith("- **Best:** [trial 7](#/experiments/4/runs/abc?")
    assert ("[every trial's val_loss](#/experiments/4/runs/p1/artifactPath/"
            "val_loss_all_trials.html?workflowType=machine_learning)") in first[2]
    assert note.index("3 complete") > note.index("**Best:**")
    assert note.index("`optimizer` = adamax") > note.index("Parameters of trial 7")
    assert note.rstrip().endswith("`model.depth` = 4")
    stopped = d.parent_description("s", SUMMARY, "val_loss", None, None, SERVER, "m",
                                   stopped="failed in the sweep's registration step")
    assert stopped.splitlines()[0] == ("- **Stopped:** failed in the sweep's registration "
                                       "step; the steps after it did not run.")
    challenger = d.parent_description("s", SUMMARY, "val_loss", None,
                                      {**DECISION, "promoted": False, "alias": "challenger"},
                                      SERVER, "m")
    assert "v3 → @challenger (not promoted: beats v2)" in challenger
    assert "the champion stays v2." in challenger.splitlines()[0]
    for text in (note, stopped, challenger):  # no description pins a host or port
        assert ":5000" not in text.replace("--tracking-uri http://127.0.0.1:5000", "")


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


def test_the_interactive_figure_gives_every_trial_a_line_a_colour_and_a_name():
    rng = np.random.default_rng(0)
    curves = {n: list(1 / np.arange(1, 11) + rng.random(10) * 0.1)[: 2 + n % 9]
              for n in range(60)}
    states = {n: "PRUNED" if n % 3 else "COMPLETE" for n in range(60)}
    states[5] = "FAIL"
    names = {n: f"t{n:03d} 0.1 adam d3" for n in range(60)}
    figure = curves_html_figure(curves, states, best=9, metric="val_loss", names=names,
                                best_value=0.1234)
    assert len(figure.data) == 60  # pruned trials included
    assert len({trace.line.color for trace in figure.data}) == 60  # no colour repeats
    by_name = {trace.name: trace for trace in figure.data}
    assert by_name["t001 0.1 adam d3"].line.dash == "dash"  # pruned
    assert by_name["t005 0.1 adam d3"].line.dash == "dot"  # failed
    assert by_name["t009 0.1 adam d3"].line.width > by_name["t003 0.1 adam d3"].line.width
    assert "t001 0.1 adam d3" in by_name["t001 0.1 adam d3"].hovertemplate
    assert figure.layout.yaxis.title.text == "val_loss"
    assert "best: trial 9 (0.1234)" in figure.layout.title.text


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
