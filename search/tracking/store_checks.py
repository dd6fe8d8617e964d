"""Can the MLflow store be used, before any data is loaded: a server that answers, a login it
accepts, a database password that works, a local SQLite file that can be written; each
refusal a `TrackingError` naming the setting it came from and the fix, with no secret in it."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import mlflow

from search import sweep_context
from search.tracking.store_move import StoreMoveError, follow_move

log = logging.getLogger("search.tracking.mlflow_runs")  # its lines read as before the split

redact_uri = sweep_context.redact


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
    # MLflow announces a new or migrated schema at INFO in its own format ("Creating initial
    # MLflow database tables...", "Updating database tables"); its warnings still show.
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
    try:
        with sqlite_init_lock(uri):
            mlflow.MlflowClient(uri).search_experiments(max_results=1)
            follow_move(uri)  # a moved mlruns/ keeps its artifact and model views
            check_sqlite_writable(uri)
    except Exception as error:  # noqa: BLE001 - SQLAlchemy / MLflow / OS errors, re-raised named
        if not uri.startswith("sqlite:///"):
            raise TrackingError(store_problem(uri, error)) from None
        raise TrackingError(sqlite_store_problem(uri, error)) from None


def public_uri(uri: str) -> str:
    """A server URI without its user:password part: links and commands people copy must
    work, so credentials are left out (MLflow reads MLFLOW_TRACKING_USERNAME/PASSWORD)."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(uri)
    host = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit(parts._replace(netloc=host)).rstrip("/")
