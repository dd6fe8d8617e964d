"""Credentials in store URLs never reach logs, params, artifacts or summaries."""

from __future__ import annotations

import logging
import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from hydra_plugins.optuna_pruning_sweeper._storage import redact
from search.sweep.hydra_callbacks import redacted_sweeper_yaml
from search.tracking import mlflow_runs as tracking

SECRET = "s3cret-Pw"


def test_storage_and_tracking_urls_are_masked():
    for url in (f"postgresql://bob:{SECRET}@db:5432/optuna",
                f"postgresql+psycopg://bob:{SECRET}@db/optuna"):
        assert SECRET not in redact(url) and "bob" in redact(url)
        assert SECRET not in tracking.redact_uri(url)
    assert SECRET not in tracking.redact_uri(f"http://alice:{SECRET}@mlflow:5000")
    assert tracking.redact_uri("sqlite:////data/mlflow.db") == "sqlite:////data/mlflow.db"


def test_sweeper_settings_artifact_masks_the_storage_password():
    sweeper = OmegaConf.create({"storage": f"postgresql://bob:{SECRET}@db/optuna",
                                "n_trials": 3})
    text = redacted_sweeper_yaml(sweeper)
    assert SECRET not in text and "postgresql://bob:***@db/optuna" in text
    env_based = OmegaConf.create({"storage": "${oc.env:OPTUNA_STORAGE}"})
    assert "${oc.env:OPTUNA_STORAGE}" in redacted_sweeper_yaml(env_based)  # left unresolved


def test_run_params_and_config_artifact_mask_the_tracking_password(compose_cfg):
    cfg = compose_cfg(f"tracking.uri=http://alice:{SECRET}@mlflow:5000")
    clean = tracking.redacted(cfg)
    assert SECRET not in OmegaConf.to_yaml(clean)
    assert SECRET not in str(tracking.flatten_config(clean))
    assert tracking.flatten_config(clean)["tracking.uri"] == "http://alice:***@mlflow:5000"


def test_printed_commands_keep_the_password_in_the_environment_and_still_run():
    from search.tracking.descriptions import pull_command, ui_command

    url = f"postgresql+psycopg://bob:{SECRET}@db/mlflow"
    for line in (ui_command(url), pull_command("m", url)):
        # a masked `***` URL would be copied and fail; the variable runs as copied
        assert SECRET not in line and "***" not in line and '"$MLFLOW_TRACKING_URI"' in line
    assert ui_command("sqlite:////data/m.db") == "python search/ui.py --tracking-uri sqlite:////data/m.db"
    assert "--tracking-uri http://mlflow:5000" in pull_command("m", f"http://a:{SECRET}@mlflow:5000")


# ---------------------------------------------------------------------------------------------
# The one redaction, on free text and on the environment's credentials
# ---------------------------------------------------------------------------------------------

def test_one_redaction_masks_urls_in_text_and_the_environments_credentials(monkeypatch):
    from search import sweep_context

    assert tracking.redact_uri is sweep_context.redact  # one implementation, not two
    text = (f"connect to 'postgresql+psycopg://bob:{SECRET}@db/o' failed; "
            f"see http://alice:{SECRET}@mlflow:5000/#/runs")
    assert SECRET not in redact(text) and redact(text).count(":***@") == 2
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "hunter2-pw")
    monkeypatch.setenv("OPTUNA_STORAGE", f"postgresql://bob:{SECRET}@db/optuna")
    # a driver's message that quotes the bare password is masked too
    assert redact(f"auth failed for {SECRET} / hunter2-pw") == "auth failed for *** / ***"
    tree = sweep_context.redact_tree({"a": [f"x {SECRET}"], "b": 1, "c": None})
    assert tree == {"a": ["x ***"], "b": 1, "c": None}


def test_redaction_survives_another_thread_changing_the_environment():
    """MLflow's telemetry thread unsets a variable at any time; redaction (on every log record)
    must not raise KeyError in the thread that logs."""
    import threading

    stop = threading.Event()

    def churn() -> None:
        while not stop.is_set():
            os.environ["_XRAY_CHURN"] = "1"
            os.environ.pop("_XRAY_CHURN", None)

    thread = threading.Thread(target=churn, daemon=True)
    thread.start()
    try:
        for _ in range(20_000):
            assert redact(f"http://a:{SECRET}@h") == "http://a:***@h"
    finally:
        stop.set()
        thread.join()


def test_command_line_urls_with_a_password_go_to_the_environment(monkeypatch):
    from search import sweep_context

    monkeypatch.delenv("SWEEP_SECRET_TRACKING_URI", raising=False)
    monkeypatch.delenv("SWEEP_SECRET_HYDRA_SWEEPER_STORAGE", raising=False)
    url = f"postgresql+psycopg://bob:{SECRET}@db/o"
    argv = sweep_context.secrets_out_of_overrides(
        ["run.py", "-m", f"tracking.uri={url}", f"hydra.sweeper.storage='{url}'",
         "tracking.uri2=sqlite:///x.db", "model.depth=2"])
    try:
        assert argv == ["run.py", "-m", "tracking.uri=${oc.env:SWEEP_SECRET_TRACKING_URI}",
                        "hydra.sweeper.storage=${oc.env:SWEEP_SECRET_HYDRA_SWEEPER_STORAGE}",
                        "tracking.uri2=sqlite:///x.db", "model.depth=2"]
        assert os.environ["SWEEP_SECRET_HYDRA_SWEEPER_STORAGE"] == url  # Hydra's quotes off
    finally:
        os.environ.pop("SWEEP_SECRET_TRACKING_URI", None)
        os.environ.pop("SWEEP_SECRET_HYDRA_SWEEPER_STORAGE", None)


