"""`python search/ui.py`: MLflow's UI started on a real store, its printed addresses fetched
from the real server, and the parent run's all-trials figure as the sweep's end logs it."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
UI = REPO / "search" / "ui.py"


@dataclass
class SweepStore:
    """A SQLite store holding one sweep as the sweep's end leaves it: trial runs with their
    val_loss series, a parent run with its figures, and a champion."""

    uri: str
    experiment_id: str
    parent_run_id: str
    model: str = "ui-cnn"
    version: str = "1"


def trial_run(client, experiment_id: str, parent: str, number: int, state: str,
              values: list[float]) -> str:
    run = client.create_run(experiment_id, run_name=f"t{number:03d} {state.lower()} adam d3",
                            tags={"optuna.study": "ui-study", "optuna.trial_number": str(number),
                                  "optuna.trial_state": state, "mlflow.parentRunId": parent})
    for step, value in enumerate(values):
        client.log_metric(run.info.run_id, "val_loss", value, step=step)
    client.set_terminated(run.info.run_id)
    return run.info.run_id


@pytest.fixture
def sweep_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> SweepStore:
    """Three trials (one pruned), their parent run with the figures logged by the sweep's own
    report code, and v1 of a registered model holding @champion."""
    import mlflow
    import optuna
    from mlflow.tracking import MlflowClient

    from search.sweep import report
    from search.tracking import mlflow_runs

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    experiment_id = mlflow_runs.setup_tracking({"uri": uri, "experiment": "ui-tests"})
    study = optuna.create_study(study_name="ui-study", direction="minimize")
    curves = {0: [0.7, 0.5, 0.4], 1: [0.9, 0.8], 2: [0.6, 0.3, 0.2]}
    for number, values in curves.items():
        trial = study.ask()
        for step, value in enumerate(values):
            trial.report(value, step)
        pruned = number == 1
        study.tell(trial, None if pruned else values[-1],
                   state=optuna.trial.TrialState.PRUNED if pruned else None)
    client = MlflowClient(uri)
    with mlflow.start_run(run_name="sweep-ui", tags={"sweep.parent": "true",
                                                      "optuna.study": "ui-study",
                                                      "promotion.model_name": "ui-cnn"}) as run:
        parent = run.info.run_id
        for number, values in curves.items():
            state = "PRUNED" if number == 1 else "COMPLETE"
            trial_run(client, experiment_id, parent, number, state, values)
        report.log_sweep_curves(client, study, report.summarize(study))
    client.create_registered_model("ui-cnn")
    version = client.create_model_version("ui-cnn", f"{run.info.artifact_uri}/model", parent)
    client.set_registered_model_alias("ui-cnn", "champion", version.version)
    mlflow.set_tracking_uri(None)
    return SweepStore(uri, experiment_id, parent, version=str(version.version))


def test_the_parent_run_carries_the_interactive_all_trials_figure_at_its_top_level(sweep_store):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(sweep_store.uri)
    top = {a.path for a in client.list_artifacts(sweep_store.parent_run_id)}
    assert "val_loss_all_trials.html" in top  # not under sweep/ or the report's folder
    local = client.download_artifacts(sweep_store.parent_run_id, "val_loss_all_trials.html")
    page = Path(local).read_text()
    # offline too (MLflow's artifact view, a browser on a file): plotly.js inline, no CDN
    assert "Plotly.newPlot" in page and '<script src="https://cdn.plot.ly' not in page
    # one line per trial, the pruned one included, each named by its run
    traces = re.findall(r'"name":"(t\d{3} [a-z]+ adam d3)"', page)
    assert sorted(set(traces)) == ["t000 complete adam d3", "t001 pruned adam d3",
                                   "t002 complete adam d3"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def read_addresses(process: subprocess.Popen, timeout: float = 120) -> dict[str, str]:
    """The `name: address` lines ui.py prints, once it printed the champion's."""
    found: dict[str, str] = {}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and "champion" not in found:
        line = process.stdout.readline()
        if not line:
            break
        match = re.match(r"\s+(\w+):\s+(http\S+)", line)
        if match:
            found[match.group(1)] = match.group(2)
    return found


def fetch(url: str) -> tuple[int, bytes]:
    with urllib.request.urlopen(url, timeout=10) as answer:
        return answer.status, answer.read()


