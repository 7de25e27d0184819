"""The run ledger: one row per run in an embedded SQLite database, safe for parallel writers.

papermill sweeps run many trainings at once in separate processes, all recording into one file.
Each write is one short ``BEGIN IMMEDIATE`` transaction (the write lock is taken up front, so two
writers never both read and then collide on upgrading to a write), the journal is WAL (readers do
not block the writer), and a writer that still finds the database locked after the busy timeout
backs off and retries. WAL needs a local filesystem (sqlite.org/wal.html): keep the ledger off NFS.

The ledger is an index, not the record: the run directories are. A ledger file that is not a
ledger (garbage, truncated, another program's database) is set aside as ``ledger.sqlite.broken-*``
with a warning and a new one started, so training goes on; :func:`rebuild` (``reprokit runs
--rebuild``) writes it again from the run directories under its root.
"""

from __future__ import annotations

import contextlib
import os
import random
import sqlite3
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import pandas as pd

from reprokit.errors import ReprokitError, RunDirError
from reprokit.rundir import MANIFEST, RESULT, read_json

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
_INTEGER = range(-(2**63), 2**63)  # what an SQLite INTEGER holds (sqlite.org/datatype3.html)


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
            problem = _problem(conn)  # before anything is written: a foreign file stays as it was
            if problem:
                raise sqlite3.DatabaseError(problem)
            conn.execute("PRAGMA journal_mode=WAL")  # persistent: stored in the file
            with _transaction(conn):
                conn.execute(_SCHEMA)

        try:
            self._retry(setup)
        except sqlite3.DatabaseError as e:  # not a ledger: set it aside, start a new one
            if isinstance(e, sqlite3.OperationalError) and _locked(e):
                raise
            set_aside(self.path, str(e))
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
        run_id, row = _row(manifest, run_dir, started=_now(), status="running")

        def insert(conn: sqlite3.Connection) -> None:
            with _transaction(conn):
                _insert(conn, row)

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


def _row(manifest: Mapping[str, Any], run_dir: str | Path, *, started: str, status: str
         ) -> tuple[str, dict[str, Any]]:
    """The run id and the ledger row of the run ``manifest`` describes."""
    run_id = manifest.get("run_id")
    if not isinstance(run_id, str):
        raise LedgerError("manifest has no run_id; build it with reprokit.provenance.build_manifest")
    config = manifest.get("config")
    config = config if isinstance(config, Mapping) else {}
    parent = (manifest.get("lineage") or {}).get("parent") or {}
    seed = config.get("seed")
    return run_id, {
        "id": run_id, "run_dir": str(Path(run_dir).resolve()), "started": started, "status": status,
        "fingerprint": manifest.get("fingerprint"),
        # a user's config may hold any seed; one SQLite cannot store is left out of the index
        "seed": seed if type(seed) is int and seed in _INTEGER else None,
        "model": _text(config.get("model")), "dataset": _text(config.get("dataset")),
        "parent": _text(parent.get("run_id") or parent.get("digest")) if isinstance(parent, Mapping)
        else None,
    }


def _insert(conn: sqlite3.Connection, row: Mapping[str, Any]) -> None:
    columns, marks = ", ".join(row), ", ".join("?" * len(row))
    conn.execute(f"INSERT INTO runs ({columns}) VALUES ({marks})", tuple(row.values()))


def _text(value: Any) -> str | None:
    """``value`` if it is a str SQLite can store: UTF-8, so without a lone surrogate (JSON can spell one)."""
    if not isinstance(value, str):
        return None
    try:
        value.encode()
    except UnicodeEncodeError:
        return None
    return value


def _problem(conn: sqlite3.Connection) -> str | None:
    """Why the open database is not a usable ledger (None: it is)."""
    tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()]
    if not tables:
        return None  # new (or empty): the schema is created next
    check = conn.execute("PRAGMA quick_check").fetchone()
    if check is None or check[0] != "ok":
        return f"integrity check: {check[0] if check else 'no answer'}"
    columns = [r[1] for r in conn.execute("PRAGMA table_info(runs)").fetchall()]
    if tables != ["runs"] or tuple(columns) != COLUMNS:
        return f"it holds tables {tables} (runs: {columns}), not a ledger's runs {list(COLUMNS)}"
    return None


