"""Threshold rules and metrics on hand-checkable predictions."""

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from search.evaluation import metrics as ev

Y = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1, 1])
S = np.array([0.05, 0.2, 0.45, 0.7, 0.4, 0.6, 0.8, 0.85, 0.9, 0.95])


def test_max_f1_threshold_maximises_f1():
    t = ev.choose_threshold(Y, S, "max_f1")
    f1_at = ev.evaluate_split("val", Y, S, ["n", "p"], t).metrics["f1"]
    for other in np.unique(S):
        assert f1_at >= ev.evaluate_split("val", Y, S, ["n", "p"], other).metrics["f1"] - 1e-12
    assert t == pytest.approx(0.4)  # all six positives caught with two false alarms: F1 0.857


def test_youden_threshold():
    # tpr - fpr: at 0.6 → 5/6 - 1/4 = 0.583; at 0.4 → 1 - 2/4 = 0.5; at 0.8 → 4/6 - 0 = 0.667
    assert ev.choose_threshold(Y, S, "youden") == pytest.approx(0.8)


@pytest.mark.parametrize(("target", "expected"), [(1.0, 0.4), (0.8, 0.6), (0.5, 0.85)])
def test_min_sensitivity_takes_highest_threshold_reaching_target(target, expected):
    t = ev.choose_threshold(Y, S, "min_sensitivity", target)
    assert t == pytest.approx(expected)
    assert ev.evaluate_split("val", Y, S, ["n", "p"], t).metrics["sensitivity"] >= target


def test_bad_rule_and_single_class_raise():
    with pytest.raises(ValueError, match="threshold_rule"):
        ev.choose_threshold(Y, S, "median")
    with pytest.raises(ValueError, match="one class"):
        ev.choose_threshold(np.ones(4), np.linspace(0, 1, 4))


def test_binary_metrics_and_confusion():
    r = ev.evaluate_split("test", Y, S, ["normal", "pneumonia"], 0.5, loss=0.3)
    # predictions ≥ 0.5: [0,0,0,1,0,1,1,1,1,1] → tn 3 fp 1 fn 1 tp 5
    assert r.confusion.tolist() == [[3, 1], [1, 5]]
    assert r.metrics["sensitivity"] == pytest.approx(5 / 6)
    assert r.metrics["specificity"] == pytest.approx(3 / 4)
    assert r.metrics["roc_auc"] == pytest.approx(roc_auc_score(Y, S))
    assert r.metrics["loss"] == 0.3
    assert r.report["pneumonia"]["support"] == 6


def test_multiclass_metrics_by_argmax():
    y = np.array([0, 1, 2, 2])
    p = np.array([[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.1, 0.2, 0.7], [0.5, 0.2, 0.3]])
    r = ev.evaluate_split("val", y, p, ["normal", "bacteria", "virus"])
    assert r.confusion.tolist() == [[1, 0, 0], [0, 1, 0], [1, 0, 1]]
    assert r.metrics["accuracy"] == pytest.approx(0.75)
    assert 0.0 <= r.metrics["roc_auc"] <= 1.0


def test_positive_scores_squeezes_single_unit():
    assert ev.positive_scores(np.array([[0.2], [0.9]])).shape == (2,)
    assert ev.positive_scores(np.ones((3, 3)) / 3).shape == (3, 3)


def test_figures_render():
    r = ev.evaluate_split("val", Y, S, ["normal", "pneumonia"], 0.5)
    assert ev.confusion_figure(r).axes
    assert len(ev.roc_pr_figure("val", Y, S, ["normal", "pneumonia"]).axes) == 2
    fig = ev.history_figure({"loss": [1, 0.5], "val_loss": [1.1, 0.7], "accuracy": [0.5, 0.8]})
    assert len(fig.axes) == 2


