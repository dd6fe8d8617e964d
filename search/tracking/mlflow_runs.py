"""MLflow set-up and run-level logging: where runs go and what every run records."""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import platform
import socket
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import mlflow
from omegaconf import DictConfig, OmegaConf

from search import REPO_ROOT, sweep_context
from search.tracking import tags as tag_keys

# The store checks live in store_checks; re-exported under their old home for its callers.
from search.tracking.store_checks import (  # noqa: F401
    TrackingError,
    check_credentials,
    check_login,
    check_server,
    check_sqlite_writable,
    http_status,
    keep_login_out_of_links,
    login_problem,
    login_setting,
    open_store,
    public_uri,
    sqlite_init_lock,
    sqlite_store_problem,
    store_problem,
    uri_setting,
)
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


# The one redaction (the plugin's, reached through sweep_context): a URL's password and any
# credential of the environment masked. Kept under this name for search/'s callers.
redact_uri = sweep_context.redact

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
