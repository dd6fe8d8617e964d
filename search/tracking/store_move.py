"""A local store that can move: a re-cloned, copied or container-mounted `mlruns/` keeps its
artifact and model views.

MLflow records absolute artifact locations (`file:///old/place/mlruns/artifacts/<run>/...`)
in its database, and has no command or API to change them (an experiment's
`artifact_location` is fixed at creation), so after a move every artifact, model and model
version points at the old place. Rewritten here with SQL, by hand for that reason, and only
when the store's own `artifacts/` folder holds the runs the database names: a store whose
artifacts are meant to live elsewhere (`tracking.artifact_root`) is left alone.

`python -m search.tracking.store_move [mlruns/mlflow.db]` does it; every command that opens
the store
(a run, a sweep, pull, predict) does it first too.
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


def relocate(db: Path) -> tuple[Path | None, int]:
    """Point the locations at the store's current folder; (old folder, rows changed)."""
    store = db.resolve().parent
    con = sqlite3.connect(db, timeout=30, isolation_level=None)
    try:
        con.execute("BEGIN IMMEDIATE")  # two commands starting at once: one rewrites
        old = _old_store(con, store)
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
    """For a local SQLite store: rewrite its locations if its folder moved (logged)."""
    if not tracking_uri.startswith("sqlite:///"):
        return 0
    db = Path(tracking_uri.removeprefix("sqlite:///"))
    if not db.is_file():
        return 0
    old, changed = relocate(db)
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
    old, changed = relocate(db)
    print(f"{db}: moved from {old}, {changed} location(s) rewritten" if changed
          else f"{db}: its locations already point at {db.resolve().parent}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
