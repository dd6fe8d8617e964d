"""The team stack with logins: a real `mlflow server --app-name basic-auth` (the repo's
docker/basic_auth.ini, the admin's password from MLflow's MLFLOW_AUTH_ADMIN_* environment) and
tiny runs against it. The login comes from MLFLOW_TRACKING_USERNAME/PASSWORD, as MLflow's client
reads it, or from the URL's user:password; it is never written or printed, and a refused login
stops the command in seconds, before any data is loaded, naming the setting it came from.

One server for the module; two tiny runs (the environment's login, the URL's) and three runs that
stop at the refused login."""

from __future__ import annotations

import configparser
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from tests.stack.conftest import free_port

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow
LOGIN_ENV = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN",
             "MLFLOW_TRACKING_URI")


@dataclass(frozen=True)
class AuthServer:
    root: Path
    port: int
    password: str  # the admin's: a real secret, searched for in every output

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def wait_for_health(proc: subprocess.Popen, uri: str, log: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(f"{uri}/health", timeout=1)  # open: no login needed
            return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"mlflow server --app-name basic-auth did not start:\n"
                            f"{log.read_text()[-4000:]}")
            time.sleep(0.5)


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AuthServer]:
    """The auth app on a free 127.0.0.1 port; its users in a temp folder, as the stack's ini
    says except for that path; the admin's password only in the server's environment."""
    root = tmp_path_factory.mktemp("mlflow-auth")
    ini = configparser.ConfigParser()
    ini.read(REPO / "docker" / "basic_auth.ini")
    ini["mlflow"]["database_uri"] = f"sqlite:///{root / 'basic_auth.db'}"
    with open(root / "basic_auth.ini", "w") as handle:
        ini.write(handle)
    server = AuthServer(root, free_port(), "pw-" + secrets.token_urlsafe(16))
    env = {k: v for k, v in os.environ.items() if k not in LOGIN_ENV}
    env.update(MLFLOW_AUTH_CONFIG_PATH=str(root / "basic_auth.ini"),
               MLFLOW_AUTH_ADMIN_USERNAME="admin", MLFLOW_AUTH_ADMIN_PASSWORD=server.password,
               MLFLOW_FLASK_SERVER_SECRET_KEY=secrets.token_hex(16))
    log = root / "server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "mlflow"), "server", "--app-name", "basic-auth",
             "--host", "127.0.0.1", "--port", str(server.port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
             "--artifacts-destination", str(root / "art")],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for_health(proc, server.uri, log)
        yield server
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


def run_tiny(tmp: Path, experiment: str, *overrides: str, **env: str
             ) -> tuple[subprocess.CompletedProcess, float]:
    """search/run.py +debug=tiny in its own folder; the login only where ``env`` gives it."""
    base = {k: v for k, v in os.environ.items() if k not in LOGIN_ENV}
    base.update(TF_CPP_MIN_LOG_LEVEL="3", MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false", **env)
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, str(REPO / "search" / "run.py"), "+debug=tiny",
         f"hydra.run.dir={tmp / 'run'}", f"tracking.experiment={experiment}", *overrides],
        cwd=REPO, env=base, capture_output=True, text=True, timeout=900)
    return proc, time.monotonic() - started


def files_with(folders: tuple[Path, ...], secret: str) -> list[str]:
    return [str(p) for folder in folders for p in folder.rglob("*")
            if p.is_file() and secret.encode() in p.read_bytes()]


def finished_runs(server: AuthServer, experiment: str, monkeypatch: pytest.MonkeyPatch) -> list:
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", server.password)
    client = MlflowClient(server.uri)
    found = client.get_experiment_by_name(experiment)
    assert found is not None, f"no experiment {experiment!r} on the server"
    return [r for r in client.search_runs([found.experiment_id])
            if r.info.status == "FINISHED"]


def test_the_server_asks_for_a_login(auth_server):
    request = f"{auth_server.uri}/api/2.0/mlflow/experiments/search?max_results=1"
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)
    assert refused.value.code == 401  # so the runs below log through a real login