def test_roc_pr_axes_name_the_class_not_a_label_number():
    binary = ev.roc_pr_figure("val", Y, S, ["normal", "pneumonia"])
    assert binary.axes[0].get_ylabel() == "true positive rate (pneumonia)"
    y3 = np.array([0, 1, 2, 0, 1, 2])
    p3 = np.eye(3)[[0, 1, 2, 1, 1, 2]] * 0.8 + 0.2 / 3
    labels = [ax.get_xlabel() + ax.get_ylabel()
              for ax in ev.roc_pr_figure("val", y3, p3, ["a", "b", "c"]).axes]
    assert all("Positive label" not in text for text in labels)
    assert "each class vs the rest" in labels[0]


def test_multiclass_names_say_macro_and_per_class_values_are_hand_checked():
    y = np.array([0, 1, 2, 2])
    p = np.array([[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.1, 0.2, 0.7], [0.5, 0.2, 0.3]])
    m = ev.evaluate_split("val", y, p, ["Normal", "bacteria", "Viral pneumonia"]).metrics
    for binary_only in ("sensitivity", "specificity", "precision", "recall", "f1"):
        assert binary_only not in m  # a K-class average is never passed off as one value
    # the second virus image is called normal: virus recall 1/2, normal precision 1/2
    assert m["recall_normal"] == 1.0 and m["recall_bacteria"] == 1.0
    assert m["recall_viral_pneumonia"] == pytest.approx(0.5)
    assert m["precision_normal"] == pytest.approx(0.5)
    assert m["f1_viral_pneumonia"] == pytest.approx(2 / 3)
    assert m["macro_recall"] == pytest.approx((1 + 1 + 0.5) / 3)
    assert m["macro_precision"] == pytest.approx((0.5 + 1 + 1) / 3)
    # specificity of each class: normal 2/3 (a virus called normal), bacteria 1, virus 1
    assert m["macro_specificity"] == pytest.approx((2 / 3 + 1 + 1) / 3)
    assert m["roc_auc"] == pytest.approx(roc_auc_score(y, p, multi_class="ovr"))
    assert ev.task_metric("sensitivity", 3) == "macro_recall"
    assert ev.task_metric("sensitivity", 2) == "sensitivity"
    assert ev.task_metric("roc_auc", 3) == "roc_auc"
    assert "macro recall 0.8333" in ev.headline(m)


def test_multiclass_class_missing_from_the_split_is_nan_not_a_number():
    y = np.array([0, 0, 1, 1])  # no virus image in this split
    p = np.array([[0.8, 0.1, 0.1], [0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.1, 0.8, 0.1]])
    m = ev.evaluate_split("val", y, p, ["normal", "bacteria", "virus"]).metrics
    assert np.isnan(m["recall_virus"]) and np.isnan(m["roc_auc"]) and np.isnan(m["macro_recall"])
    assert m["recall_normal"] == 1.0 and m["accuracy"] == 1.0


def test_deployment_prevalence_moves_only_the_prevalence_dependent_rule():
    # Val is 60 % positive. Re-weighted to 20 % (positives x 1/3, negatives x 2), F1 at each
    # threshold is: 0.4 → 2·2/(4+4) = 0.50; 0.6 → (10/3)/(10/3+2+1/3) = 0.588;
    # 0.8 → (8/3)/(8/3+2/3) = 0.80; 0.85 → 2/(2+1) = 0.667: false alarms now cost more.
    assert ev.choose_threshold(Y, S, "max_f1", prevalence=0.2) == pytest.approx(0.8)
    assert ev.choose_threshold(Y, S, "max_f1", prevalence=0.6) == pytest.approx(0.4)  # as val
    # Youden's J and a sensitivity target do not depend on prevalence
    assert ev.choose_threshold(Y, S, "youden", prevalence=0.2) == pytest.approx(0.8)
    assert ev.choose_threshold(Y, S, "min_sensitivity", 0.8, prevalence=0.2) == pytest.approx(0.6)
    with pytest.raises(ValueError, match="deployment_prevalence=1.0"):
        ev.choose_threshold(Y, S, "max_f1", prevalence=1.0)
