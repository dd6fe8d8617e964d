"""Study storage: URLs, SQLite paths, the RDB storage, the ask lock, and the one redaction of
secrets (``redact``) that every output of a sweep calls (see the section at the end).

Ask lock (``AskLock``): makes count-then-ask (and study creation) atomic across sweeper
processes. SQLite -> ``fcntl.flock`` on ``<db>.ask.lock`` (same host or a filesystem with
working flock); PostgreSQL -> ``pg_advisory_lock``; MySQL -> ``GET_LOCK``; other URLs -> a
process-local lock only (best effort: concurrent sweepers may overshoot ``n_trials``).

Optuna and SQLAlchemy are imported inside the functions: the public ``sweeper`` and
``trial_context`` import this module at Hydra's plugin scan, in every Hydra process, and a
plain run should not pay for them.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import re
import threading
import traceback
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import optuna

# Named as before the module went private, so its log lines read as they did.
log = logging.getLogger(__name__.replace("._", "."))
KEY, ENV = "hydra.sweeper.storage", "OPTUNA_STORAGE"  # where the storage URL is set


def storage_kwargs(url: str) -> dict[str, Any]:
    """Engine options for RDBStorage: a long SQLite busy timeout for concurrent writers."""
    if url.startswith("sqlite"):
        return {"engine_kwargs": {"connect_args": {"timeout": 60}}}
    return {}


def default_storage(sweep_dir: str | Path) -> str:
    """``storage: null``: a study private to this sweep, ``<hydra.sweep.dir>/optuna.db``.

    The official plugin keeps such a study in memory; our workers are other processes and
    tell the storage themselves, so it lives in a file of the sweep folder instead (a fresh
    study per sweep folder, kept for optuna-dashboard; re-running into the same folder
    resumes it).
    """
    return f"sqlite:///{Path(sweep_dir, 'optuna.db')}"


def absolute_sqlite(url: str) -> str:
    """SQLite URL with an absolute path: jobs may chdir, the study must not move."""
    if not url.startswith("sqlite"):
        return url
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    db = parsed.database
    if not db or db == ":memory:" or db.startswith("file:") or os.path.isabs(db):
        return url
    return parsed.set(database=os.path.abspath(db)).render_as_string(hide_password=False)


def check_url(url: str) -> None:
    """Refuse a storage URL SQLAlchemy cannot use, naming the setting and the fix."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    try:
        make_url(url).get_dialect()
    except (ArgumentError, NoSuchModuleError, ValueError) as error:
        raise ValueError(
            f"{setting_of(url, KEY, ENV)}={redact(url)!r} is not a usable database URL "
            f"({redact(str(error))}); use "
            "sqlite:///path/optuna.db or postgresql+psycopg://user@host/db (pip install -e "
            "'.[postgres]')"
        ) from None
    except ImportError as error:
        raise ValueError(
            f"{setting_of(url, KEY, ENV)}={redact(url)!r} needs a database driver that is not "
            f"installed ({error}); for PostgreSQL: pip install -e '.[postgres]'"
        ) from None


def check_shareable(url: str) -> None:
    """Refuse storages that worker processes cannot open (in-memory SQLite)."""
    if url.startswith("sqlite") and (":memory:" in url or url.rstrip("/") == "sqlite:"):
        raise ValueError(
            f"{KEY}={redact(url)!r} cannot be shared with worker processes: "
            "use a SQLite file (sqlite:///path/optuna.db) or a database server URL"
        )


def make_storage(
    url: str, heartbeat_interval: int | None, grace_period: int | None, max_retry: int | None
) -> optuna.storages.RDBStorage:
    """The sweeper's RDBStorage, with heartbeats and stale-trial retries when enabled."""
    import optuna

    if url.startswith("sqlite"):
        from sqlalchemy.engine import make_url

        db = make_url(url).database
        if db and db != ":memory:":
            Path(db).parent.mkdir(parents=True, exist_ok=True)
    from sqlalchemy.exc import SQLAlchemyError

    callback = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if heartbeat_interval:
            callback = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=max_retry)
        try:
            return optuna.storages.RDBStorage(
                url,
                **storage_kwargs(url),
                heartbeat_interval=heartbeat_interval or None,
                grace_period=grace_period if heartbeat_interval else None,
                heartbeat_stale_trial_callback=callback,
            )
        except (SQLAlchemyError, PermissionError) as error:
            raise StorageRefused(f"error: {storage_problem(url, error)}") from None


def error_text(error: BaseException) -> str:
    """A driver's message on one line, redacted, without SQLAlchemy's "Background" link (the
    cause, e.g. psycopg's "FATAL: password authentication failed", may be on a later line)."""
    lines = [line.strip() for line in str(error).splitlines()
             if line.strip() and not line.strip().startswith("(Background on this error")]
    return redact(" ".join(lines)[:300] or type(error).__name__)


class StorageRefused(SystemExit):
    """The storage refused at the sweep's start (wrong password, no server, corrupt file).

    A SystemExit carrying the named message: the command ends with that one line, where Hydra
    would print an Exception with its traceback.
    """


