"""The sweep report's plots name the objective, show pruned trials, caveat thin importances
and link trials to their MLflow runs (real Optuna studies, real files)."""

from __future__ import annotations

import re
from pathlib import Path

import optuna
import pytest

from search.sweep import report

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _study(complete: int, pruned: int, params: int = 3) -> optuna.Study:
    """A study named like the sweep's (`val_loss`), with pruned trials that reported epochs."""
    study = optuna.create_study(study_name="s", direction="minimize")
    study.set_metric_names(["val_loss"])

    def objective(trial: optuna.Trial) -> float:
        xs = [trial.suggest_float(f"x{i}", 0.0, 1.0) for i in range(params)]
        trial.set_user_attr("mlflow_run_id", f"run{trial.number}")
        trial.set_user_attr("mlflow_run_url", f"http://ui.example:8080/#/runs/run{trial.number}")
        for epoch in range(3):
            trial.report(sum(xs) + 1.0 / (epoch + 1), epoch)
        if trial.number >= complete:
            raise optuna.TrialPruned
        return sum(xs)

    study.optimize(objective, n_trials=complete + pruned)
    return study


@pytest.fixture(scope="module")
def page(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    folder = tmp_path_factory.mktemp("report")
    report.write_report(_study(complete=12, pruned=8), folder)
    return folder, (folder / "sweep_report.html").read_text()


def test_axes_name_the_objective(page: tuple[Path, str]) -> None:
    _, text = page
    assert "Objective Value" not in text
    assert '"title":{"text":"val_loss"}' in text.replace(" ", "")
    assert "reported val_loss" in text  # the intermediate values' axis


def test_history_shows_pruned_trials(page: tuple[Path, str]) -> None:
    folder, text = page
    assert "pruned (last reported val_loss)" in text
    assert (folder / "optimization_history.png").stat().st_size > 0
    points = report.pruned_points(_study(complete=2, pruned=2))
    assert [n for n, _ in points] == [2, 3] and all(v > 0 for _, v in points)


def test_importances_carry_a_caveat(page: tuple[Path, str]) -> None:
    _, text = page
    assert ("fitted on 12 complete trials over 3 parameters: indicative only "
            "(solid from about 30)") in text
    assert report.importance_caveat(_study(complete=30, pruned=0, params=2)) is None


def test_importances_left_out_below_the_minimum(tmp_path: Path) -> None:
    written = report.write_report(_study(complete=3, pruned=2), tmp_path)
    text = (tmp_path / "sweep_report.html").read_text()
    assert "not fitted on 3 complete trial(s): shown from 5" in text
    assert tmp_path / "param_importances.png" not in written
    assert "plotly.js" in text or "Plotly" in text  # plotly.js still embedded once


def test_trials_link_to_their_runs(page: tuple[Path, str]) -> None:
    _, text = page
    links = re.findall(r"<a href='([^']+)'[^>]*>(run\d+)</a>", text)
    assert len(links) == report.LINKED_TRIALS
    assert all(url.endswith(run) for url, run in links)
    best = min(range(12), key=lambda n: _value(text, n))
    assert links[0][1] == f"run{best}"  # best first


def _value(text: str, number: int) -> float:
    match = re.search(rf"<tr><td>{number}</td><td>complete</td><td>([^<]+)</td>", text)
    return float(match.group(1)) if match else float("inf")
