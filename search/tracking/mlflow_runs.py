"""MLflow set-up and run-level logging: where runs go and what every run records."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import importlib.metadata
import json
import logging
import os
import platform
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
from omegaconf import DictConfig, OmegaConf

from search import REPO_ROOT, sweep_context
from search.tracking import tags as tag_keys
from search.tracking.store_move import StoreMoveError, follow_move
from search.tracking.tags import EXPERIMENT_KIND

log = logging.getLogger(__name__)

DEFAULT_STORE = REPO_ROOT / "mlruns"
PACKAGES = ("tensorflow", "keras", "mlflow", "optuna", "hydra-core", "scikit-learn", "numpy")


def resolve_tracking_uri(uri: str | None = None) -> str:
    """Config value, else $MLFLOW_TRACKING_URI, else SQLite under <repo>/mlruns/.

    MLflow 3 refuses a plain folder store for the registry, so the default is a database.
    """
    if uri:
        return str(uri)
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    DEFAULT_STORE.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{DEFAULT_STORE / 'mlflow.db'}"


def setup_cli(tracking_uri: str | None, contact: bool = True) -> str:
    """Logging and tracking/registry URIs for the pull, predict and registry commands.

    Takes no write lock: the moved-store check reads first and writes only for a store that
    moved, and MLflow only reads an existing store's schema. A moved store that cannot be
    rewritten (read-only) is a warning here: its artifacts may still be where it was.
    ``contact=False`` (predict on a pulled folder) never reaches the store: it works offline.
    """
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # quiet CLI
    uri = resolve_tracking_uri(tracking_uri)
    if contact:  # a server down, a login refused, a database password wrong: named now
        check_server(uri)
        check_login(uri)
        check_credentials(uri)
    try:
        follow_move(uri)
    except StoreMoveError as error:  # it only reads: the old place may still hold them
        log.warning("%s; reading its artifacts from the old place meanwhile", error)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return uri


def default_artifact_root(tracking_uri: str, artifact_root: str | None = None) -> str | None:
    """Artifacts beside a local SQLite store; a tracking server decides its own root."""
    if artifact_root:
        return str(artifact_root)
    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri.removeprefix("sqlite:///"))
        return (db.parent / "artifacts").as_uri()
    return None


@contextlib.contextmanager
def sqlite_init_lock(uri: str) -> Iterator[None]:
    """Serialise the first connection to a local SQLite store across processes.

    MLflow creates and migrates the schema on first connect; two sweep processes doing that
    at once fail with "duplicate column name" (seen with two workers on a new store).
    """
    if not uri.startswith("sqlite:///"):
        yield
        return
    db = Path(uri.removeprefix("sqlite:///"))
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".init.lock"), "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class TrackingError(RuntimeError):
    """The tracking store cannot be used; the message names it and what to check."""


# The one redaction (the plugin's, reached through sweep_context): a URL's password and any
# credential of the environment masked. Kept under this name for search/'s callers.
redact_uri = sweep_context.redact


def uri_setting(uri: str) -> str:
    """Where the tracking URI was set, for messages: $MLFLOW_TRACKING_URI or tracking.uri."""
    if os.environ.get("MLFLOW_TRACKING_URI") == uri:
        return "$MLFLOW_TRACKING_URI (used as tracking.uri is null)"
    return "tracking.uri"


# The settings MLflow's client reads a tracking server's login from (environment_variables.py);
# ~/.mlflow/credentials is its fallback for each of the two.
LOGIN_ENV = "MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD"


def login_setting(uri: str) -> tuple[str | None, str | None]:
    """Where the login MLflow's client sends to a tracking server comes from, and its user.

    A URL's user:password wins over the environment: requests sets it over the header MLflow
    builds (checked against `mlflow server --app-name basic-auth`). (None, None): no login.
    """
    from urllib.parse import urlsplit

    from mlflow.utils.credentials import read_mlflow_creds

    parts = urlsplit(uri)
    if parts.username or parts.password:
        return f"the user:password in {uri_setting(uri)}", parts.username
    creds = read_mlflow_creds()
    if creds.username and creds.password:
        from_env = all(os.environ.get(name) for name in LOGIN_ENV.split("/"))
        return LOGIN_ENV + ("" if from_env else " (or ~/.mlflow/credentials)"), creds.username
    if os.environ.get("MLFLOW_TRACKING_TOKEN"):
        return "MLFLOW_TRACKING_TOKEN", None
    return None, creds.username  # a user without a password: MLflow sends no login


def http_status(error: BaseException) -> int | None:
    """The HTTP status of a tracking server's refusal (MLflow's exceptions carry it)."""
    import re

    status = getattr(error, "get_http_status_code", lambda: None)()
    if status in (401, 403):
        return status
    found = re.search(r"error code (\d{3}) != 200", str(error))
    return int(found.group(1)) if found else status


def login_problem(uri: str, status: int, error: BaseException) -> str:
    """A tracking server that refused (401) or denied (403) the login: where the login came
    from and the fix; the password never appears (only the user, and the text redacted)."""
    source, user = login_setting(uri)
    why = sweep_context.error_text(error).rsplit("Response body: ", 1)[-1].strip("'\" ")
    why = f"HTTP {status}: {why.split('. ')[0][:120]}"
    server = f"the MLflow tracking server {public_uri(uri)}"
    both = LOGIN_ENV.replace("/", " and ")
    if status == 403:
        who = f"user {user!r} from {source}" if source else "a request without a login"
        return (f"{server} ({uri_setting(uri)}) denied {who} ({why}); ask its admin for a "
                "permission on the experiment (tracking.experiment), or use another user")
    if source is None:
        named = f"; only MLFLOW_TRACKING_USERNAME={user!r} is set" if user else ""
        return (f"{server} ({uri_setting(uri)}) requires a login and none was given ({why}"
                f"{named}); set {both} in the environment, as MLflow's client reads them")
    if source.startswith("the user:password"):
        return (f"{server} refused {source} (user {user!r}; {why}); fix the user or password "
                f"in that URL, or leave them out of it and set {both}")
    if source == "MLFLOW_TRACKING_TOKEN":
        return f"{server} ({uri_setting(uri)}) refused MLFLOW_TRACKING_TOKEN ({why}); fix it"
    return (f"{server} ({uri_setting(uri)}) refused the login from {source} (user {user!r}; "
            f"{why}); set {both} to a user of that server and its password")


def store_problem(uri: str, error: BaseException) -> str:
    """A database or server store that refused: the setting, the masked URL, why, the fix."""
    status = http_status(error) if uri.startswith(("http://", "https://")) else None
    if status in (401, 403):
        return login_problem(uri, status, error)
    text = sweep_context.error_text(error)
    if "password" in text or "authentication" in text:
        fix = "fix the user or password in that URL"
    else:
        fix = "check that the server runs, the database exists and the credentials are right"
    return (f"{uri_setting(uri)}={redact_uri(uri)!r}: the MLflow store cannot be opened "
            f"({text}); {fix}")


def check_server(uri: str, timeout: float = 3.0) -> None:
    """Fail within seconds, not after minutes of retries, when a tracking server is down.

    Its /health needs no login (MLflow's auth app leaves it open): a login is checked by the
    store's first call (`open_store`, its refusal named by `store_problem`).
    """
    if not uri.startswith(("http://", "https://")):
        return
    import urllib.error
    import urllib.request

    keep_login_out_of_links(uri)
    try:
        # without its user:password@ (urllib would take it for the host); MLflow's client
        # sends it as basic auth
        with urllib.request.urlopen(f"{public_uri(uri)}/health", timeout=timeout):
            return
    except urllib.error.HTTPError:
        return  # it answered: the server is up (a proxy may not route /health)
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise TrackingError(
            f"the MLflow tracking server {redact_uri(uri)} ({uri_setting(uri)}) does not "
            f"answer within {timeout:.0f} s ({redact_uri(str(reason))}); start it "
            "(mlflow server --host 127.0.0.1 --port 5000 ...) or point tracking.uri elsewhere"
        ) from None


def keep_login_out_of_links(uri: str) -> None:
    """MLflow's client prints "View run ... at: <tracking URI>/#/..." when a run ends, with a
    URL's user:password as written: for such a URL it prints none (the run's own log line
    and the closing lines give the link without the login)."""
    from urllib.parse import urlsplit

    if urlsplit(uri).password is not None:
        os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"


def check_login(uri: str) -> None:
    """A tracking server that refuses the login fails now, named by `login_problem`; read-only
    (one search), for commands that must not migrate or lock a store (pull, predict)."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        mlflow.MlflowClient(uri).search_experiments(max_results=1)
    except mlflow.exceptions.MlflowException as error:
        status = http_status(error)
        if status in (401, 403):
            raise TrackingError(login_problem(uri, status, error)) from None
        # anything else is the command's own call's to report, where it has its context