def test_every_log_record_is_redacted_traceback_included(caplog):
    log = logging.getLogger("tests.secrets")
    with caplog.at_level(logging.INFO, logger="tests.secrets"):
        log.info("MLflow run %s (%s)", "abc", f"postgresql+psycopg://bob:{SECRET}@db/o")
        try:
            raise RuntimeError(f"cannot open http://alice:{SECRET}@mlflow:5000")
        except RuntimeError:
            log.exception("failed")
    assert "bob:***@db/o" in caplog.text and "Traceback" in caplog.text
    assert SECRET not in caplog.text


# ---------------------------------------------------------------------------------------------
# End to end: a real sweep on a real PostgreSQL with a random password, given both ways
# ---------------------------------------------------------------------------------------------

REPO = Path(__file__).resolve().parents[2]


def sweep(pg, folder: Path, name: str, via_env: bool, *extra: str,
          urls: tuple[str, str] | None = None) -> subprocess.CompletedProcess:
    """`search/run.py -m +debug=tiny`, 2 trials, the URLs on the command line or in the env."""
    mlflow_url, optuna_url = urls or (pg.url("mlflow"), pg.url("optuna"))
    env = {k: v for k, v in os.environ.items()
           if k not in ("MLFLOW_TRACKING_URI", "OPTUNA_STORAGE", "PGPASSWORD")}
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    args = ["-m", "+debug=tiny", f"hydra.sweep.dir={folder / 'sweep'}",
            "hydra.sweeper.n_trials=2", "hydra.sweeper.n_jobs=1",
            f"hydra.sweeper.study_name=secrets-{name}", f"tracking.experiment=secrets-{name}",
            f"registry.model_name=secrets-{name}",
            "tracking.artifact_root=" + (folder / "artifacts").as_uri(), *extra]
    if via_env:
        env.update(MLFLOW_TRACKING_URI=mlflow_url, OPTUNA_STORAGE=optuna_url)
    else:
        args += [f"tracking.uri={mlflow_url}", f"hydra.sweeper.storage={optuna_url}"]
    return subprocess.run([sys.executable, str(REPO / "search" / "run.py"), *args], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=600)


def database_rows_with(pg, secret: str) -> list[str]:
    """`database.table` for every row of the MLflow and Optuna databases holding ``secret``."""
    import psycopg

    found = []
    for database in ("mlflow", "optuna"):
        with psycopg.connect(host="127.0.0.1", port=pg.port, user=pg.user, password=pg.password,
                             dbname=database) as conn:
            tables = [t for (t,) in conn.execute(
                "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")]
            for table in tables:
                for row in conn.execute(f'SELECT * FROM "{table}"'):
                    if secret in repr(row):
                        found.append(f"{database}.{table}: {repr(row)[:200]}")
    return found


def files_with(folder: Path, secret: str) -> list[str]:
    return [str(p) for p in folder.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]


@pytest.mark.slow
@pytest.mark.parametrize("via_env", [False, True], ids=["command-line", "environment"])
def test_the_password_reaches_no_file_row_or_terminal(pg, tmp_path, via_env):
    name = "env" if via_env else "cli"
    proc = sweep(pg, tmp_path, name, via_env)
    terminal = proc.stdout + proc.stderr
    assert proc.returncode == 0, terminal[-5000:]
    # it ran for real on the database: two trials told, two runs and a registered version
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=pg.url("mlflow"), registry_uri=pg.url("mlflow"))
    experiment = client.get_experiment_by_name(f"secrets-{name}")
    assert len(client.search_runs([experiment.experiment_id])) >= 3  # parent + 2 trials
    assert client.search_model_versions(f"name = 'secrets-{name}'")
    logs = list((tmp_path / "sweep").rglob("*.log"))
    assert any("sweeps:***@127.0.0.1" in p.read_text() for p in logs)  # the masked form
    assert list((tmp_path / "sweep").rglob(".hydra/overrides.yaml"))
    # and the password is nowhere
    assert files_with(tmp_path, pg.password) == []
    assert database_rows_with(pg, pg.password) == []
    assert pg.password not in terminal


@pytest.mark.slow
def test_a_wrong_password_names_the_setting_without_a_traceback(pg, tmp_path):
    wrong = "wrong-Pw-" + secrets.token_hex(6)
    mlflow_bad = pg.url("mlflow").replace(pg.password, wrong)
    proc = sweep(pg, tmp_path / "a", "bad-mlflow", False,
                 urls=(mlflow_bad, pg.url("optuna")))
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "tracking.uri=" in out and "sweeps:***@127.0.0.1" in out, out[-3000:]
    assert "password authentication failed" in out, out[-3000:]
    assert "Traceback" not in out and wrong not in out and pg.password not in out

    optuna_bad = pg.url("optuna").replace(pg.password, wrong)
    proc = sweep(pg, tmp_path / "b", "bad-optuna", True, urls=(pg.url("mlflow"), optuna_bad))
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "$OPTUNA_STORAGE" in out and "sweeps:***@127.0.0.1" in out, out[-3000:]
    assert "password authentication failed" in out, out[-3000:]
    assert "sqlalchemy.exc" not in out and wrong not in out and pg.password not in out
