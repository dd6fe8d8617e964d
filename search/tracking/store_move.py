"""A local store that can move: a re-cloned, copied or container-mounted `mlruns/` keeps its
artifact and model views.

MLflow records absolute artifact locations (`file:///old/place/mlruns/artifacts/<run>/...`)
in its database, and has no command or API to change them (an experiment's
`artifact_location` is fixed at creation), so after a move every artifact, model and model
version points at the old place. Rewritten here with SQL, by hand for that reason, and only
when the store's own `artifacts/` folder holds the runs the database names: a store whose
artifacts are meant to live elsewhere (`tracking.artifact_root`) is left alone.

`python -m search.tracking.store_move [mlruns/mlflow.db]` does it; every command that opens
the store (a run, a sweep, pull, predict) does it first too. The check itself only reads
(`mode=ro`): a store that has not moved is never locked, so pull and predict run while another
process writes it.
"""

from __future__ import annotations

import argparse
import logging
import sqlite3
from pathlib import Path

from search import REPO_ROOT

log = logging.getLogger(__name__)

# Every column of MLflow 3's schema that holds an artifact location.
LOCATION_COLUMNS = (("experiments", "artifact_location"), ("runs", "artifact_uri"),
                    ("model_versions", "storage_location"), ("logged_models", "artifact_location"))


def _old_store(con: sqlite3.Connection, store: Path) -> Path | None:
    """The folder the store was at when its runs were logged, if it has moved since."""
    rows = con.execute("SELECT run_uuid, artifact_uri FROM runs "
                       "WHERE artifact_uri LIKE 'file://%'").fetchall()
    for run_id, uri in rows:
        suffix = f"/artifacts/{run_id}/artifacts"
        if not uri.endswith(suffix):
            continue
        old = Path(uri.removeprefix("file://")[: -len(suffix)])
        if old != store and (store / "artifacts" / run_id).is_dir():
            return old
    return None


class StoreMoveError(RuntimeError):
    """A moved store whose locations must be rewritten, but cannot be (read-only, locked)."""


def _read_only(db: Path) -> sqlite3.Connection:
    """A connection that cannot write or take a write lock (SQLite's ``mode=ro``): the check
    runs in every command, and read-only ones (pull, predict) must never wait on a writer."""
    return sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True, timeout=30)


def moved_from(db: Path) -> Path | None:
    """The folder the store was at when its runs were logged, if it moved since (read-only)."""
    con = _read_only(db)
    try:
        return _old_store(con, db.resolve().parent)
    finally:
        con.close()


def relocate(db: Path) -> tuple[Path | None, int]:
    """Point the locations at the store's current folder; (old folder, rows changed).

    Looks first without a write lock; only a store that moved is opened for writing.
    """
    if moved_from(db) is None:
        return None, 0
    store = db.resolve().parent
    con = sqlite3.connect(db, timeout=30, isolation_level=None)
    try:
        con.execute("BEGIN IMMEDIATE")  # two commands starting at once: one rewrites
        old = _old_store(con, store)  # again, under the lock: the other may have done it
        changed = 0
        if old is not None:
            tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master")}
            for before, after in ((f"file://{old}/", f"file://{store}/"),
                                  (f"{old}/", f"{store}/")):
                for table, column in LOCATION_COLUMNS:
                    if table not in tables:
                        continue
                    changed += con.execute(
                        f"UPDATE {table} SET {column} = ? || substr({column}, ?) "  # noqa: S608
                        f"WHERE substr({column}, 1, ?) = ?",
                        (after, len(before) + 1, len(before), before)).rowcount
        con.execute("COMMIT")
    except BaseException:
        if con.in_transaction:
            con.execute("ROLLBACK")
        raise
    finally:
        con.close()
    return old, changed


def follow_move(tracking_uri: str) -> int:
    """For a local SQLite store: rewrite its locations if its folder moved (logged).

    Raises:
        StoreMoveError: it moved, but it cannot be written (read-only, or locked by another
            process for 30 s); the message names the store and the fix.
    """
    if not tracking_uri.startswith("sqlite:///"):
        return 0
    db = Path(tracking_uri.removeprefix("sqlite:///"))
    if not db.is_file():
        return 0
    try:
        old, changed = relocate(db)
    except sqlite3.OperationalError as error:
        raise StoreMoveError(
            f"the MLflow store {db} moved from {moved_from(db)}: its artifact locations "
            f"still point there and must be rewritten to {db.resolve().parent}, but it "
            f"cannot be written now ({error}); make the file and its folder writable (or "
            "wait for the process writing it) and re-run, or run "
            f"`python -m search.tracking.store_move {db}` once"
        ) from None
    if changed:
        log.warning("the MLflow store moved from %s to %s: %d artifact location(s) now point "
                    "at the new place", old, db.resolve().parent, changed)
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("db", nargs="?", default=str(REPO_ROOT
                                                     / "mlruns" / "mlflow.db"))
    args = parser.parse_args(argv)
    db = Path(args.db)
    if not db.is_file():
        print(f"error: no MLflow SQLite store at {db}")
        return 2
    try:
        old, changed = relocate(db)
    except sqlite3.OperationalError as error:
        print(f"error: {db} cannot be rewritten ({error}); make it and its folder writable "
              "(or wait for the process writing it) and re-run")
        return 2
    print(f"{db}: moved from {old}, {changed} location(s) rewritten" if changed
          else f"{db}: its locations already point at {db.resolve().parent}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
