"""Sweeper building blocks without a sweep: counting, samplers, pruners, trial context."""

import importlib.util
import math
import threading
import time
from pathlib import Path

import optuna
import pytest
from hydra.core.config_store import ConfigStore
from optuna.trial import TrialState, create_trial

import hydra_plugins.optuna_pruning_sweeper.config  # noqa: F401 - registers the configs
from hydra_plugins.optuna_pruning_sweeper import _samplers as samplers
from hydra_plugins.optuna_pruning_sweeper import _storage as storage
from hydra_plugins.optuna_pruning_sweeper import _study as sweep_study
from hydra_plugins.optuna_pruning_sweeper import trial_context
from hydra_plugins.optuna_pruning_sweeper._distributions import parse_search_space
from hydra_plugins.optuna_pruning_sweeper._executors import _local as local
from hydra_plugins.optuna_pruning_sweeper._worker import resolve_task_function, values_from_return

APP_DIR = Path(__file__).parent / "app"


def _node(group: str, name: str):
    return ConfigStore.instance().load(f"hydra/sweeper/{group}/{name}.yaml").node


# --- counting rule ---------------------------------------------------------------------------


def test_count_toward_budget_skips_retried_failures_and_waiting():
    study = optuna.create_study()
    dist = {"x": optuna.distributions.FloatDistribution(0, 1)}

    def add(state, **system_attrs):
        study.add_trial(
            create_trial(
                state=state,
                value=0.0 if state == TrialState.COMPLETE else None,
                params={"x": 0.5},
                distributions=dist,
                system_attrs=system_attrs,
            )
        )

    add(TrialState.COMPLETE)  # 0 counted
    add(TrialState.PRUNED)  # 1 counted
    add(TrialState.FAIL)  # 2 retried by 5 -> not counted
    add(TrialState.FAIL)  # 3 counted (never retried)
    add(TrialState.RUNNING)  # 4 in flight -> counted
    add(TrialState.FAIL, failed_trial=2, retry_history=[2])  # 5 retry failed, retried by 6
    add(TrialState.WAITING, failed_trial=2, retry_history=[2, 5])  # 6 queued -> not counted
    trials = study.get_trials(deepcopy=False)
    assert sweep_study.retried_numbers(trials) == {2, 5}
    assert sweep_study.count_toward_budget(trials) == 4


def test_space_differences_name_the_keys():
    old = {**parse_search_space(["x=interval(0, 1)", "y=choice(a, b)", "e=3"]).fingerprint()}
    new = {**parse_search_space(["x=interval(0, 2)", "z=choice(a, b)", "e=4"]).fingerprint()}
    diffs = "\n".join(sweep_study.space_differences(old, new))
    assert "'x' changed" in diffs
    assert "'y' removed" in diffs
    assert "'z' added" in diffs
    assert "fixed: 'e' changed: e=3 -> e=4" in diffs
    assert sweep_study.space_differences(old, old) == []


def test_directions():
    assert sweep_study.directions_of("maximize") == ["maximize"]
    assert sweep_study.directions_of(["minimize", "maximize"]) == ["minimize", "maximize"]
    with pytest.raises(ValueError, match="minimize"):
        sweep_study.directions_of("down")


@pytest.mark.parametrize(
    ("value", "n", "expected"),
    [(0.5, 1, [0.5]), (3, 1, [3.0]), ([0.5], 1, [0.5]), ((1, 2.0), 2, [1.0, 2.0])],
)
def test_values_from_return(value, n, expected):
    assert values_from_return(value, n) == expected


@pytest.mark.parametrize(
    ("value", "n", "message"),
    [
        (float("nan"), 1, "non-finite"),
        (math.inf, 1, "non-finite"),
        ("abc", 1, "must return a float"),
        (None, 1, "must return a float"),
        (1.0, 2, "2 floats"),
        ((1.0, float("nan")), 2, "non-finite"),
    ],
)
def test_values_from_return_refuses(value, n, message):
    with pytest.raises(ValueError, match=message):
        values_from_return(value, n)


@pytest.mark.parametrize(
    ("visible", "expected"), [("0,1", ["0", "1"]), ("", []), ("-1", []), ("3", ["3"])]
)
def test_detect_gpus_from_cuda_visible_devices(monkeypatch, visible, expected):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    assert local.detect_gpus() == expected


def test_resolve_task_function_unwraps_hydra_main(monkeypatch):
    monkeypatch.syspath_prepend(str(APP_DIR))
    fn = resolve_task_function("app", "main")
    app = importlib.import_module("app")
    assert fn is app.main.__wrapped__
    with pytest.raises(RuntimeError, match="cannot find task function"):
        resolve_task_function("app", "nope")
    with pytest.raises(RuntimeError, match="inside a function"):
        resolve_task_function("app", "f.<locals>.g")


