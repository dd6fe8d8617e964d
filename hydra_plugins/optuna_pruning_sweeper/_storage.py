"""Study storage: URLs, SQLite paths, the RDB storage, the ask lock and password redaction.

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
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import optuna

# Named as before the module went private, so its log lines read as they did.
log = logging.getLogger(__name__.replace("._", "."))


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
            f"hydra.sweeper.storage={redact(url)!r} is not a usable database URL ({error}); use "
            "sqlite:///path/optuna.db or postgresql+psycopg://user@host/db (pip install -e "
            "'.[postgres]')"
        ) from None
    except ImportError as error:
        raise ValueError(
            f"hydra.sweeper.storage={redact(url)!r} needs a database driver that is not "
            f"installed ({error}); for PostgreSQL: pip install -e '.[postgres]'"
        ) from None


def check_shareable(url: str) -> None:
    """Refuse storages that worker processes cannot open (in-memory SQLite)."""
    if url.startswith("sqlite") and (":memory:" in url or url.rstrip("/") == "sqlite:"):
        raise ValueError(
            f"hydra.sweeper.storage={url!r} cannot be shared with worker processes: "
            "use a SQLite file (sqlite:///path/optuna.db) or a database server URL"
        )


def redact(url: str) -> str:
    """Storage URL without its password."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - not a SQLAlchemy URL
        return url


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
            raise RuntimeError(storage_problem(url, error)) from None


def storage_problem(url: str, error: BaseException) -> str:
    """A message for a storage that cannot be opened: which one, why, and what to do."""
    text = str(error).splitlines()[0][:300]
    where = f"hydra.sweeper.storage={redact(url)!r}"
    if url.startswith("sqlite"):
        from sqlalchemy.engine import make_url

        db = make_url(url).database
        if "not a database" in text or "malformed" in text:
            return (f"{where}: {db} is not a usable SQLite database ({text}). It was not "
                    "modified: move it aside (or restore a backup) and re-run, or point "
                    "hydra.sweeper.storage elsewhere")
        return (f"{where}: cannot open or write {db} ({text}); make the file and its folder "
                "writable, or point hydra.sweeper.storage elsewhere")
    return (f"{where}: the database cannot be reached or used ({text}); check that the server "
            "runs, the database exists and the credentials (from the environment) are right")


class AskLock:
    """Makes count-then-ask (and study creation) atomic across sweeper processes."""

    def __init__(self, url: str, study_name: str) -> None:
        self.url = url
        self.study_name = study_name
        self._local = threading.Lock()
        self._file: Any = None
        self._engine: Any = None
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

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        with self._local:
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
                with self._engine.connect() as conn:
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

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None
