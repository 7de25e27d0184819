"""Ledger: one row per run, written transactionally, correct with many writer processes at once."""

from __future__ import annotations

import multiprocessing
import sqlite3
from contextlib import closing
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from reprokit.config import TrainConfig
from reprokit.data import load_dataset
from reprokit.ledger import COLUMNS, Ledger, LedgerError, default_ledger_path, runs
from reprokit.provenance import build_manifest
from reprokit.seeding import seed_everything

WRITERS, RUNS_EACH = 8, 25


def _manifest(run_id: str, *, seed: int = 0, model: str = "cnn", parent: dict[str, str] | None = None
              ) -> dict[str, Any]:
    """The manifest keys the ledger reads (a full manifest is tested below)."""
    return {"run_id": run_id, "fingerprint": f"fp-{model}-{seed}",
            "config": {"seed": seed, "model": model, "dataset": "digits"}, "lineage": {"parent": parent}}


def test_start_and_finish_record_one_row(tmp_path: Path) -> None:
    """A started run is a running row built from a real manifest; finish fills digest, metric, end."""
    ledger = Ledger(tmp_path / "ledger.sqlite")
    manifest = build_manifest(TrainConfig(model="mlp", seed=3), seed_everything(3, threads=1),
                              load_dataset("digits"), repo_dir=tmp_path)
    run_id = ledger.start(manifest, tmp_path / "run")
    row = ledger.frame().iloc[0]
    assert (row["id"], row["status"], row["seed"], row["model"], row["dataset"]) == (
        manifest["run_id"], "running", 3, "mlp", "digits")
    assert row["fingerprint"] == manifest["fingerprint"]
    assert row["run_dir"] == str((tmp_path / "run").resolve())
    assert pd.isna(row["ended"]) and pd.isna(row["parent"])
    ledger.finish(run_id, "abc123", 0.875)
    row = ledger.frame().iloc[0]
    assert (row["status"], row["final_digest"], row["final_metric"]) == ("finished", "abc123", 0.875)
    assert row["ended"] >= row["started"]


def test_starting_a_run_twice_is_an_error_naming_it(tmp_path: Path) -> None:
    """A second start with the same run id is refused and the first row is left as it was."""
    ledger = Ledger(tmp_path / "ledger.sqlite")
    ledger.start(_manifest("run-a"), tmp_path / "a")
    with pytest.raises(LedgerError, match="run id 'run-a' is already in the ledger"):
        ledger.start(_manifest("run-a", seed=9), tmp_path / "b")
    assert ledger.frame()["seed"].tolist() == [0]
    with pytest.raises(LedgerError, match="manifest has no run_id"):
        ledger.start({"config": {}}, tmp_path / "c")


def test_status_moves_only_along_allowed_transitions(tmp_path: Path) -> None:
    """running -> crashed -> resumed -> finished works; leaving finished or naming no run fails."""
    ledger = Ledger(tmp_path / "ledger.sqlite")
    ledger.start(_manifest("r"), tmp_path / "r")
    ledger.mark("r", "crashed")
    assert ledger.frame()["ended"].notna().all()
    ledger.mark("r", "resumed")
    assert ledger.frame()["ended"].isna().all()  # running again
    ledger.finish("r", "d", 0.5)
    with pytest.raises(LedgerError, match=r"is 'finished' and cannot become 'crashed'; .* only become \[\]"):
        ledger.mark("r", "crashed")
    with pytest.raises(LedgerError, match="status 'lost' is unknown"):
        ledger.mark("r", "lost")
    with pytest.raises(LedgerError, match=r"use Ledger\.finish"):
        ledger.mark("r", "finished")
    with pytest.raises(LedgerError, match="run id 'nope' is not in the ledger"):
        ledger.finish("nope", "d", 0.5)
    assert ledger.frame()["status"].tolist() == ["finished"]