def check_credentials(uri: str) -> None:
    """A database store that refuses the credentials fails now, named, not after MLflow's
    ~100 s of engine retries (10 attempts with doubling sleeps) with a raw traceback."""
    if not uri.startswith(("postgresql", "mysql", "mssql")):
        return
    import sqlalchemy
    from sqlalchemy.exc import SQLAlchemyError

    try:
        engine = sqlalchemy.create_engine(uri, poolclass=sqlalchemy.pool.NullPool)
    except (SQLAlchemyError, ImportError, ValueError) as error:
        raise TrackingError(store_problem(uri, error)) from None
    try:
        with engine.connect():
            pass
    except SQLAlchemyError as error:
        if any(word in str(error) for word in ("password", "authentication", "Access denied")):
            raise TrackingError(store_problem(uri, error)) from None
        # anything else (a server still starting) is left to MLflow's retries
    finally:
        engine.dispose()


def check_sqlite_writable(uri: str) -> None:
    """Prove a local SQLite store can be written, with a write that is rolled back.

    MLflow opens a read-only file (or one in a read-only folder, where SQLite cannot create
    its journal) without complaint and reads it; the run's first write, after the data load,
    would fail with a raw SQLAlchemy traceback.
    """
    if not uri.startswith("sqlite:///"):
        return
    import sqlite3

    con = sqlite3.connect(uri.removeprefix("sqlite:///"), timeout=30, isolation_level=None)
    try:
        con.execute("BEGIN IMMEDIATE")
        (version,) = con.execute("PRAGMA user_version").fetchone()
        con.execute(f"PRAGMA user_version = {int(version)}")  # page 1 into the journal
    finally:
        if con.in_transaction:
            con.execute("ROLLBACK")
        con.close()


