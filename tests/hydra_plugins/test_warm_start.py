"""Warm start (``hydra.sweeper.warm_start``): real SQLite studies, real Optuna, and real sweeps
of the tiny test app (``app/app.py``: ``(x - 1)^2 + y^2``, x in [-2, 2], y int in [-2, 2]).

The source studies are built directly with Optuna: a known set of configs (enqueued, so the
test knows which fit the app's space) and the app's own objective.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.distributions import FloatDistribution, IntDistribution, distribution_to_json

from hydra_plugins.optuna_pruning_sweeper import _warm_start as ws
from hydra_plugins.optuna_pruning_sweeper._study import open_study

APP = Path(__file__).parent / "app" / "app.py"
REPO = Path(__file__).resolve().parents[2]

# (x, y, extra params): value (x - 1)^2 + y^2. The app's space is x in [-2, 2], y in [-2, 2].
FITTING = [(1.0, 0, {}), (0.5, 0, {}), (1.0, 1, {}), (1.5, -1, {}), (-1.0, 0, {})]
OUTSIDE = [(3.0, 0, {}), (1.0, 3, {}), (1.0, 0, {"w": 0.3})]  # x, y out; 'w' not in the space
TOP_2 = [{"x": 1.0, "y": 0}, {"x": 0.5, "y": 0}]  # the two best fitting configs


def make_source(url: str, name: str = "src", direction: str = "minimize",
                metric: str | None = "value") -> optuna.Study:
    """A finished study over a wider space than the app's, with curves (3 reports each)."""
    study = optuna.create_study(study_name=name, storage=url, direction=direction)
    if metric:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names([metric])
    for x, y, extra in FITTING + OUTSIDE:
        study.enqueue_trial({"x": x, "y": y, **extra})
        trial = study.ask()
        x = trial.suggest_float("x", -4.0, 4.0)
        y = trial.suggest_int("y", -4, 4)
        if extra:
            trial.suggest_float("w", 0.0, 1.0)
        value = (x - 1.0) ** 2 + y**2
        for step in range(3):
            trial.report(value + 3 - step, step)
        study.tell(trial, value)
    failed = study.ask()  # a FAIL trial is never copied
    failed.suggest_float("x", -4.0, 4.0)
    study.tell(failed, state=optuna.trial.TrialState.FAIL)
    return study


def app_fingerprint() -> dict:
    """The app's search space as the sweeper stores it."""
    return {
        "params": {"x": {"distribution": distribution_to_json(FloatDistribution(-2.0, 2.0))},
                   "y": {"distribution": distribution_to_json(IntDistribution(-2, 2))}},
        "fixed": {},
        "directions": ["minimize"],
    }


def open_new(url: str, request: ws.Request | None, name: str = "new",
             directions: tuple[str, ...] = ("minimize",)) -> optuna.Study:
    storage = optuna.storages.RDBStorage(url)
    study, _ = open_study(storage, name, app_fingerprint(), optuna.pruners.NopPruner(),
                          list(directions), False, request)
    return study