def test_runs_filters_by_column_equality(tmp_path: Path) -> None:
    """runs(status=..., model=...) keeps exactly the matching rows; parent is the parent's run id."""
    path = tmp_path / "ledger.sqlite"
    ledger = Ledger(path)
    for run_id, model in [("a", "cnn"), ("b", "mlp"), ("c", "cnn")]:
        ledger.start(_manifest(run_id, model=model), tmp_path / run_id)
    ledger.start(_manifest("d", parent={"run_id": "a", "digest": "x"}), tmp_path / "d")
    ledger.finish("a", "da", 0.9)
    ledger.finish("b", "db", 0.8)
    assert runs(path, status="finished", model="cnn")["id"].tolist() == ["a"]
    assert runs(path, model="cnn")["id"].tolist() == ["a", "c", "d"]
    assert runs(path, parent="a")["id"].tolist() == ["d"]
    assert runs(path, parent=None)["id"].tolist() == ["a", "b", "c"]
    assert list(runs(path).columns) == list(COLUMNS)


def test_unknown_filter_column_is_an_error_listing_the_columns(tmp_path: Path) -> None:
    """Filtering on a column the ledger lacks names it and lists the ones it has."""
    path = tmp_path / "ledger.sqlite"
    Ledger(path)
    expected = r"unknown ledger column\(s\) \['colour'\]; filter on one of \['id', 'run_dir'.*'parent'\]"
    with pytest.raises(LedgerError, match=expected):
        runs(path, colour="red")


def test_a_missing_ledger_has_no_runs_and_is_not_created(tmp_path: Path) -> None:
    """Reading a ledger that does not exist gives an empty frame with the columns, and no file."""
    frame = runs(tmp_path / "none.sqlite")
    assert frame.empty and list(frame.columns) == list(COLUMNS)
    assert not (tmp_path / "none.sqlite").exists()
    with pytest.raises(LedgerError, match="is not a file"):
        Ledger(tmp_path)


def test_default_path_is_the_env_variable_else_runs_under_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """REPROKIT_LEDGER wins; else the ledger sits in the runs root, by default runs/ under cwd."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("REPROKIT_LEDGER", raising=False)
    assert default_ledger_path() == tmp_path / "runs" / "ledger.sqlite"
    assert default_ledger_path(tmp_path / "sweep") == tmp_path / "sweep" / "ledger.sqlite"
    monkeypatch.setenv("REPROKIT_LEDGER", str(tmp_path / "elsewhere.sqlite"))
    Ledger().start(_manifest("x"), tmp_path / "x")
    assert default_ledger_path(tmp_path / "sweep") == tmp_path / "elsewhere.sqlite"
    assert runs()["id"].tolist() == ["x"] and (tmp_path / "elsewhere.sqlite").is_file()


def _write_runs(path: str, writer: int, barrier: Any) -> None:
    ledger = Ledger(path)
    barrier.wait()  # every writer starts at once, so they really contend for the lock
    for i in range(RUNS_EACH):
        run_id = f"w{writer}-r{i}"
        ledger.start(_manifest(run_id, seed=writer), f"runs/{run_id}")
        ledger.finish(run_id, f"digest-{run_id}", float(i))


def test_eight_concurrent_writer_processes_lose_and_duplicate_nothing(tmp_path: Path) -> None:
    """8 processes each starting and finishing 25 runs at once leave exactly 200 finished rows."""
    path = tmp_path / "ledger.sqlite"
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    barrier = ctx.Barrier(WRITERS)
    procs = [ctx.Process(target=_write_runs, args=(str(path), w, barrier)) for w in range(WRITERS)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0] * WRITERS
    frame = runs(path)
    assert len(frame) == WRITERS * RUNS_EACH and frame["id"].is_unique
    assert (frame["status"] == "finished").all()
    assert (frame["final_digest"] == "digest-" + frame["id"]).all()
    assert frame.groupby("seed").size().to_dict() == dict.fromkeys(range(WRITERS), RUNS_EACH)
    with closing(sqlite3.connect(path)) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