def sqlite_store_problem(uri: str, error: BaseException) -> str:
    """A local SQLite store that cannot be used: read-only, locked or not a database."""
    db = Path(uri.removeprefix("sqlite:///"))
    if isinstance(error, StoreMoveError):
        return str(error)
    text = str(error).splitlines()[0][:300]
    read_only = (isinstance(error, OSError) and error.errno in (errno.EACCES, errno.EPERM,
                                                                 errno.EROFS)) or any(
        word in text for word in ("readonly", "read-only", "Read-only", "unable to open"))
    if "database is locked" in text:
        hint = ("another process held its write lock for 30 s; wait for it to finish, or set "
                f"{uri_setting(uri)} to another store")
    elif read_only:
        parts = [str(p) for p in (db, db.parent)
                 if (p.exists() or p == db.parent) and not os.access(p, os.W_OK)]
        hint = (f"{' and '.join(parts) or 'the file or its folder'} cannot be written; a run "
                "or sweep records its runs there, and SQLite writes a journal file beside the "
                f"database: make both writable (chmod u+w {db} {db.parent}), or set "
                f"{uri_setting(uri)} to a writable store (pull.py and predict.py can still "
                "read this one)")
        return f"the MLflow store {db} cannot be opened for writing ({text}); {hint}"
    else:
        hint = ("it is not a usable MLflow SQLite database; it was not modified: move it "
                "aside (or restore a backup) and re-run, or set tracking.uri elsewhere")
    return f"the MLflow store {db} cannot be opened ({text}); {hint}"


def open_store(uri: str) -> None:
    """Create or migrate the store's schema and prove it writable, before any data load: a
    corrupt, read-only or locked SQLite file, or a database that refuses the credentials,
    is named with the fix."""
    check_credentials(uri)
    try:
        with sqlite_init_lock(uri):
            mlflow.MlflowClient(uri).search_experiments(max_results=1)
            follow_move(uri)  # a moved mlruns/ keeps its artifact and model views
            check_sqlite_writable(uri)
    except Exception as error:  # noqa: BLE001 - SQLAlchemy / MLflow / OS errors, re-raised named
        if not uri.startswith("sqlite:///"):
            raise TrackingError(store_problem(uri, error)) from None
        raise TrackingError(sqlite_store_problem(uri, error)) from None


