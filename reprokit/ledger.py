"""The run ledger: one row per run in an embedded SQLite database, safe for parallel writers.

papermill sweeps run many trainings at once in separate processes, all recording into one file.
Each write is one short ``BEGIN IMMEDIATE`` transaction (the write lock is taken up front, so two
writers never both read and then collide on upgrading to a write), the journal is WAL (readers do
not block the writer), and a writer that still finds the database locked after the busy timeout
backs off and retries. WAL needs a local filesystem (sqlite.org/wal.html): keep the ledger off NFS.
"""

from __future__ import annotations

import os
import random
import sqlite3
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import pandas as pd

from reprokit.errors import ReprokitError

LEDGER_ENV = "REPROKIT_LEDGER"
BUSY_TIMEOUT = 30.0  # seconds sqlite itself waits for the lock; a write holds it for milliseconds
RETRY_SECONDS = 120.0  # total time a writer keeps retrying "database is locked" before giving up
STATUSES = ("running", "finished", "crashed", "resumed")
# a SIGKILLed run cannot mark itself crashed, so a resume may find it still "running"
TRANSITIONS = {
    "running": ("finished", "crashed", "resumed"),
    "crashed": ("resumed",),
    "resumed": ("finished", "crashed", "resumed"),
    "finished": (),
}
COLUMNS = ("id", "run_dir", "started", "ended", "status", "fingerprint", "seed", "model", "dataset",
           "final_digest", "final_metric", "parent")
_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY,         -- the manifest's run_id
    run_dir TEXT NOT NULL,
    started TEXT NOT NULL,       -- ISO 8601, UTC
    ended TEXT,                  -- set when finished or crashed, cleared by a resume
    status TEXT NOT NULL CHECK (status IN {STATUSES!r}),
    fingerprint TEXT,
    seed INTEGER,
    model TEXT,
    dataset TEXT,
    final_digest TEXT,
    final_metric REAL,
    parent TEXT                  -- the parent's run id, or its model digest if it has none
)
"""
_T = TypeVar("_T")


class LedgerError(ReprokitError, ValueError):
    """A ledger operation refers to a run or column that does not fit."""


def default_ledger_path(runs_root: str | Path | None = None) -> Path:
    """``$REPROKIT_LEDGER`` if set, else ``ledger.sqlite`` in ``runs_root`` (the directory holding
    the run directories; default ``runs/`` under the working directory).

    Next to the runs rather than in the home directory, so each project (and each test's temporary
    directory) has its own ledger listing the run directories beside it; a sweep whose runs live in
    several places sets ``REPROKIT_LEDGER``, which its worker processes inherit.
    """
    env = os.environ.get(LEDGER_ENV)
    if env:
        return Path(env)
    return (Path(runs_root) if runs_root is not None else Path.cwd() / "runs") / "ledger.sqlite"


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def _locked(e: sqlite3.OperationalError) -> bool:
    text = str(e).lower()
    return "locked" in text or "busy" in text


class Ledger:
    """One ledger file. Each call opens its own short connection, so a Ledger is safe to share
    with (or recreate in) worker processes."""

    def __init__(self, path: str | Path | None = None) -> None:
        """Open the ledger at ``path`` (default :func:`default_ledger_path`), creating it if needed."""
        self.path = Path(path) if path is not None else default_ledger_path()
        if self.path.exists() and not self.path.is_file():
            raise LedgerError(f"ledger path {str(self.path)!r} is not a file; pass a .sqlite file path")
        self.path.parent.mkdir(parents=True, exist_ok=True)

        def setup(conn: sqlite3.Connection) -> None:
            conn.execute("PRAGMA journal_mode=WAL")  # persistent: stored in the file
            with _transaction(conn):
                conn.execute(_SCHEMA)

        self._retry(setup)

    def _retry(self, work: Callable[[sqlite3.Connection], _T]) -> _T:
        """Run ``work`` on a fresh connection, retrying with jittered backoff while locked."""
        deadline, delay = time.monotonic() + RETRY_SECONDS, 0.01
        while True:
            conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT, isolation_level=None)
            try:
                return work(conn)
            except sqlite3.OperationalError as e:
                if not _locked(e) or time.monotonic() > deadline:
                    raise
            finally:
                conn.close()
            time.sleep(delay * (1 + random.random()))
            delay = min(delay * 2, 1.0)

    def start(self, manifest: Mapping[str, Any], run_dir: str | Path) -> str:
        """Add a ``running`` row for the run ``manifest`` describes; returns its run id."""
        run_id = manifest.get("run_id")
        if not isinstance(run_id, str):
            raise LedgerError("manifest has no run_id; build it with reprokit.provenance.build_manifest")
        config = manifest.get("config", {})
        parent = (manifest.get("lineage") or {}).get("parent") or {}
        row = (run_id, str(Path(run_dir).resolve()), _now(), "running", manifest.get("fingerprint"),
               config.get("seed"), config.get("model"), config.get("dataset"),
               parent.get("run_id") or parent.get("digest"))

        def insert(conn: sqlite3.Connection) -> None:
            with _transaction(conn):
                conn.execute("INSERT INTO runs (id, run_dir, started, status, fingerprint, seed, model, "
                              "dataset, parent) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", row)

        try:
            self._retry(insert)
        except sqlite3.IntegrityError as e:
            raise LedgerError(
                f"run id {run_id!r} is already in the ledger {str(self.path)!r}; every run needs a new "
                "manifest (build_manifest gives it a fresh run_id)"
            ) from e
        return run_id

    def finish(self, run_id: str, final_digest: str, final_metric: float | None) -> None:
        """Mark a run ``finished`` with its final model digest and metric."""
        self._move(run_id, "finished", {"final_digest": final_digest, "final_metric": final_metric})

    def mark(self, run_id: str, status: str) -> None:
        """Move a run to ``crashed`` or ``resumed`` (``finished`` goes through :meth:`finish`)."""
        if status not in STATUSES:
            raise LedgerError(f"status {status!r} is unknown; choose one of {list(STATUSES)}")
        if status == "finished":
            raise LedgerError(f"run {run_id!r}: use Ledger.finish to record the final digest and metric")
        self._move(run_id, status, {})

    def _move(self, run_id: str, status: str, values: dict[str, Any]) -> None:
        # ended: when the run stopped; a resume starts it again
        values = {**values, "status": status, "ended": None if status == "resumed" else _now()}

        def update(conn: sqlite3.Connection) -> None:
            with _transaction(conn):  # read and write under one lock: no lost transition
                found = conn.execute("SELECT status FROM runs WHERE id = ?", (run_id,)).fetchone()
                if found is None:
                    raise LedgerError(
                        f"run id {run_id!r} is not in the ledger {str(self.path)!r}; call Ledger.start "
                        "first, or pass the ledger the run was started in"
                    )
                allowed = TRANSITIONS[found[0]]
                if status not in allowed:
                    raise LedgerError(
                        f"run {run_id!r} is {found[0]!r} and cannot become {status!r}; from "
                        f"{found[0]!r} it can only become {list(allowed)}"
                    )
                sets = ", ".join(f"{k} = ?" for k in values)
                conn.execute(f"UPDATE runs SET {sets} WHERE id = ?", (*values.values(), run_id))

        self._retry(update)

    def frame(self, **filters: Any) -> pd.DataFrame:
        """The runs as a DataFrame, oldest first; ``filters`` keep rows whose column equals the
        value (``status="finished"``, ``model="cnn"``; ``None`` matches empty cells)."""
        _check_filters(filters)
        where = " AND ".join(f"{k} IS ?" for k in filters) or "1"  # IS: equality that also matches NULL
        query = f"SELECT {', '.join(COLUMNS)} FROM runs WHERE {where} ORDER BY started, id"
        rows = self._retry(lambda conn: conn.execute(query, tuple(filters.values())).fetchall())
        return _typed(pd.DataFrame(rows, columns=list(COLUMNS)))


@contextmanager
def _transaction(conn: sqlite3.Connection) -> Iterator[None]:
    """``BEGIN IMMEDIATE`` ... ``COMMIT``, rolled back if the body raises."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        if conn.in_transaction:  # a failed statement may have rolled back already
            conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def _check_filters(filters: Mapping[str, Any]) -> None:
    unknown = sorted(set(filters) - set(COLUMNS))
    if unknown:
        raise LedgerError(f"unknown ledger column(s) {unknown}; filter on one of {list(COLUMNS)}")


