"""The team stack as real processes on 127.0.0.1: a throw-away PostgreSQL cluster (Debian's
server, installed with apt when missing) and an `mlflow server` on it serving artifacts."""

from __future__ import annotations

import glob
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_package_installs(limit_s: float = 900) -> None:
    """Wait while apt or dpkg runs (.ci/run installs PostgreSQL in the background)."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        busy = False
        for comm in glob.glob("/proc/[0-9]*/comm"):
            try:
                busy = busy or Path(comm).read_text().strip() in ("apt-get", "dpkg")
            except OSError:
                continue
        if not busy:
            return
        time.sleep(2)


def debian_package(pattern: str, package: str) -> Path:
    """The newest path matching `pattern`; `apt-get install <package>` first when missing
    (root only; .ci/run may be installing it in the background: wait for apt, not fail)."""
    wait_for_package_installs()
    found = sorted(glob.glob(pattern))
    if not found and os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        wait = ["-o", "DPkg::Lock::Timeout=900", "-o", "Acquire::Lock::Timeout=900"]
        subprocess.run(["apt-get", "update", "-qq", *wait], check=True, env=env, timeout=900)
        subprocess.run(["apt-get", "install", "-y", "-qq", *wait, package], check=True,
                       env=env, timeout=900)
        found = sorted(glob.glob(pattern))
    if not found:
        pytest.fail(f"{pattern} is not installed and cannot be (apt-get install {package} "
                    "needs root)")
    return Path(found[-1])


def pg_bin() -> Path:
    """The PostgreSQL server binaries' folder (Debian's postgresql package)."""
    return debian_package("/usr/lib/postgresql/*/bin/initdb", "postgresql").parent


def as_postgres(*cmd: str, **kwargs) -> subprocess.CompletedProcess:
    """initdb refuses root: run the server's tools as the `postgres` user when we are root."""
    prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    return subprocess.run([*prefix, *cmd], check=True, capture_output=True, text=True,
                          timeout=120, **kwargs)


@dataclass(frozen=True)
class Postgres:
    port: int
    user: str
    password: str

    def url(self, database: str) -> str:
        return (f"postgresql+psycopg://{self.user}:{self.password}@127.0.0.1:{self.port}/"
                f"{database}")


def start_postgres(databases: tuple[str, ...] = ("optuna", "mlflow"),
                   max_connections: int | None = None) -> tuple[Postgres, Callable[[], None]]:
    """A cluster in a temp folder on a free port with ``databases``; returns it and its stop
    (also used by benchmarks/scale_workers.py)."""
    bin_dir = pg_bin()
    root = Path(tempfile.mkdtemp(prefix="xray-pg-"))
    os.chmod(root, 0o755)
    data = root / "data"
    password = secrets.token_urlsafe(16)  # a real secret: the tests check it never leaks
    (root / "pw").write_text(password)
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
        shutil.chown(root / "pw", "postgres")
    as_postgres(str(bin_dir / "initdb"), "-D", str(data), "-U", "sweeps",
                "--auth=scram-sha-256", f"--pwfile={root / 'pw'}")
    port = free_port()
    limit = f" -c max_connections={max_connections}" if max_connections else ""
    as_postgres(str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(root / "log"), "-w",
                "-o", f"-p {port} -k {root} -c listen_addresses=127.0.0.1{limit}", "start")

    def stop() -> None:
        as_postgres(str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop")
        shutil.rmtree(root, ignore_errors=True)

    try:
        import psycopg

        with psycopg.connect(host="127.0.0.1", port=port, user="sweeps", password=password,
                             dbname="postgres", autocommit=True) as conn:
            for name in databases:
                conn.execute(f"CREATE DATABASE {name}")
    except BaseException:
        stop()
        raise
    return Postgres(port, "sweeps", password), stop


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    """A cluster in a temp folder on a free port, databases `optuna` and `mlflow`."""
    pg, stop = start_postgres()
    try:
        yield pg
    finally:
        stop()


@dataclass
class MlflowServer:
    """`mlflow server` on the PostgreSQL `mlflow` database, serving its own artifacts;
    `stop()` and `start()` let a test restart it on the same port mid-sweep."""

    root: Path
    store_url: str
    port: int
    proc: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 120) -> None:
        # The store URL (password) goes by environment, not argv, which `ps` shows to everyone.
        env = {**os.environ, "MLFLOW_BACKEND_STORE_URI": self.store_url}
        with open(self.root / "server.log", "a") as server_log:
            self.proc = subprocess.Popen(
                [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1",
                 "--port", str(self.port), "--workers", "1", "--artifacts-destination",
                 str(self.root / "art")],
                env=env, stdout=server_log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            try:
                urllib.request.urlopen(f"{self.uri}/health", timeout=1)
                return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    pytest.fail("mlflow server did not start:\n"
                                + (self.root / "server.log").read_text()[-4000:])
                time.sleep(0.5)

    def stop(self) -> None:
        """SIGKILL the server and its workers (an outage, not a clean shutdown)."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, 9)
            self.proc.wait(timeout=30)


@pytest.fixture(scope="session")
def mlflow_server(postgres: Postgres, tmp_path_factory) -> Iterator[MlflowServer]:
    """The team's tracking server on a free 127.0.0.1 port."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"), postgres.url("mlflow"),
                          free_port())
    server.start()
    try:
        yield server
    finally:
        server.stop()
