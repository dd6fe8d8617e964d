"""Issue 29 item 2: a trial costs what its training costs.

A sweep trial renders its evaluation figures only inside its study's running top k
(`evaluation.figures_top_k`), and the held-out losses come from the predictions the
evaluation makes anyway, equal to `model.evaluate`'s."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pytest

from search.sweep_context import SweepTrial
from search.tracking import tags as tag_keys
from tests.conftest import TINY_RUN

FIGURES = {"evaluation/val_confusion.png", "evaluation/val_roc_pr.png",
           "evaluation/test_confusion.png", "evaluation/test_roc_pr.png",
           "evaluation/calibration.png", "curves/loss_accuracy.png"}
JSONS = {"evaluation/val_confusion.json", "evaluation/val_classification_report.json",
         "evaluation/test_confusion.json", "evaluation/test_classification_report.json",
         "evaluation/test_intervals.json", "evaluation/calibration.json",
         "evaluation/threshold.json"}


def completed(study: optuna.Study, value: float, x: float, **user_attrs: Any) -> None:
    """A COMPLETE trial of `study` with objective `value` and param x."""
    study.add_trial(optuna.trial.create_trial(
        params={"x": x}, distributions={"x": optuna.distributions.FloatDistribution(0, 10)},
        value=value, user_attrs=user_attrs))


def test_beaten_by_counts_distinct_own_better_trials():
    study = optuna.create_study(direction="minimize")
    completed(study, 0.1, 1.0)
    completed(study, 0.1, 1.0)  # a repeat of that configuration: counted once
    completed(study, 0.2, 2.0)
    completed(study, 0.05, 3.0, warm_start_from={"study": "old", "number": 0})  # a copy
    completed(study, 0.5, 4.0)  # the same as this trial's value: not better
    completed(study, 0.9, 5.0)  # worse
    trial = SweepTrial(study.ask(), 6, "s", "TPESampler", "NopPruner")
    assert trial.beaten_by([0.5]) == 2
    assert trial.beaten_by([0.15]) == 1
    assert trial.beaten_by([0.01]) == 0
    maximize = optuna.create_study(direction="maximize")
    completed(maximize, 0.9, 1.0)
    assert SweepTrial(maximize.ask(), 1, "s", "", "").beaten_by([0.8]) == 1
    assert SweepTrial(maximize.ask(), 2, "s", "", "").beaten_by([0.95]) == 0


def test_beaten_by_counts_dominating_trials_with_several_objectives():
    study = optuna.create_study(directions=["minimize", "maximize"])
    for i, values in enumerate([(0.1, 0.9), (0.1, 0.5), (0.3, 0.95)]):
        study.add_trial(optuna.trial.create_trial(
            params={"x": float(i)},
            distributions={"x": optuna.distributions.FloatDistribution(0, 10)},
            values=list(values)))
    trial = SweepTrial(study.ask(), 3, "s", "", "")
    assert trial.beaten_by([0.2, 0.6]) == 1  # only (0.1, 0.9) is better in both
    assert trial.beaten_by([0.05, 0.99]) == 0  # on the front


def trial_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, compose_cfg: Any,
              better: int, name: str) -> tuple[Any, set[str]]:
    """train() as a sweep worker runs it, for a trial of a study that already has `better`
    COMPLETE trials with a perfect val_loss (0.0); the run and its artifact paths."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from search.training.trainer import train

    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name=name, storage=storage)
    for i in range(better):
        completed(study, 0.0, float(i))
    asked = study.ask()
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    for key, value in {"MLFLOW_TRACKING_URI": uri, "OPTUNA_SWEEPER_STORAGE": storage,
                       "OPTUNA_SWEEPER_STUDY": name,
                       "OPTUNA_SWEEPER_TRIAL_ID": str(asked._trial_id),
                       "OPTUNA_SWEEPER_TRIAL_NUMBER": str(asked.number)}.items():
        monkeypatch.setenv(key, value)
    train(compose_cfg(*TINY_RUN, "evaluation.figures_top_k=2", "tracking.experiment=figs",
                      f"tracking.artifact_root={(tmp_path / 'artifacts').as_uri()}"),
          output_dir=tmp_path / name)
    client = MlflowClient(uri)
    (run,) = client.search_runs([mlflow.get_experiment_by_name("figs").experiment_id])

    def paths(folder: str = "") -> set[str]:
        out: set[str] = set()
        for item in client.list_artifacts(run.info.run_id, folder):
            out |= paths(item.path) if item.is_dir else {item.path}
        return out

    return run, paths()