def storage_problem(url: str, error: BaseException) -> str:
    """A message for a storage that cannot be opened: which one, why, and what to do."""
    text = error_text(error)
    where = f"{setting_of(url, KEY, ENV)}={redact(url)!r}"
    if url.startswith("sqlite"):
        from sqlalchemy.engine import make_url

        db = make_url(url).database
        if "not a database" in text or "malformed" in text:
            return (f"{where}: {db} is not a usable SQLite database ({text}). It was not "
                    "modified: move it aside (or restore a backup) and re-run, or point "
                    "hydra.sweeper.storage elsewhere")
        return (f"{where}: cannot open or write {db} ({text}); make the file and its folder "
                "writable, or point hydra.sweeper.storage elsewhere")
    if "password" in text or "authentication" in text:
        return (f"{where}: the database refused the credentials ({text}); fix the user or "
                f"password in that URL (or PGPASSWORD)")
    return (f"{where}: the database cannot be reached or used ({text}); check that the server "
            "runs, the database exists and the credentials (from the environment) are right")


class AskLock:
    """Makes count-then-reserve (and study creation) atomic across sweeper processes.

    ``held`` says whether this process holds it now: what runs inside should be the few
    queries that must be serialised, never a sampler (tests/hydra_plugins/test_ask_lock_scope.py).
    """

    def __init__(self, url: str, study_name: str) -> None:
        self.url = url
        self.study_name = study_name
        self._local = threading.Lock()
        self._file: Any = None
        self._engine: Any = None
        self._connected = False
        self._held = False
        self.kind = "local"
        if url.startswith("sqlite"):
            from sqlalchemy.engine import make_url

            db = make_url(url).database
            if db and db != ":memory:":
                self.path = Path(db).with_name(Path(db).name + ".ask.lock")
                self.kind = "flock"
        elif url.startswith(("postgresql", "postgres")):
            self.kind = "postgresql"
        elif url.startswith("mysql"):
            self.kind = "mysql"
        else:
            log.warning(
                "No cross-process ask lock for storage %s: several sweepers on this study may "
                "overshoot n_trials (use SQLite, PostgreSQL or MySQL).",
                url.split(":", 1)[0],
            )

    def _key(self) -> int:
        digest = hashlib.sha256(f"optuna-sweeper:{self.study_name}".encode()).digest()
        return int.from_bytes(digest[:8], "big", signed=True)

    @property
    def held(self) -> bool:
        """Whether this process holds the lock (inside ``with lock():``)."""
        return self._held

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        with self._local, self._acquired():
            self._held = True
            try:
                yield
            finally:
                self._held = False

    @contextlib.contextmanager
    def _acquired(self) -> Iterator[None]:
        """The cross-process lock itself (the caller holds the process-local one)."""
        if self.kind == "flock":
            if self._file is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._file = open(self.path, "a+")  # noqa: SIM115 - kept for the sweep
            fcntl.flock(self._file.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
        elif self.kind in ("postgresql", "mysql"):
            import sqlalchemy

            if self._engine is None:
                self._engine = sqlalchemy.create_engine(
                    self.url, poolclass=sqlalchemy.pool.NullPool
                )
            with self._connect() as conn:
                if self.kind == "postgresql":
                    lock = "SELECT pg_advisory_lock(:k)"
                    unlock = "SELECT pg_advisory_unlock(:k)"
                    args: dict[str, Any] = {"k": self._key()}
                else:
                    lock, unlock = "SELECT GET_LOCK(:k, -1)", "SELECT RELEASE_LOCK(:k)"
                    args = {"k": f"optuna-sweeper:{self.study_name}"[:64]}
                conn.execute(sqlalchemy.text(lock), args)
                try:
                    yield
                finally:
                    conn.execute(sqlalchemy.text(unlock), args)
                    conn.commit()
        else:
            yield

    def _connect(self) -> Any:
        """A connection for the lock; a server that refuses is named, never a raw traceback."""
        from sqlalchemy.exc import SQLAlchemyError

        try:
            conn = self._engine.connect()
        except SQLAlchemyError as error:
            if self._connected:  # mid-sweep: the loop's own handling
                raise RuntimeError(storage_problem(self.url, error)) from None
            raise StorageRefused(f"error: {storage_problem(self.url, error)}") from None
        self._connected = True
        return conn

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None


# --- Secrets: the one redaction every output calls -----------------------------------------
# Everything a sweep writes or prints (terminal and log lines, MLflow params, tags, descriptions
# and artifacts, summaries, trials.csv, Optuna user attrs, error messages) passes through
# `redact`; search/ reaches it through search/sweep_context.py.

MASK = "***"
# Environment variables that hold a credential, or a URL that may carry one: MLflow's client
# reads MLFLOW_TRACKING_USERNAME/PASSWORD/TOKEN, libpq reads PGPASSWORD.
SECRET_ENV = ("MLFLOW_TRACKING_URI", "OPTUNA_STORAGE", "OPTUNA_SWEEPER_STORAGE",
              "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN", "PGPASSWORD")
# Where `secrets_out_of_overrides` moves a command-line URL that carries a password.
SECRET_ENV_PREFIX = "SWEEP_SECRET_"
# `scheme://user:password@`: the password runs to the last `@` of the word (an unescaped `@`
# or `/` in a password still ends up masked).
_USERINFO = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.\-]*://[^\s:/@'\"]*):[^\s'\"]*@")
_SHORTEST = 4  # shorter values are not replaced verbatim in free text: they would mangle it