def _typed(frame: pd.DataFrame) -> pd.DataFrame:
    for column in ("started", "ended"):
        frame[column] = pd.to_datetime(frame[column], utc=True, format="ISO8601")
    frame["seed"] = frame["seed"].astype("Int64")  # nullable: a run may lack a seed
    frame["final_metric"] = frame["final_metric"].astype(float)
    return frame


def runs(path: str | Path | None = None, **filters: Any) -> pd.DataFrame:
    """The ledger at ``path`` (default :func:`default_ledger_path`) as a DataFrame, filtered by
    column equality, e.g. ``runs(status="finished", model="cnn")``.

    A ledger that does not exist yet has no runs: an empty frame, and no file is created.
    """
    target = Path(path) if path is not None else default_ledger_path()
    if not target.exists():
        _check_filters(filters)
        return _typed(pd.DataFrame([], columns=list(COLUMNS)))
    return Ledger(target).frame(**filters)


@dataclass(frozen=True)
class LedgerEntry:
    """A run's row in the ledger next to its run directory (see :func:`default_ledger_path`)."""

    ledger: Ledger
    run_id: str

    @classmethod
    def open(cls, run_dir: Path, manifest: dict[str, Any], *, resumed: bool = False) -> LedgerEntry | None:
        """Start the run's row, or mark it resumed. ``None`` when a copy of this run directory
        already finished under this ledger: the row keeps describing that copy."""
        ledger = Ledger(default_ledger_path(run_dir.resolve().parent))
        run_id = str(manifest["run_id"])
        if not resumed:
            ledger.start(manifest, run_dir)
            return cls(ledger, run_id)
        rows = ledger.frame(id=run_id)
        if rows.empty:  # started under another ledger (the directory was moved or copied)
            ledger.start(manifest, run_dir)
        elif rows["status"].iloc[0] == "finished":
            return None
        ledger.mark(run_id, "resumed")
        return cls(ledger, run_id)
