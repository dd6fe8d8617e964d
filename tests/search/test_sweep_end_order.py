"""The sweep's end in the right order, all or nothing visible (issue 27).

One tiny sweep (`+debug=tiny`, 2 trials) with a floor no model reaches and a real Ctrl-C
(SIGINT to the command's process group, fired by `search.faults` once the first
cross-validation fold's run has started):

- the floor is decided before any alias moves: the version is registered, with no alias
  (neither @champion nor @challenger), its description and tags say why, and the closing
  lines never say to serve it;
- the interrupt ends the parent run KILLED with `sweep.stopped_in` naming the step, the fold
  runs are stopped (not RUNNING), and the command ends as interrupted.

Then a sweep that stops on a config error its sweeper finds leaves no parent run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from tests.conftest import TINY_RUN

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow

MODEL = "order-cnn"
EXPERIMENT = "sweep-end-order"


def command(tmp: Path, *overrides: str) -> list[str]:
    return [
        sys.executable, str(REPO / "search" / "run.py"), "-m", *TINY_RUN,
        f"hydra.sweep.dir={tmp / 'sweep'}",
        f"hydra.sweeper.storage=sqlite:///{tmp / 'optuna.db'}",
        "tracking.artifact_root=" + (tmp / "artifacts").as_uri(),
        f"tracking.experiment={EXPERIMENT}", "hydra.sweeper.study_name=order",
        "hydra.sweeper.n_trials=2", "hydra.sweeper.n_jobs=1", "hydra/sweeper/pruner=nop",
        # the keys the default space sweeps, fixed to the tiny run's values
        "trainer.max_epochs=2", "model.depth=2", "model.base_filters=8",
        "model.dense_units=16", f"registry.model_name={MODEL}", *overrides,
    ]


def _default_sigint() -> None:
    # A shell that starts pytest in the background sets SIGINT to "ignore", and children
    # inherit it: give the sweep a real Ctrl-C.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run(tmp: Path, *overrides: str, fault: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}",
           "TF_CPP_MIN_LOG_LEVEL": "3"}
    if fault:
        (tmp / f"{fault.split('@')[0]}.marker").write_text(fault)
        env.update({"XRAY_FAULT": fault, "XRAY_FAULT_MARKER": str(tmp / "{point}.marker")})
    return subprocess.run(command(tmp, *overrides), cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=900, start_new_session=True,
                          preexec_fn=_default_sigint)


def store(tmp: Path) -> MlflowClient:
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def test_floor_before_alias_and_ctrl_c_in_cross_validation(tmp_path):
    proc = run(tmp_path, "registry.floor=0.9999", "registry.cv_folds=2",
               fault="cv_fold@group")
    out = proc.stdout + proc.stderr
    log = proc.stdout[-3000:] + proc.stderr[-6000:]
    assert not (tmp_path / "cv_fold.marker").exists(), "no fold started\n" + log
    assert proc.returncode in (130, -signal.SIGINT), (proc.returncode, log)

    client = store(tmp_path)
    # the floor: registered for inspection, never an alias, and said so
    version = client.get_model_version(MODEL, "1")
    assert list(version.aliases) == [], version.aliases
    for alias in ("champion", "challenger"):
        with pytest.raises(MlflowException):
            client.get_model_version_by_alias(MODEL, alias)
    assert version.tags["promotion.decision"] == "below_floor"
    assert version.tags["promotion.floor"] == "0.9999"
    assert "refused by the quality floor" in version.description
    assert "No champion" in client.get_registered_model(MODEL).description
    assert "do not serve it" in out and "serve models:/" not in out, log
    assert "is champion" not in out

    # the interrupt: KILLED, naming the step; the fold it cut is not left RUNNING
    experiment = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([experiment.experiment_id])
    parent = next(r for r in runs if r.data.tags.get("sweep.parent") == "true")
    assert parent.info.status == "KILLED", (parent.info.status, log)
    assert parent.data.tags["sweep.stopped_in"] == "cross_validation"
    assert parent.data.tags["sweep.end_step"] == "cross_validation"
    assert "interrupted (Ctrl-C)" in parent.data.tags["sweep.ended"]
    assert "cv_val_roc_auc_mean" not in parent.data.metrics  # cut, and visibly so
    assert parent.data.tags["promotion.alias"] == "none"
    assert "**Stopped:**" in parent.data.tags["mlflow.note.content"]
    folds = [r for r in runs if "cv.fold" in r.data.tags]
    # the fold it cut is closed (KILLED, or FAILED when the interrupt met its data loading);
    # the second (n_jobs=1: not started yet) never started
    assert [r.info.status for r in folds] in (["KILLED"], ["FAILED"]), [
        r.info.status for r in folds]
    assert "stopped: interrupted (Ctrl-C) in the sweep's cross_validation step" in out


def test_config_error_found_by_the_sweeper_leaves_no_parent_run(tmp_path):
    proc = run(tmp_path, "model.no_such_key=choice(1,2)")
    assert proc.returncode != 0
    assert "no_such_key" in proc.stdout + proc.stderr
    client = store(tmp_path)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([experiment.experiment_id]) if experiment else []
    assert runs == [], [(r.info.run_id, r.info.status) for r in runs]


def test_floor_is_decided_under_the_lock_before_any_alias(registry_store):
    """The gate itself (`register_and_promote(floor=...)`): a version under the floor gets
    no alias, keeps the champion and the challenger where they were, and says so."""
    from search.model_registry import registration
    from search.tracking import descriptions

    runs, name, floor = registry_store.runs, "floor-cnn", 0.5
    client = MlflowClient()
    poor = registration.register_and_promote(runs.poor_run_id, model_name=name, floor=floor)
    assert poor.below_floor and not poor.promoted and poor.alias == "none", poor.summary()
    assert poor.new_score < floor and "registry.floor 0.5000" in poor.reason
    assert list(client.get_model_version(name, str(poor.version)).aliases) == []
    assert "No champion" in client.get_registered_model(name).description
    lines = "\n".join(descriptions.next_steps(
        registry_store.uri, "0", "parent", name, poor.to_dict()))
    assert "do not serve it" in lines and "nothing: no version" in lines
    assert "serve models:/" not in lines and "pull:" not in lines

    good = registration.register_and_promote(runs.good_run_id, model_name=name, floor=floor)
    assert good.promoted and good.alias == "champion" and not good.below_floor
    again = registration.register_and_promote(runs.poor_run_id, model_name=name, floor=floor)
    assert again.version == poor.version and again.below_floor
    assert again.champion_version == good.version  # scored for the record, never compared
    champion = client.get_model_version_by_alias(name, "champion")
    assert int(champion.version) == good.version
    assert list(client.get_model_version(name, str(poor.version)).aliases) == []
    lines = "\n".join(descriptions.next_steps(
        registry_store.uri, "0", "parent", name, again.to_dict()))
    assert f"serve:   models:/{name}@champion (v{good.version}, unchanged)" in lines


def _study_of_another_space(tmp: Path) -> str:
    """A study named as the sweep's, created by an earlier sweep over another space."""
    import optuna

    study = optuna.create_study(storage=f"sqlite:///{tmp / 'optuna.db'}", study_name="order",
                                direction="minimize")
    study.set_user_attr("sweeper_search_space", {"model.depth": "choice(1,9)"})
    return "was created with another search space"


@pytest.mark.parametrize("refusal", ["search_space", "study"])
def test_a_sweep_its_sweeper_refuses_never_opens_a_parent_run(tmp_path, refusal):
    """Refused after `check_sweep_config` passed, by the sweeper's own checks (a key the
    config lacks; a stored study over another space): no parent run, not even a deleted
    one. Hydra calls `on_multirun_start` before it builds the sweeper: the run may open
    only at the sweeper's `on_sweep_start`."""
    from mlflow.entities import ViewType

    if refusal == "study":
        expected = _study_of_another_space(tmp_path)
        proc = run(tmp_path)
    else:
        expected = "the composed config has no key 'model.no_such_key'"
        proc = run(tmp_path, "model.no_such_key=choice(1,2)")
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and expected in out, (proc.returncode, out[-4000:])
    client = store(tmp_path)
    experiments = client.search_experiments(view_type=ViewType.ALL)
    runs = client.search_runs([e.experiment_id for e in experiments],
                              run_view_type=ViewType.ALL) if experiments else []
    assert runs == [], [(r.info.run_name, r.info.status, r.info.lifecycle_stage) for r in runs]
    assert "parent run" not in out, out[-4000:]