def copies(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return [t for t in study.get_trials(deepcopy=False) if ws.is_copy(t)]


def queued(study: optuna.Study) -> list[dict]:
    return [t.system_attrs["fixed_params"] for t in study.get_trials(deepcopy=False)
            if ws.TOP_ATTR in t.user_attrs]


# --- the study-opening step, on real SQLite storages ------------------------------------------


def test_fitting_trials_are_added_and_the_best_queued_first(tmp_path, caplog):
    src_url = f"sqlite:///{tmp_path}/nightly.db"
    make_source(src_url, "nightly-2026-12-06")
    url = f"sqlite:///{tmp_path}/optuna.db"  # another storage than the source's
    request = ws.Request((ws.Source("nightly-2026-12-06", src_url),), top_k=2)
    with caplog.at_level(logging.INFO):
        study = open_new(url, request)

    added = copies(study)
    assert sorted((t.params["x"], t.params["y"]) for t in added) == sorted(
        (x, y) for x, y, _ in FITTING)
    assert all(t.state.name == "COMPLETE" for t in added)
    # values and curves kept; distributions are the current space's, not the source's
    one = next(t for t in added if t.params == {"x": 0.5, "y": 0})
    assert one.value == pytest.approx(0.25)
    assert one.intermediate_values == {0: 3.25, 1: 2.25, 2: 1.25}
    assert one.distributions["x"] == FloatDistribution(-2.0, 2.0)
    assert one.user_attrs[ws.COPY_ATTR]["study"] == "nightly-2026-12-06"
    assert not one.system_attrs  # no retry history / rungs naming the source's numbers
    assert queued(study) == TOP_2  # best first, only fitting configs
    line = [r.getMessage() for r in caplog.records if "warm start:" in r.getMessage()]
    assert line == ["warm start: 5 trials from 'nightly-2026-12-06' added, 3 left out (1x "
                    "param 'x' outside the current space; 1x param 'y' outside the current "
                    "space; 1x param 'w' not in the current space); 2 best queued first"]
    recorded = study.user_attrs[ws.SOURCES_ATTR]
    assert recorded == [{"entry": "nightly-2026-12-06", "storage": src_url,
                         "study": "nightly-2026-12-06", "added": 5, "left_out": 3,
                         "enqueued": 2}]


def test_reopening_adds_nothing_twice(tmp_path):
    url = f"sqlite:///{tmp_path}/optuna.db"
    make_source(url)
    request = ws.Request((ws.Source("src"),), top_k=2)
    first = open_new(url, request)
    n = len(first.get_trials(deepcopy=False))
    again = open_new(url, request)
    assert len(again.get_trials(deepcopy=False)) == n == 5 + 2
    assert len(again.user_attrs[ws.SOURCES_ATTR]) == 1


def test_a_study_with_trials_of_its_own_is_not_changed(tmp_path, caplog):
    url = f"sqlite:///{tmp_path}/optuna.db"
    make_source(url)
    study = open_new(url, None)
    study.tell(study.ask({"x": FloatDistribution(-2, 2)}), 1.0)
    with caplog.at_level(logging.INFO):
        again = open_new(url, ws.Request((ws.Source("src"),), top_k=2))
    assert len(again.get_trials(deepcopy=False)) == 1
    assert "already has trials of its own" in caplog.text


def test_a_half_done_warm_start_is_completed_exactly(tmp_path):
    """A crash after the queueing and some copies: the re-run adds the rest, none twice."""
    url = f"sqlite:///{tmp_path}/optuna.db"
    make_source(url)
    request = ws.Request((ws.Source("src"),), top_k=2)
    full = len(open_new(url, request, name="reference").get_trials(deepcopy=False))
    study = open_new(url, None, name="crashed")
    src = optuna.load_study(study_name="src", storage=url)
    fits, _ = ws._fitting(src, ws._space(app_fingerprint()),
                          {"study": "src", "storage": url})
    for t in ws._top(fits, study.directions, 2):
        study.enqueue_trial(dict(t.params), user_attrs={ws.TOP_ATTR: t.user_attrs[ws.COPY_ATTR]})
    study.add_trials(fits[:2])
    again = open_new(url, request, name="crashed")
    assert len(again.get_trials(deepcopy=False)) == full
    assert len(copies(again)) == len(FITTING)


def test_a_pattern_takes_the_newest_finished_study(tmp_path, caplog):
    url = f"sqlite:///{tmp_path}/optuna.db"
    with caplog.at_level(logging.INFO):
        cold = open_new(url, ws.Request((ws.Source("nightly-*"),), top_k=1), name="nightly-1")
    assert not cold.get_trials(deepcopy=False)
    assert "no earlier study matching 'nightly-*' with a finished trial" in caplog.text
    make_source(url, "nightly-2")
    optuna.create_study(study_name="nightly-3", storage=url)  # newest, but nothing finished
    study = open_new(url, ws.Request((ws.Source("nightly-*"),), top_k=1), name="nightly-4")
    assert {t.user_attrs[ws.COPY_ATTR]["study"] for t in copies(study)} == {"nightly-2"}
    assert queued(study) == TOP_2[:1]


def test_the_best_trial_is_never_a_copy(tmp_path):
    url = f"sqlite:///{tmp_path}/optuna.db"
    make_source(url)
    study = open_new(url, ws.Request((ws.Source("src"),), top_k=0))
    trials = study.get_trials(deepcopy=False)
    assert ws.own_best(trials, study.directions) == []
    assert study.best_trial.value == 0.0  # Optuna's own view includes the copies
    own = study.ask({"x": FloatDistribution(-2, 2)})
    study.tell(own, 2.0)
    best = ws.own_best(study.get_trials(deepcopy=False), study.directions)
    assert [t.number for t in best] == [own.number]


@pytest.mark.parametrize(
    ("make", "entry", "expected"),
    [
        (None, "nope", "study 'nope' does not exist in"),
        (dict(direction="maximize"), "src", "has directions ['maximize'], this sweep's are "
                                            "['minimize']"),
        (dict(metric="accuracy"), "src", "has objective ['accuracy'], this sweep's is "
                                         "['value']"),
    ],
)
def test_an_unusable_source_is_refused_by_name_before_any_change(tmp_path, make, entry,
                                                                   expected):
    url = f"sqlite:///{tmp_path}/optuna.db"
    if make is not None:
        make_source(url, **make)
    request = ws.Request((ws.Source(entry),), top_k=2, metric_names=("value",))
    with pytest.raises(ws.WarmStartError) as error:
        open_new(url, request)
    message = str(error.value)
    assert expected in message and "hydra.sweeper.warm_start" in message
    assert f"'{entry}'" in message and url in message
    assert not optuna.load_study(study_name="new", storage=url).get_trials()


def test_another_storage_is_named_redacted_and_never_created(tmp_path):
    missing = tmp_path / "typo.db"
    request = ws.Request((ws.Source("src", f"sqlite:///{missing}"),), top_k=1)
    with pytest.raises(ws.WarmStartError, match="does not exist"):
        open_new(f"sqlite:///{tmp_path}/optuna.db", request)
    assert not missing.exists()
    secret = "postgresql+psycopg://sweeps:hunter2pw@127.0.0.1:1/optuna"
    with pytest.raises(ws.WarmStartError) as error:
        open_new(f"sqlite:///{tmp_path}/optuna.db", ws.Request((ws.Source("src", secret),), 1))
    assert "hunter2pw" not in str(error.value) and "sweeps:***@127.0.0.1" in str(error.value)


@pytest.mark.parametrize(
    ("studies", "top_k", "match"),
    [
        ([{"name": "x"}], 3, "each entry is a study name"),
        (["x"], -1, "top_k must be >= 0"),
    ],
)
def test_a_malformed_setting_is_refused(studies, top_k, match):
    setting = type("Setting", (), {"studies": studies, "top_k": top_k})()
    with pytest.raises(ws.WarmStartError, match=match):
        ws.request_from(setting)


def test_the_setting_reads_names_and_storages():
    setting = type("Setting", (), {"studies": ["a", {"study_name": "b",
                                                     "storage": "sqlite:///rel.db"}],
                                   "top_k": 2})()
    request = ws.request_from(setting, ["val_loss"])
    assert request.sources[0] == ws.Source("a")
    assert request.sources[1].url == f"sqlite:///{os.path.abspath('rel.db')}"
    assert request.top_k == 2 and request.metric_names == ("val_loss",)
    assert ws.request_from(type("Setting", (), {"studies": [], "top_k": 3})()) is None
    with pytest.raises(ws.WarmStartError, match="engine=optuna"):
        ws.request_from(setting, engine="keras_tuner")


# --- real sweeps of the test app ----------------------------------------------------------------


def sweep(tmp: Path, url: str, run: int, *overrides: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, str(APP), "-m", f"hydra.sweeper.storage={url}",
         "hydra.sweeper.study_name=new", f"hydra.sweep.dir={tmp}/sweep{run}",
         "hydra.sweeper.n_trials=3", "hydra.sweeper.n_jobs=1", *overrides],
        cwd=tmp, env=env, capture_output=True, text=True, timeout=180,
    )