def set_aside(path: Path, why: str) -> Path:
    """Move an unusable ledger (and its -wal/-shm files) to ``NAME.broken-STAMP``, with a warning."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    target = path.with_name(f"{path.name}.broken-{stamp}-{os.getpid()}")
    for suffix in ("", "-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):  # another process may have moved it already
            os.replace(f"{path}{suffix}", f"{target}{suffix}")
    print(f"reprokit: the ledger {str(path)!r} is not usable ({why}); set aside as {target.name}, a new one "
          "is started (fill it from the run directories: reprokit runs --rebuild)", file=sys.stderr,
          flush=True)
    return target


def rebuild(root: str | Path, path: str | Path | None = None) -> int:
    """Write the ledger at ``path`` (default: ``ROOT/ledger.sqlite``, or ``$REPROKIT_LEDGER``) again
    from every run directory under ``root``: finished runs with their result, the others crashed.
    The old file, if any, is set aside. Returns the number of runs recorded."""
    root = Path(root)
    if not root.is_dir():
        raise LedgerError(f"{str(root)!r} is not a directory; pass the directory holding the run directories")
    target = Path(path) if path is not None else default_ledger_path(root)
    _check_replaceable(target)
    if target.exists() or target.is_symlink():
        set_aside(target, "rebuilt")
    ledger = Ledger(target)
    rows: dict[str, dict[str, Any]] = {}
    for manifest_path in sorted(root.rglob(MANIFEST)):
        run_dir = manifest_path.parent
        if "checkpoints" in run_dir.relative_to(root).parts or "ranks" in run_dir.relative_to(root).parts:
            continue  # a checkpoint's copy, or a rank's private directory: not a run of its own
        try:
            manifest = read_json(run_dir, MANIFEST)
            result = read_json(run_dir, RESULT) if (run_dir / RESULT).is_file() else None
            created = manifest.get("created")
            run_id, row = _row(manifest, run_dir, started=created if isinstance(created, str) else _now(),
                               status="finished" if result is not None else "crashed")
        except (RunDirError, LedgerError) as e:
            print(f"reprokit: skipped {run_dir}: {e}", file=sys.stderr)
            continue
        if result is not None:
            metric = result.get("final_metric")
            row["final_digest"] = _text(result.get("final_digest"))
            row["final_metric"] = float(metric) if isinstance(metric, int | float) else None
        rows.setdefault(run_id, row)  # a copied run directory: the first one found keeps the row

    def insert(conn: sqlite3.Connection) -> None:
        with _transaction(conn):
            for row in rows.values():
                _insert(conn, row)

    ledger._retry(insert)
    return len(rows)


def _check_replaceable(target: Path) -> None:
    """Refuse a rebuild's target that is not a ledger to set aside: a directory (a run directory,
    ``..``), or a file that is neither SQLite nor named .sqlite (a manifest.json named by mistake)."""
    if target.is_dir():
        raise LedgerError(f"ledger path {str(target)!r} is a directory; pass a .sqlite file path")
    if target.is_file() and target.suffix != ".sqlite" and not _is_sqlite(target):
        raise LedgerError(f"{str(target)!r} is neither an SQLite file nor named .sqlite, and a rebuild sets "
                          "the old file aside; pass a .sqlite file path")


def _is_sqlite(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(16) == b"SQLite format 3\0"  # https://www.sqlite.org/fileformat.html


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

    A ledger that does not exist yet, or an empty file, has no runs: an empty frame, and no file is
    written. A file that is not a ledger is a LedgerError; a reader leaves it where it is (a writer,
    :class:`Ledger`, sets it aside).
    """
    target = Path(path) if path is not None else default_ledger_path()
    _check_filters(filters)
    if not target.exists() or not _tables(target):
        return _typed(pd.DataFrame([], columns=list(COLUMNS)))
    return Ledger(target).frame(**filters)


def _tables(path: Path) -> bool:
    """Whether the ledger file ``path`` has its table (an empty file has none); a file that is not a
    ledger (garbage, another program's database, a directory) is a LedgerError naming it."""
    if not path.is_file():
        raise LedgerError(f"ledger path {str(path)!r} is not a file; pass a .sqlite file path")
    conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT)
    try:
        found = conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
        problem = _problem(conn) if found else None
    except sqlite3.DatabaseError as e:
        if isinstance(e, sqlite3.OperationalError) and _locked(e):
            raise
        problem = str(e)
    finally:
        conn.close()
    if problem:
        raise LedgerError(f"{str(path)!r} is not a ledger ({problem}); pass the ledger file, or write it "
                          "again from the run directories: reprokit runs --rebuild")
    return bool(found)