def test_ask_lock_excludes_across_instances(tmp_path):
    url = f"sqlite:///{tmp_path}/o.db"
    inside, overlaps = [0], []

    def worker():
        lock = storage.AskLock(url, "s")  # own open file: flock excludes like another process
        for _ in range(5):
            with lock():
                inside[0] += 1
                overlaps.append(inside[0])
                time.sleep(0.005)
                inside[0] -= 1
        lock.close()

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert max(overlaps) == 1
    assert (tmp_path / "o.db.ask.lock").exists()


# --- samplers and pruners by name -------------------------------------------------------------

SPACE = parse_search_space(["x=choice(0, 1)", "y=range(0, 3)"])


@pytest.mark.parametrize(
    ("name", "cls"),
    [
        ("tpe", optuna.samplers.TPESampler),
        ("random", optuna.samplers.RandomSampler),
        ("nsgaii", optuna.samplers.NSGAIISampler),
        ("grid", optuna.samplers.GridSampler),
        ("cmaes", optuna.samplers.CmaEsSampler),
        ("gp", optuna.samplers.GPSampler),
    ],
)
def test_sampler_by_name(name, cls):
    node = _node("sampler", name)
    assert "seed" in node
    needs = {"cmaes": ["cmaes"], "gp": ["torch", "scipy"]}.get(name, [])
    missing = [m for m in needs if importlib.util.find_spec(m) is None]
    if missing:
        with pytest.raises(ImportError, match=f"pip install {missing[0]}"):
            samplers.build_sampler(node, SPACE)
        return
    assert isinstance(samplers.build_sampler(node, SPACE), cls)


def test_sampler_seed_offset_and_tpe_options():
    node = _node("sampler", "tpe")
    node.seed = 7
    node.multivariate = True
    node.group = True
    sampler = samplers.build_sampler(node, SPACE, seed_offset=2)
    assert sampler._multivariate and sampler._group and sampler._constant_liar
    a = optuna.create_study(sampler=samplers.build_sampler(node, SPACE, seed_offset=0))
    b = optuna.create_study(sampler=samplers.build_sampler(node, SPACE, seed_offset=1))
    assert a.ask().suggest_float("x", 0, 1) != b.ask().suggest_float("x", 0, 1)


def test_grid_sampler_refuses_intervals():
    space = parse_search_space(["x=interval(0, 1)"])
    with pytest.raises(ValueError, match="grid sampler needs discrete params: 'x'"):
        samplers.build_sampler(_node("sampler", "grid"), space)
    assert samplers.grid_size(SPACE) == 6


@pytest.mark.parametrize(
    ("name", "cls"),
    [
        ("median", optuna.pruners.MedianPruner),
        ("successive_halving", optuna.pruners.SuccessiveHalvingPruner),
        ("hyperband", optuna.pruners.HyperbandPruner),
        ("nop", optuna.pruners.NopPruner),
        ("none", optuna.pruners.NopPruner),
    ],
)
def test_pruner_by_name(name, cls):
    assert isinstance(samplers.build_pruner(_node("pruner", name)), cls)


def test_sweeper_config_defaults():
    node = ConfigStore.instance().load("hydra/sweeper/optuna_pruning.yaml").node
    # trials_per_worker: reuse by default (issue 15); TF search spaces set it themselves
    assert node.n_trials == 20 and node.trials_per_worker is None and node.new_study is False
    assert node.storage is None and node.dry_run == 0 and node.custom_search_space is None
    assert node._target_.endswith("sweeper.OptunaPruningSweeper")


# --- trial context ----------------------------------------------------------------------------


def test_trial_context_outside_a_sweep(monkeypatch):
    for var in (trial_context.ENV_TRIAL_ID, trial_context.ENV_TRIAL_NUMBER):
        monkeypatch.delenv(var, raising=False)
    assert trial_context.current_trial() is None
    assert trial_context.trial_info() is None


def test_trial_context_rebuilds_the_running_trial(tmp_path, monkeypatch):
    url = f"sqlite:///{tmp_path}/o.db"
    study = optuna.create_study(study_name="ctx", storage=url)
    asked = study.ask()
    pruner = '{"_target_": "optuna.pruners.MedianPruner", "n_startup_trials": 0}'
    monkeypatch.setenv(trial_context.ENV_STORAGE, url)
    monkeypatch.setenv(trial_context.ENV_STUDY, "ctx")
    monkeypatch.setenv(trial_context.ENV_TRIAL_ID, str(asked._trial_id))
    monkeypatch.setenv(trial_context.ENV_TRIAL_NUMBER, str(asked.number))
    monkeypatch.setenv(trial_context.ENV_SAMPLER, "TPESampler")
    monkeypatch.setenv(trial_context.ENV_PRUNER, pruner)
    trial = trial_context.current_trial()
    assert trial is not None and trial.number == asked.number
    assert trial_context.current_trial() is trial  # cached per process
    assert isinstance(trial.study.pruner, optuna.pruners.MedianPruner)
    trial.report(1.5, 0)
    assert study.trials[0].intermediate_values == {0: 1.5}
    assert trial_context.trial_info() == {
        "study": "ctx",
        "trial_number": asked.number,
        "sampler": "TPESampler",
        "pruner": "MedianPruner",
    }