@pytest.mark.slow
def test_ui_starts_on_the_store_and_its_addresses_open_the_sweep(sweep_store, tmp_path):
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, str(UI), "--tracking-uri", sweep_store.uri, "--port", str(port)],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        found = read_addresses(process)
        assert set(found) == {"runs", "sweep", "curves", "champion"}, (
            found, process.stderr.read() if process.poll() is not None else "")
        base = f"http://127.0.0.1:{port}"
        eid, parent = sweep_store.experiment_id, sweep_store.parent_run_id
        assert found["runs"] == f"{base}/#/experiments/{eid}/runs?workflowType=machine_learning"
        assert found["sweep"] == (f"{base}/#/experiments/{eid}/runs/{parent}"
                                  "?workflowType=machine_learning")
        assert found["curves"] == (f"{base}/#/experiments/{eid}/runs/{parent}/artifactPath/"
                                   "val_loss_all_trials.html?workflowType=machine_learning")
        assert found["champion"] == (f"{base}/#/models/ui-cnn/versions/{sweep_store.version}"
                                      "?workflowType=machine_learning")
        for url in found.values():  # the page a browser loads for each: the UI's own
            status, body = fetch(url.split("#")[0])
            assert status == 200 and b"<title>MLflow</title>" in body
        # what each page then asks the server for exists: the ids are the store's
        api = f"{base}/ajax-api/2.0/mlflow"
        run = json.loads(fetch(f"{api}/runs/get?run_id={parent}")[1])["run"]
        assert run["info"]["experiment_id"] == eid
        status, page = fetch(f"{base}/get-artifact?path=val_loss_all_trials.html&run_uuid={parent}")
        assert status == 200 and b"t001 pruned adam d3" in page
        query = urllib.parse.urlencode({"name": "ui-cnn", "version": sweep_store.version})
        version = json.loads(fetch(f"{api}/model-versions/get?{query}")[1])["model_version"]
        assert "champion" in version["aliases"]
        # a store that is a tracking server is already served: its addresses, nothing started
        served = subprocess.run([sys.executable, str(UI), "--tracking-uri", base],
                                capture_output=True, text=True, timeout=120, cwd=tmp_path)
        assert served.returncode == 0, served.stderr
        assert f"  curves:   {found['curves']}" in served.stdout
        assert f"  champion: {found['champion']}" in served.stdout
    finally:
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=60)
    assert process.returncode == 0, err
    assert "MLflow UI stopped." in out
    with pytest.raises(ConnectionRefusedError):  # the server went with it
        socket.create_connection(("127.0.0.1", port), timeout=5).close()


@pytest.mark.slow
def test_a_ui_that_does_not_come_up_is_named(sweep_store, tmp_path):
    port = free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        busy = subprocess.run([sys.executable, str(UI), "--tracking-uri", sweep_store.uri,
                               "--port", str(port)], capture_output=True, text=True,
                              timeout=120, cwd=tmp_path)
    assert busy.returncode == 1
    assert f"port {port} on 127.0.0.1 is in use" in busy.stderr and "--port" in busy.stderr
    refused = subprocess.run([sys.executable, str(UI), "--tracking-uri", sweep_store.uri,
                              "--port", str(free_port()), "--", "--no-such-option"],
                             capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert refused.returncode == 1, refused.stdout
    assert "MLflow's UI did not start at http://127.0.0.1:" in refused.stderr
    assert "`mlflow server` exited with status" in refused.stderr


def test_the_addresses_follow_the_store_and_an_unknown_experiment_is_named(sweep_store,
                                                                           capsys):
    """What ui.py reads before it starts anything: the last sweep, its figure, the champion;
    the addresses on another host and port are the same routes."""
    from mlflow.tracking import MlflowClient

    from search import ui

    places = ui.find_places(MlflowClient(sweep_store.uri), None, None)
    assert (places.experiment_id, places.sweep_run_id, places.figure, places.champions) == (
        sweep_store.experiment_id, sweep_store.parent_run_id, "val_loss_all_trials.html",
        [("ui-cnn", sweep_store.version)])
    lines = "\n".join(ui.address_lines("http://gpu-box:8080", places))
    assert f"http://gpu-box:8080/#/experiments/{sweep_store.experiment_id}/runs/" in lines
    assert "(models:/ui-cnn@champion = v1)" in lines and ":5000" not in lines
    assert ui.main(["--tracking-uri", sweep_store.uri, "--experiment", "nope"]) == 1
    error = capsys.readouterr().err
    assert "no experiment 'nope' in this store (it has: Default, ui-tests)" in error