@pytest.mark.slow
def test_a_sweep_starts_from_the_fitting_trials_and_runs_the_best_first(tmp_path):
    src_url = f"sqlite:///{tmp_path}/last_night.db"
    make_source(src_url, "nightly-1")
    url = f"sqlite:///{tmp_path}/optuna.db"
    warm = (f"hydra.sweeper.warm_start.studies=[{{study_name: nightly-1, storage: '{src_url}'}}]",
            "hydra.sweeper.warm_start.top_k=2")
    proc = sweep(tmp_path, url, 1, *warm)
    assert proc.returncode == 0, proc.stderr
    assert "warm start: 5 trials from 'nightly-1' added, 3 left out" in proc.stdout

    study = optuna.load_study(study_name="new", storage=url)
    trials = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
    own = ws.own_trials(trials)
    assert len(copies(study)) == len(FITTING)
    # the copies use no budget: n_trials=3 trials of its own ran, the top 2 first
    assert [t.state.name for t in own] == ["COMPLETE"] * 3
    assert [t.params for t in own[:2]] == TOP_2
    assert [ws.TOP_ATTR in t.user_attrs for t in own] == [True, True, False]
    summary = yaml.safe_load((tmp_path / "sweep1" / "optuna_summary.yaml").read_text())
    assert summary["counted"] == 3
    assert summary["best"]["number"] == own[0].number  # x=1, y=0: value 0 (never a copy)

    again = sweep(tmp_path, url, 2, *warm)  # the same command: nothing added, nothing run
    assert again.returncode == 0, again.stderr
    assert "warm start:" not in again.stdout + again.stderr
    assert len(optuna.load_study(study_name="new", storage=url).trials) == len(trials)


@pytest.mark.slow
@pytest.mark.parametrize(("direction", "entry", "expected"), [
    ("minimize", "nope", "study 'nope' does not exist in"),
    ("maximize", "src", "study 'src' in {url} has directions ['maximize']"),
])
def test_a_sweep_refuses_an_unusable_source_before_any_trial(tmp_path, direction, entry,
                                                              expected):
    url = f"sqlite:///{tmp_path}/optuna.db"
    make_source(url, direction=direction)
    proc = sweep(tmp_path, url, 1, f"hydra.sweeper.warm_start.studies=[{entry}]")
    assert proc.returncode != 0
    assert expected.format(url=url) in proc.stderr and "hydra.sweeper.warm_start" in proc.stderr
    assert not optuna.load_study(study_name="new", storage=url).trials  # no trial ran