def test_plugin_scan_stays_light():
    """Hydra imports (and re-executes) every plugin module in every Hydra process."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from hydra.core.plugins import Plugins\n"
        "from hydra.plugins.sweeper import Sweeper\n"
        "names = [p.__name__ for p in Plugins.instance().discover(Sweeper)]\n"
        "assert 'OptunaPruningSweeper' in names, names\n"
        "heavy = [m for m in ('optuna', 'sqlalchemy', 'tensorflow', 'mlflow')\n"
        "         if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


# --- drop-in pieces: hooks, official results, exclude ----------------------------------------


def test_custom_search_space_hook_adds_params_and_refuses_overlap(monkeypatch):
    from hydra_plugins.optuna_pruning_sweeper import _hooks as hooks

    def configure(cfg, trial):
        trial.suggest_float("z", trial.params["x"] - cfg["d"], trial.params["x"] + cfg["d"])
        trial.suggest_int("+w", 0, 3)

    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    trial = study.ask()
    sampled = {"x": trial.suggest_float("x", -1, 1)}
    extra = hooks.extend_trial(configure, {"d": 0.1}, trial, sampled, {"y"})
    assert set(extra) == {"z", "+w"} and abs(extra["z"] - sampled["x"]) <= 0.1
    other = study.ask()
    sampled = {"x": other.suggest_float("x", -1, 1)}
    with pytest.raises(ValueError, match=r"suggested \['\+w'\].*fixes"):  # w=... fixed too
        hooks.extend_trial(configure, {"d": 0.1}, other, sampled, {"w"})
    assert hooks.locate(None, "custom_search_space") is None
    assert hooks.locate("math.sqrt", "custom_search_space") is math.sqrt
    with pytest.raises(ValueError, match=r"hydra\.sweeper\.dry_run_check='nope\.nothing'"):
        hooks.locate("nope.nothing", "dry_run_check")


def test_relative_hook_path_resolves_beside_the_main_script(tmp_path, monkeypatch):
    """The official examples' `.custom-search-space-objective.configure` spelling."""
    import sys
    import types

    from hydra_plugins.optuna_pruning_sweeper import _hooks as hooks

    (tmp_path / "my-objective.py").write_text("def configure(cfg, trial):\n    return 42\n")
    main = types.ModuleType("__main__")
    main.__file__ = str(tmp_path / "app.py")
    monkeypatch.setitem(sys.modules, "__main__", main)
    assert hooks.locate(".my-objective.configure", "custom_search_space")(None, None) == 42
    with pytest.raises(ValueError, match="no file"):
        hooks.locate(".missing-file.configure", "custom_search_space")


def test_official_results_single_and_multi_objective():
    from hydra_plugins.optuna_pruning_sweeper._summary import official_results

    study = optuna.create_study()
    assert official_results(study) is None  # nothing complete yet: nothing to report
    dist = {"x": optuna.distributions.FloatDistribution(0, 5)}
    for x in (3.0, 1.0, 2.0):
        study.add_trial(create_trial(value=x * x, params={"x": x}, distributions=dist))
    assert official_results(study) == {"name": "optuna", "best_params": {"x": 1.0},
                                       "best_value": 1.0}
    multi = optuna.create_study(directions=["minimize", "minimize"])
    for x, values in ((1.0, [1.0, 4.0]), (2.0, [4.0, 1.0]), (3.0, [5.0, 5.0])):
        multi.add_trial(create_trial(values=values, params={"x": x}, distributions=dist))
    solutions = official_results(multi)["solutions"]
    assert sorted(s["params"]["x"] for s in solutions) == [1.0, 2.0]  # (5, 5) is dominated
    assert all(len(s["values"]) == 2 for s in solutions)


def test_exclude_leaves_params_out_and_names_unknown_keys():
    from hydra_plugins.optuna_pruning_sweeper.sweeper import OptunaPruningSweeper

    params = {"model.depth": "int(interval(2, 4))", "x": "interval(0.0, 1.0)"}
    sweeper = OptunaPruningSweeper(sampler={}, pruner={}, params=params, exclude=["model.depth"])
    assert sweeper.swept_in_file() == frozenset({"x"})
    bad = OptunaPruningSweeper(sampler={}, pruner={}, params=params, exclude=["model.dpth"])
    with pytest.raises(ValueError, match=r"\['model\.dpth'\] not in hydra\.sweeper\.params"):
        bad.swept_in_file()


def test_storage_null_is_private_to_the_sweep_dir(tmp_path):
    assert storage.default_storage(tmp_path) == f"sqlite:///{tmp_path / 'optuna.db'}"
