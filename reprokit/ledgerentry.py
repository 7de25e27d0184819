"""A run's row in the ledger, written on a best-effort basis: a ledger that cannot be written is a
warning and the run goes on, since the ledger is an index and the run directory the record
(:mod:`reprokit.ledger`)."""

from __future__ import annotations

import sqlite3
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reprokit.ledger import Ledger, LedgerError, default_ledger_path


@dataclass(frozen=True)
class LedgerEntry:
    """A run's row in the ledger next to its run directory (see :func:`default_ledger_path`)."""

    ledger: Ledger
    run_id: str

    @classmethod
    def open(cls, run_dir: Path, manifest: dict[str, Any], *, resumed: bool = False) -> LedgerEntry | None:
        """Start the run's row, or mark it resumed. ``None`` when a copy of this run directory
        already finished under this ledger (the row keeps describing that copy), or when the ledger
        cannot be written: a warning, and the run goes on (the ledger is an index)."""
        try:
            return cls._open(run_dir, manifest, resumed=resumed)
        except (LedgerError, sqlite3.Error, OSError) as e:
            _warn(f"the run is not in the ledger ({e})")
            return None

    def finish(self, final_digest: str, final_metric: float | None) -> None:
        """Mark the row finished; a ledger that cannot be written is a warning, not an error."""
        try:
            self.ledger.finish(self.run_id, final_digest, final_metric)
        except (LedgerError, sqlite3.Error, OSError) as e:
            _warn(f"could not record run {self.run_id} as finished ({e}); rebuild: reprokit runs --rebuild")

    def mark(self, status: str) -> None:
        """Move the row to ``status``; a ledger that cannot be written is a warning."""
        try:
            self.ledger.mark(self.run_id, status)
        except (LedgerError, sqlite3.Error, OSError) as e:
            _warn(f"could not record run {self.run_id} as {status} ({e})")

    @classmethod
    def _open(cls, run_dir: Path, manifest: dict[str, Any], *, resumed: bool) -> LedgerEntry | None:
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


def _warn(message: str) -> None:
    print(f"reprokit: ledger: {message}", file=sys.stderr, flush=True)