def run_url(experiment_id: str, run_id: str) -> str | None:
    """The run's page in the MLflow UI when the store is a server (None for a local store,
    whose UI address depends on where `mlflow ui` is started)."""
    uri = mlflow.get_tracking_uri()
    if not uri.startswith(("http://", "https://")):
        return None
    return f"{public_uri(uri)}/#/experiments/{experiment_id}/runs/{run_id}?{ML_VIEW}"


# MLflow 3.17's UI picks its GenAI or model-training side from a toggle, not from the
# experiment's kind tag: links carry the toggle (seen in headless Chromium).
ML_VIEW = "workflowType=machine_learning"


def public_uri(uri: str) -> str:
    """A server URI without its user:password part: links and commands people copy must
    work, so credentials are left out (MLflow reads MLFLOW_TRACKING_USERNAME/PASSWORD)."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(uri)
    host = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit(parts._replace(netloc=host)).rstrip("/")


def host_id() -> str:
    """This host and PID namespace (containers on one host may share a host name)."""
    try:
        namespace = os.readlink("/proc/self/ns/pid").removeprefix("pid:")
    except OSError:  # not Linux
        namespace = ""
    return f"{socket.gethostname()}{namespace}"


def process_tags() -> dict[str, str]:
    """Which process owns a run: lets a later command close runs of processes that died."""
    return {tag_keys.PROCESS_HOST: host_id(), tag_keys.PROCESS_PID: str(os.getpid())}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a killed process its parent has not reaped yet (a zombie) still answers kill(0)
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def owner_alive(tags: dict[str, str]) -> bool | None:
    """Whether the process that owns a run (its process.* tags) still runs; None when it
    ran on another host, which this one cannot see."""
    pid = tags.get(tag_keys.PROCESS_PID, "")
    if tags.get(tag_keys.PROCESS_HOST) != host_id() or not pid.isdigit():
        return None
    return _pid_alive(int(pid))


def close_dead_runs(experiment_id: str) -> int:
    """End RUNNING runs of processes on this host that no longer exist (status KILLED).

    A run killed with SIGKILL (or a machine that lost power) cannot end its own run; the next
    command that opens the store does it. Runs of other hosts are left to their own hosts.
    """
    client = mlflow.MlflowClient()
    host = host_id()
    runs = client.search_runs(
        [experiment_id],
        f"attributes.status = 'RUNNING' and tags.`{tag_keys.PROCESS_HOST}` = '{host}'",
        max_results=1000,
    )
    closed = 0
    for run in runs:
        pid = run.data.tags.get(tag_keys.PROCESS_PID, "")
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            client.set_tag(run.info.run_id, tag_keys.PROCESS_ENDED, "killed: its process died")
            if tag_keys.OPTUNA_TRIAL_STATE in run.data.tags:
                client.set_tag(run.info.run_id, tag_keys.OPTUNA_TRIAL_STATE, "FAIL")
            client.set_terminated(run.info.run_id, "KILLED")
            closed += 1
    if closed:
        log.info("closed %d MLflow run(s) left RUNNING by processes that died", closed)
    return closed


# The value of the experiment-kind tag (EXPERIMENT_KIND, re-exported from tags) that opens
# MLflow 3's UI on its model-training view.
TRAINING_KIND = "custom_model_development"


def mark_training_kind(experiment: mlflow.entities.Experiment) -> None:
    """Tag an experiment made before this release (or by hand) so MLflow 3's UI opens it on
    its training runs, not GenAI traces.

    Workers that start together may both find the tag missing; on PostgreSQL their two writes
    can collide (the server answers 400, which MLflow does not retry), so a failed write is
    fine once the tag is there.
    """
    if EXPERIMENT_KIND in (experiment.tags or {}):
        return
    try:
        mlflow.set_experiment_tag(EXPERIMENT_KIND, TRAINING_KIND)
    except mlflow.exceptions.MlflowException:
        tags = mlflow.get_experiment(experiment.experiment_id).tags or {}
        if EXPERIMENT_KIND not in tags:
            raise


def setup_tracking(tracking: DictConfig | dict) -> str:
    """Point MLflow at the configured store and select (or create) the experiment.

    Checks the store first (a server that does not answer, a corrupt or read-only SQLite
    file: `TrackingError` naming it) and closes runs left RUNNING by dead processes.

    Returns:
        The experiment id.
    """
    # MLflow's tqdm bars for artifact downloads (registry, held-out scoring) are noise in
    # a sweep's log; MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR=true brings them back.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    uri = resolve_tracking_uri(tracking.get("uri"))
    check_server(uri)
    open_store(uri)  # creates/migrates the schema
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    name = tracking.get("experiment") or "Default"
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is None:
        root = default_artifact_root(uri, tracking.get("artifact_root"))
        try:
            # The kind tag goes in with the experiment: one atomic write, so workers that
            # start together never race to add it afterwards.
            experiment_id = mlflow.create_experiment(name, artifact_location=root,
                                                     tags={EXPERIMENT_KIND: TRAINING_KIND})
        except mlflow.exceptions.MlflowException:
            # Another worker created it between our lookup and create.
            experiment = mlflow.get_experiment_by_name(name)
            if experiment is None:
                raise
            experiment_id = experiment.experiment_id
    else:
        experiment_id = experiment.experiment_id
    mlflow.set_experiment(experiment_id=experiment_id)
    if experiment is not None:
        mark_training_kind(experiment)
    check_artifacts_writable(mlflow.get_experiment(experiment_id).artifact_location)
    close_dead_runs(experiment_id)
    return experiment_id


def check_artifacts_writable(location: str) -> None:
    """A local artifact folder that cannot be written fails now, not after training."""
    if location.startswith("file://"):
        from urllib.parse import unquote, urlparse

        path = Path(unquote(urlparse(location).path))
    elif "://" in location:
        return  # served by a tracking server or an object store: it decides
    else:
        path = Path(location)
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    if existing is None:
        return
    try:  # a real write: os.access trusts the mode bits (root, NFS root-squash, ACLs)
        with tempfile.TemporaryFile(dir=existing, prefix=".write-check-"):
            pass
    except OSError as error:
        raise TrackingError(
            f"cannot write MLflow artifacts to {path} (a file cannot be created in "
            f"{existing}: {error.strerror}); make it writable, or set tracking.artifact_root "
            "(for a new experiment) or tracking.experiment to one whose artifacts go elsewhere"
        ) from None


def flatten_config(cfg: DictConfig) -> dict[str, Any]:
    """Dotted-key params for MLflow (its param values are strings of at most 6000 chars)."""
    container = OmegaConf.to_container(cfg, resolve=True)
    flat: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{prefix}{key}.")
        else:
            flat[prefix[:-1]] = json.dumps(node) if isinstance(node, list) else node

    walk(container, "")
    return flat


def git_commit() -> str | None:
    """The repo's HEAD commit, or None outside a git checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def package_versions() -> dict[str, str]:
    """Versions of the packages that decide a run's numbers."""
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def redacted(cfg: DictConfig) -> DictConfig:
    """A resolved copy of the config with every string redacted (for params and artifacts):
    not only tracking.uri, any value can carry a URL with a password."""
    return OmegaConf.create(sweep_context.redact_tree(OmegaConf.to_container(cfg, resolve=True)))


def log_run_context(cfg: DictConfig, params: dict[str, Any] | None = None) -> None:
    """Log the run's params, its composed config (YAML artifact), versions and git commit.

    Params default to `run_params.hydra_job_params`: what was swept or set plus a few key
    values, never the whole config. Passwords in store URIs are masked first: secrets never
    reach params or artifacts.
    """
    from search.tracking.run_params import hydra_job_params

    cfg = redacted(cfg)
    params = sweep_context.redact_tree(hydra_job_params(cfg) if params is None else params)
    mlflow.log_params(params)
    mlflow.log_text(OmegaConf.to_yaml(cfg, resolve=True), "config/config.yaml")
    versions = package_versions()
    mlflow.log_dict(versions, "environment/versions.json")
    tags = {f"{tag_keys.PACKAGE_VERSION_PREFIX}{k}": v for k, v in versions.items()}
    commit = git_commit()
    if commit:
        tags[tag_keys.GIT_COMMIT] = commit
    mlflow.set_tags(tags)
