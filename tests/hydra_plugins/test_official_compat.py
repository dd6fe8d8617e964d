"""The official hydra-optuna-sweeper's tests and examples, run against our sweeper.

The apps under ``official/`` are the official examples with only ``hydra/sweeper: optuna``
changed to ``optuna_pruning`` (plain Hydra tasks: no MLflow, TensorFlow or project code).
The assertions are the official ones, except where the README lists a deliberate
difference (``range`` ends are exclusive; ``n_trials`` counts the study's total on resume;
each failing trial's reason is logged as it happens).
"""

import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml

from tests.hydra_plugins.test_sweeper_e2e import sweep_env

OFFICIAL = Path(__file__).parent / "official"


def run_example(script: str, *args: str, cwd: Path, ok: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, str(OFFICIAL / script), "--multirun", *args],
        cwd=cwd, env=sweep_env(), capture_output=True, text=True, timeout=240,
    )
    if ok and proc.returncode != 0:
        pytest.fail(f"{script} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def results(sweep_dir: Path) -> dict:
    return yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())


def dominates(a: list[float], b: list[float]) -> bool:
    return all(x <= y for x, y in zip(a, b, strict=True)) and any(
        x < y for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("with_commandline", [True, False])
def test_sphere_example(with_commandline: bool, tmp_path: Path) -> None:
    storage = f"sqlite:///{tmp_path / 'test.db'}"
    args = [f"hydra.sweep.dir={tmp_path}", "hydra.job.chdir=True", "hydra.sweeper.n_trials=20",
            "hydra.sweeper.n_jobs=1", f"hydra.sweeper.storage={storage}",
            "hydra.sweeper.study_name=test-optuna-example", "hydra/sweeper/sampler=tpe",
            "hydra.sweeper.sampler.seed=123", "~z"]
    if with_commandline:
        args += ["x=choice(0, 1, 2)", "y=0", "+check_modules=true"]
    run_example("sphere.py", *args, cwd=tmp_path)
    returns = results(tmp_path)
    best = optuna.load_study(storage=storage, study_name="test-optuna-example").best_trial
    assert returns["name"] == "optuna"
    assert returns["best_params"]["x"] == best.params["x"]
    if with_commandline:  # the fixed y is no search parameter; the task saw no MLflow/TF
        assert "y" not in returns["best_params"] and "y" not in best.params
    else:
        assert returns["best_params"]["y"] == best.params["y"]
    assert returns["best_value"] == best.value
    assert returns["best_value"] <= 2.27  # the official TPE threshold (95th pct of seeds)


@pytest.mark.parametrize("num_trials", [10, 1])
def test_grid_sampler_example(num_trials: int, tmp_path: Path) -> None:
    run_example("sphere.py", "--config-name=test_grid", f"hydra.sweep.dir={tmp_path}",
                "hydra.job.chdir=False", f"hydra.sweeper.n_trials={num_trials}",
                "hydra.sweeper.n_jobs=1", cwd=tmp_path)
    returns = results(tmp_path)
    bv, bx, by, bz = (returns["best_value"], returns["best_params"]["x"],
                      returns["best_params"]["y"], returns["best_params"]["z"])
    if num_trials >= 8:  # the whole 2 x 2 x 2 grid ran (capped at its size)
        assert bv == 1 and abs(bx) == 1 and by == 0
        study = optuna.load_study(storage=f"sqlite:///{tmp_path / 'optuna.db'}",
                                  study_name="sphere")
        assert len(study.trials) == 8
    else:
        assert bx in [-1, 1] and by in [-1, 0]
    assert bz in ["foo", "bar"]


@pytest.mark.parametrize("with_commandline", [True, False])
def test_multi_objective_example(with_commandline: bool, tmp_path: Path) -> None:
    args = [f"hydra.sweep.dir={tmp_path}", "hydra.job.chdir=True", "hydra.sweeper.n_trials=20",
            "hydra.sweeper.n_jobs=1", "hydra/sweeper/sampler=random",
            "hydra.sweeper.sampler.seed=123"]
    if with_commandline:
        args += ["x=range(0, 5)", "y=range(0, 3)"]
    run_example("multi-objective.py", *args, cwd=tmp_path)
    returns = results(tmp_path)
    assert returns["name"] == "optuna" and returns["solutions"]
    steps = {0} if with_commandline else {0, 0.5}
    for a in returns["solutions"]:
        assert a["params"]["x"] % 1 in steps and a["params"]["y"] % 1 in steps
        assert len(a["values"]) == 2
        for b in returns["solutions"]:  # a Pareto front: no solution dominates another
            assert not dominates(a["values"], b["values"])
    study = optuna.load_study(storage=f"sqlite:///{tmp_path / 'optuna.db'}",
                              study_name="multi-objective")
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert len(complete) == 20
    front = [t.values for t in complete
             if not any(dominates(o.values, t.values) for o in complete)]
    assert sorted(map(tuple, front)) == sorted(tuple(s["values"]) for s in returns["solutions"])


def test_custom_search_space_example(tmp_path: Path) -> None:
    max_z_difference_from_x = 0.3
    run_example("custom-search-space-objective.py", f"hydra.sweep.dir={tmp_path}",
                "hydra.job.chdir=True", "hydra.sweeper.n_trials=20", "hydra.sweeper.n_jobs=1",
                "hydra/sweeper/sampler=random", "hydra.sweeper.sampler.seed=123",
                f"max_z_difference_from_x={max_z_difference_from_x}", cwd=tmp_path)
    returns = results(tmp_path)
    assert returns["name"] == "optuna"
    assert abs(returns["best_params"]["x"] - returns["best_params"]["z"]) \
        <= max_z_difference_from_x
    assert "+w" in returns["best_params"]  # the hook's own param reaches the results
    study = optuna.load_study(storage=f"sqlite:///{tmp_path / 'optuna.db'}",
                              study_name="custom-search-space")
    for t in study.trials:  # every trial got the hook's params, and the task used them
        assert {"x", "y", "z", "+w"} <= set(t.params)
        assert t.value == pytest.approx(sum(t.params[k] ** 2 for k in ("x", "y", "z", "+w")))


@pytest.mark.parametrize("max_failure_rate", [0.5, 1.0])
def test_failure_rate(max_failure_rate: float, tmp_path: Path) -> None:
    proc = run_example("sphere.py", f"hydra.sweep.dir={tmp_path}", "hydra.job.chdir=True",
                       "hydra.sweeper.n_trials=20", "hydra.sweeper.n_jobs=2",
                       "hydra/sweeper/sampler=random", "hydra.sweeper.sampler.seed=123",
                       f"hydra.sweeper.max_failure_rate={max_failure_rate}", "+error=true",
                       cwd=tmp_path, ok=False)
    error_string = "RuntimeError: cfg.error is True"
    if max_failure_rate < 1.0:  # the sweep raises, naming the cause
        assert proc.returncode != 0 and "Sweep stopped" in proc.stderr
        assert error_string in proc.stderr
    else:  # every trial failed, which this rate allows: no error (reasons were logged)
        assert proc.returncode == 0, proc.stderr
        summary = yaml.safe_load((tmp_path / "optuna_summary.yaml").read_text())
        assert summary["states"]["FAIL"] == 20
        assert not (tmp_path / "optimization_results.yaml").exists()  # no best to report


def test_resume_counts_the_study_total(tmp_path: Path) -> None:
    """Same storage and study twice: the second run continues to n_trials in total."""
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    common = [f"hydra.sweeper.storage={storage}", "hydra.sweeper.study_name=resumed"]
    run_example("sphere.py", f"hydra.sweep.dir={tmp_path}/a", "hydra.sweeper.n_trials=4",
                *common, cwd=tmp_path)
    run_example("sphere.py", f"hydra.sweep.dir={tmp_path}/b", "hydra.sweeper.n_trials=7",
                *common, cwd=tmp_path)
    study = optuna.load_study(storage=storage, study_name="resumed")
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 7
    assert results(tmp_path / "b")["best_value"] == study.best_value


def test_empty_space_callable_task_and_private_storage(tmp_path: Path) -> None:
    """No params: n_trials jobs of one config; a callable object task; storage null."""
    run_example("sphere.py", f"hydra.sweep.dir={tmp_path}/empty", "hydra.sweeper.params=null",
                "hydra.sweeper.n_trials=3", "x=3", cwd=tmp_path)
    study = optuna.load_study(storage=f"sqlite:///{tmp_path / 'empty' / 'optuna.db'}",
                              study_name="sphere")
    assert [t.value for t in study.trials] == [10.0, 10.0, 10.0]  # 3**2 + 1**2, three times
    assert not (tmp_path / "mlruns").exists()  # storage null: nothing outside the sweep dir

    run_example("callable_task.py", f"hydra.sweep.dir={tmp_path}/obj",
                "hydra.sweeper.n_trials=6", "x=choice(0, 2, 4)", cwd=tmp_path)
    returns = results(tmp_path / "obj")
    assert returns["best_params"]["x"] == 2 and returns["best_value"] == 0.0  # shift=2


def test_dry_run_samples_composes_and_checks_without_touching_the_study(tmp_path: Path) -> None:
    proc = run_example("sphere.py", f"hydra.sweep.dir={tmp_path}/ok", "hydra.sweeper.dry_run=5",
                       cwd=tmp_path)
    log = proc.stdout + proc.stderr
    assert log.count("ok   (") == 5 and "Dry run passed: 5 of 5" in log
    assert not (tmp_path / "ok" / "optuna.db").exists()  # nothing stored, nothing ran
    proc = run_example("sphere.py", f"hydra.sweep.dir={tmp_path}/bad", "hydra.sweeper.dry_run=8",
                       "hydra.sweeper.dry_run_check=checks.refuse_negative_x", "x=choice(-1, 1)",
                       cwd=tmp_path, ok=False)
    assert proc.returncode != 0
    assert "would fail" in proc.stderr and "x=-1 is negative" in proc.stderr
    assert not (tmp_path / "bad" / "optuna.db").exists()