@pytest.mark.parametrize("via", ["environment", "url"])
def test_a_run_logs_with_the_login_and_never_writes_or_prints_it(auth_server, tmp_path,
                                                                 monkeypatch, via):
    if via == "environment":
        proc, _ = run_tiny(tmp_path, "auth-env", f"tracking.uri={auth_server.uri}",
                           MLFLOW_TRACKING_USERNAME="admin",
                           MLFLOW_TRACKING_PASSWORD=auth_server.password)
    else:
        url = auth_server.uri.replace("://", f"://admin:{auth_server.password}@")
        proc, _ = run_tiny(tmp_path, "auth-url", f"tracking.uri={url}")
    terminal = proc.stdout + proc.stderr
    assert proc.returncode == 0, terminal[-5000:]
    assert len(finished_runs(auth_server, f"auth-{via[:3]}", monkeypatch)) == 1
    if via == "url":  # the URL was used, and shown masked
        assert "admin:***@127.0.0.1" in (tmp_path / "run" / "run.log").read_text()
    assert auth_server.password not in terminal
    assert files_with((tmp_path, auth_server.root), auth_server.password) == []


@pytest.mark.parametrize("source", ["environment", "tracking.uri", "$MLFLOW_TRACKING_URI"])
def test_a_wrong_login_stops_before_training_naming_its_setting(auth_server, tmp_path, source):
    wrong = "wrong-" + secrets.token_hex(8)
    bad_url = auth_server.uri.replace("://", f"://admin:{wrong}@")
    if source == "environment":
        proc, elapsed = run_tiny(tmp_path, "auth-bad", f"tracking.uri={auth_server.uri}",
                                 MLFLOW_TRACKING_USERNAME="admin",
                                 MLFLOW_TRACKING_PASSWORD=wrong)
        named = ("refused the login from MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD",
                 "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD to a user")
    elif source == "tracking.uri":
        proc, elapsed = run_tiny(tmp_path, "auth-bad", f"tracking.uri={bad_url}")
        named = ("refused the user:password in tracking.uri", "fix the user or password")
    else:
        proc, elapsed = run_tiny(tmp_path, "auth-bad", MLFLOW_TRACKING_URI=bad_url)
        named = ("refused the user:password in $MLFLOW_TRACKING_URI", "fix the user or password")
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    for text in (*named, "HTTP 401", "user 'admin'"):
        assert text in out, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    assert wrong not in out and auth_server.password not in out
    assert files_with((tmp_path,), wrong) == []
    # before any data is loaded or any epoch trained; seconds, not MLflow's retries
    assert "Loading data" not in out and "Epoch" not in out
    assert elapsed < 60, elapsed


def test_no_login_and_a_denied_user_are_named(auth_server, monkeypatch):
    """In process, the store's first call (open_store, and check_login for the read-only
    commands): no login at all; a user the server knows but denies (403) an experiment."""
    from mlflow.server import get_app_client

    from search.tracking import mlflow_runs

    for name in LOGIN_ENV:
        monkeypatch.delenv(name, raising=False)
    for check in (mlflow_runs.open_store, mlflow_runs.check_login):  # run; pull and predict
        with pytest.raises(mlflow_runs.TrackingError) as none:
            check(auth_server.uri)
        assert "requires a login and none was given" in str(none.value)
        assert "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD" in str(none.value)

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", auth_server.password)
    bob_password = "bob-" + secrets.token_urlsafe(12)
    auth = get_app_client("basic-auth", tracking_uri=auth_server.uri)
    auth.create_user("bob", bob_password)
    admin = MlflowClient(auth_server.uri)
    private = admin.create_experiment(f"private-{secrets.token_hex(4)}")
    auth.grant_user_permission("bob", "experiment", private, "DENY")
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "bob")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", bob_password)
    with pytest.raises(MlflowException) as denied:  # as the store's calls raise it
        MlflowClient(auth_server.uri).get_experiment(private)
    message = mlflow_runs.store_problem(auth_server.uri, denied.value)
    assert "denied user 'bob' from MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD" in message
    assert "HTTP 403" in message and bob_password not in message
    mlflow_runs.check_login(auth_server.uri)  # bob may log in: the search answers, filtered