@pytest.mark.slow
def test_trial_outside_the_running_top_k_logs_every_json_and_no_png(
        tmp_path, monkeypatch, compose_cfg):
    run, paths = trial_run(tmp_path, monkeypatch, compose_cfg, better=2, name="outside")
    assert paths >= JSONS, sorted(JSONS - paths)
    assert not {p for p in paths if p.endswith(".png")}, sorted(paths)
    reason = run.data.tags[tag_keys.FIGURES_SKIPPED]
    assert "outside the running top 2" in reason and "2 distinct" in reason, reason
    assert "eval_test_roc_auc" in run.data.metrics and "objective" in run.data.metrics
    assert run.data.tags.get("best_model_uri")  # the model is logged as for every trial


@pytest.mark.slow
def test_trial_inside_the_running_top_k_renders_its_figures(tmp_path, monkeypatch, compose_cfg):
    run, paths = trial_run(tmp_path, monkeypatch, compose_cfg, better=1, name="inside")
    assert paths >= FIGURES | JSONS, sorted((FIGURES | JSONS) - paths)
    assert tag_keys.FIGURES_SKIPPED not in run.data.tags


def fitted(binary: bool, l2: float) -> tuple[Any, Any, np.ndarray]:
    """A small real Keras model (L2 on its kernels) fitted one epoch on random images."""
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(96, 8, 8, 1)).astype("float32")
    y = (x.mean(axis=(1, 2, 3)) > 0).astype("int64") if binary else rng.integers(0, 3, 96)
    reg = keras.regularizers.L2(l2)
    model = keras.Sequential([
        keras.Input((8, 8, 1)), keras.layers.Conv2D(4, 3, kernel_regularizer=reg),
        keras.layers.Flatten(),
        keras.layers.Dense(1 if binary else 3, activation="sigmoid" if binary else "softmax",
                           kernel_regularizer=reg)])
    model.compile("adam", "binary_crossentropy" if binary else
                  "sparse_categorical_crossentropy")
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(32)
    model.fit(dataset, epochs=1, verbose=0, shuffle=False)
    return model, dataset, y


@pytest.mark.parametrize("binary", [True, False])
@pytest.mark.parametrize("l2", [0.0, 0.05])
def test_heldout_loss_from_predictions_equals_evaluate(binary, l2):
    from search.evaluation.evaluate_run import TRUSTED_PROBABILITY, heldout_loss, predict_split

    model, dataset, y = fitted(binary, l2)
    scores = predict_split(model, dataset)
    truth = np.where(y == 1, scores, 1 - scores) if binary else scores[np.arange(len(y)), y]
    assert truth.min() >= TRUSTED_PROBABILITY  # the predictions' path, not Keras' fallback
    expected = model.evaluate(dataset, verbose=0, return_dict=True)["loss"]
    assert heldout_loss(model, dataset, y, scores) == pytest.approx(expected, rel=1e-5)


@pytest.mark.slow
def test_heldout_loss_equals_evaluate_on_a_trained_trial(trained_store, compose_cfg):
    """The trial's own best checkpoint, evaluated as best_model does (float32, its loss),
    before and after the calibration is folded into its output layer."""
    import keras
    from hydra.utils import instantiate

    from models.precision import as_float32
    from search.evaluation import calibration as cal
    from search.evaluation.evaluate_run import heldout_loss, predict_split

    cfg = compose_cfg(*TINY_RUN, "seed=3")
    data = instantiate(cfg.data, seed=3, _convert_="all")
    model = as_float32(keras.models.load_model(trained_store.good_checkpoint, compile=False))
    model.compile(loss="binary_crossentropy")
    for dataset, y in ((data.val, data.y_val), (data.test, data.y_test)):
        scores = predict_split(model, dataset)
        expected = model.evaluate(dataset, verbose=0, return_dict=True)["loss"]
        assert heldout_loss(model, dataset, y, scores) == pytest.approx(expected, rel=1e-5)
    calibration = cal.fit_calibration(data.y_val, predict_split(model, data.val), "temperature")
    assert cal.fold_into_output(model, calibration)
    scores = predict_split(model, data.test)
    expected = model.evaluate(data.test, verbose=0, return_dict=True)["loss"]
    assert heldout_loss(model, data.test, data.y_test, scores) == pytest.approx(expected,
                                                                                rel=1e-5)


def test_calibration_nll_is_scikit_learns_log_loss():
    """The temperature fit's NLL, computed directly, is still `log_loss` (with its clipping)."""
    from sklearn.metrics import log_loss

    from search.evaluation import calibration as cal

    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 200)
    p = np.concatenate([rng.uniform(0, 1, 196), [0.0, 1.0, 1e-9, 1 - 1e-9]])
    assert cal.nll(y, p) == pytest.approx(
        log_loss(y, np.clip(p, cal.EPS, 1 - cal.EPS), labels=[0, 1]), rel=1e-12)
    k = rng.integers(0, 4, 200)
    probs = rng.dirichlet(np.ones(4) * 0.3, 200)
    assert cal.nll(k, probs) == pytest.approx(log_loss(k, probs, labels=[0, 1, 2, 3]),
                                              rel=1e-12)