def _known_secrets() -> list[str]:
    """Credentials this process holds in its environment, as written and URL-(un)quoted."""
    from urllib.parse import quote, unquote

    found: set[str] = set()
    # a snapshot of the names, then .get: another thread (MLflow's telemetry) may unset a
    # variable mid-loop, and os.environ.items() would raise KeyError in this thread
    for name in list(os.environ):
        if name not in SECRET_ENV and not name.startswith(SECRET_ENV_PREFIX):
            continue
        value = os.environ.get(name)
        if not value:
            continue
        if "://" in value:
            for match in _USERINFO.finditer(value):
                found.add(match.group(0)[len(match["head"]) + 1:-1])
        elif name.endswith(("PASSWORD", "TOKEN")):
            found.add(value)
    found |= {unquote(s) for s in found} | {quote(s, safe="") for s in found}
    return sorted((s for s in found if len(s) >= _SHORTEST and s != MASK), key=len,
                  reverse=True)


def redact(text: str) -> str:
    """``text`` (a URL, a message, a file's content) with every credential masked.

    The password of each ``scheme://user:password@`` becomes ``***``, and any credential this
    process holds in its environment (``SECRET_ENV``, ``SWEEP_SECRET_*``) is masked wherever
    it appears. The one redaction: every output calls it.

    >>> redact("postgresql+psycopg://sweeps:pw@db:5432/optuna")
    'postgresql+psycopg://sweeps:***@db:5432/optuna'
    """
    if not isinstance(text, str) or not text:
        return text
    text = _USERINFO.sub(lambda m: f"{m['head']}:{MASK}@", text)
    for secret in _known_secrets():
        text = text.replace(secret, MASK)
    return text


def redact_tree(value: Any) -> Any:
    """``redact`` on every string of a nested dict / list / tuple (configs, summaries, attrs)."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {redact_tree(k): redact_tree(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact_tree(v) for v in value)
    return value


def secrets_out_of_overrides(argv: list[str]) -> list[str]:
    """Command-line overrides whose value carries a password, moved into the environment.

    Hydra saves the overrides and the composed config as written (``.hydra/*.yaml``,
    ``multirun.yaml``, ``hydra.job.override_dirname``); ``key=${oc.env:SWEEP_SECRET_KEY}``
    in their place keeps the password out of every saved file, and the value is resolved
    where the store is opened. Worker and final-stage processes inherit the environment.
    """
    install_log_redaction()
    out = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep or arg.startswith("-") or "${" in value or not _USERINFO.search(value):
            out.append(arg)
            continue
        if len(value) > 1 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]  # Hydra's own quotes around the value
        name = SECRET_ENV_PREFIX + re.sub(r"\W", "_", key.lstrip("+~")).upper()
        os.environ[name] = value
        out.append(f"{key}=${{oc.env:{name}}}")
    return out


def setting_of(url: str, key: str, env_name: str) -> str:
    """Where a URL came from, for messages: the environment variable or the config key."""
    if os.environ.get(env_name) == url:
        return f"${env_name} (used by {key})"
    return key


def _redacting_factory(base: Callable[..., logging.LogRecord]) -> Callable[..., logging.LogRecord]:
    def make(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = base(*args, **kwargs)
        try:
            message = record.getMessage()
            clean = redact(message)
            if clean != message:
                record.msg, record.args = clean, None
            if record.exc_info and record.exc_info[1] is not None:
                text = "".join(traceback.format_exception(*record.exc_info)).rstrip("\n")
                clean = redact(text)
                if clean != text:
                    record.exc_text = clean  # formatters use it instead of the raw traceback
        except Exception:  # noqa: BLE001 - a record that cannot be formatted is left to logging
            pass
        return record

    make.redacts = True  # type: ignore[attr-defined]
    return make


def install_log_redaction() -> None:
    """Every log record of this process passes through ``redact`` (idempotent).

    A record factory, not a handler filter: Hydra re-creates the handlers for each job (and
    the workers' console replaces them), while the factory outlives them, and it covers the
    libraries' loggers (MLflow, SQLAlchemy, Optuna) as well as ours.
    """
    base = logging.getLogRecordFactory()
    if not getattr(base, "redacts", False):
        logging.setLogRecordFactory(_redacting_factory(base))


# Installed on import: every Hydra process of a sweep (sweeper, workers, jobs) imports this
# module (the plugin scan, trial_context), before it logs anything that could hold a URL.
install_log_redaction()
