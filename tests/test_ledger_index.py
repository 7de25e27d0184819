"""The ledger is an index, not the record: a broken ledger is set aside and rebuilt from run directories."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import reprokit
from reprokit.ledger import Ledger, rebuild, runs
from reprokit.ledgerentry import LedgerEntry


def _script_run(run_dir: Path, *, steps: int = 3, finish: bool = True) -> str:
    """A tiny reprokit.Run in this process; returns its final digest ('' if left unfinished)."""
    run = reprokit.Run(run_dir, seed=0, config={"lr": 0.1}, progress=False, steps=steps)
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    run.track(model=model, optimizer=optimizer)
    for _ in run.epochs(1):
        for _ in range(steps):
            optimizer.zero_grad()
            loss = model(torch.ones(3, 4)).pow(2).mean()
            loss.backward()
            optimizer.step()
            run.step(loss=loss)
    if not finish:
        run.close()
        return ""
    return run.finish(loss=loss.item()).final_digest


@pytest.mark.parametrize("damage", ["garbage", "truncated", "foreign"])
def test_an_unusable_ledger_is_set_aside_and_a_new_one_started(
    tmp_path: Path, damage: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "ledger.sqlite"
    if damage == "garbage":
        path.write_bytes(b"this is not a database\n" * 40)
    elif damage == "truncated":
        Ledger(path)
        with sqlite3.connect(path) as conn:  # enough pages that half the file is a torn database
            conn.executemany("INSERT INTO runs (id, run_dir, started, status) VALUES (?, ?, ?, ?)",
                             [(f"r{i}", "x" * 500, "2026-01-01", "running") for i in range(200)])
        conn.close()
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    else:
        with sqlite3.connect(path) as conn:
            conn.execute("CREATE TABLE runs (name TEXT)")
        conn.close()
    before = path.read_bytes()
    ledger = Ledger(path)
    err = capsys.readouterr().err
    assert "is not usable" in err and "set aside as ledger.sqlite.broken-" in err
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("ledger.sqlite.broken-") and
             not p.name.endswith(("-wal", "-shm"))]
    assert len(aside) == 1 and aside[0].read_bytes() == before  # kept, unchanged, for a look
    assert ledger.frame().empty


def test_a_run_trains_through_a_garbage_ledger(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """The ledger turns to garbage in the middle of a run: the run still finishes (warnings only)."""
    monkeypatch.setenv("REPROKIT_LEDGER", str(tmp_path / "ledger.sqlite"))
    entry = LedgerEntry.open(tmp_path / "run", {"run_id": "abc", "config": {}})
    assert entry is not None
    (tmp_path / "ledger.sqlite").write_bytes(b"\0garbage" * 100)
    for suffix in ("-wal", "-shm"):
        (tmp_path / f"ledger.sqlite{suffix}").unlink(missing_ok=True)
    entry.finish("digest", 0.5)
    assert "could not record run abc as finished" in capsys.readouterr().err
    digest = _script_run(tmp_path / "a")
    assert json.loads((tmp_path / "a" / "result.json").read_text())["final_digest"] == digest


def test_the_legal_kill_and_relaunch_sequence_never_errors(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.sqlite")
    ledger.start({"run_id": "r", "config": {}}, tmp_path / "r")
    for status in ("crashed", "resumed", "crashed", "resumed"):
        ledger.mark("r", status)
    ledger.finish("r", "d", 1.0)
    assert ledger.frame()["status"].tolist() == ["finished"]


def test_rebuild_writes_the_ledger_again_from_the_run_directories(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Finished runs come back with their digest and metric, an unfinished one as crashed; the
    old file is set aside; the CLI does the same."""
    root = tmp_path / "runs"
    monkeypatch.setenv("REPROKIT_LEDGER", str(root / "ledger.sqlite"))
    done = _script_run(root / "done")
    _script_run(root / "killed", finish=False)
    (root / "ledger.sqlite").write_bytes(b"garbage")
    assert rebuild(root) == 2
    table = runs(root / "ledger.sqlite").set_index("run_dir")
    assert table.loc[str((root / "done").resolve()), "status"] == "finished"
    assert table.loc[str((root / "done").resolve()), "final_digest"] == done
    assert table.loc[str((root / "killed").resolve()), "status"] == "crashed"
    manifest = json.loads((root / "done" / "manifest.json").read_text())
    assert manifest["run_id"] in set(table["id"])
    assert any(p.name.startswith("ledger.sqlite.broken-") for p in root.iterdir())
    cli = subprocess.run([sys.executable, "-m", "reprokit", "runs", "--rebuild", "--root", str(root)],
                         capture_output=True, text=True, check=False)
    assert cli.returncode == 0 and "2 runs" in cli.stdout and "finished" in cli.stdout, cli.stderr


def test_a_run_whose_ledger_breaks_before_finish_still_finishes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Run.finish with a ledger that turned to garbage after the run began: result.json is written,
    the ledger's failure is a warning."""
    monkeypatch.setenv("REPROKIT_LEDGER", str(tmp_path / "ledger.sqlite"))
    run = reprokit.Run(tmp_path / "run", seed=0, progress=False)
    model = torch.nn.Linear(2, 1)
    run.track(model=model)
    run.begin()
    (tmp_path / "ledger.sqlite").write_bytes(b"\0garbage" * 100)
    for suffix in ("-wal", "-shm"):
        (tmp_path / f"ledger.sqlite{suffix}").unlink(missing_ok=True)
    summary = run.finish()
    assert "could not record run" in capsys.readouterr().err
    assert json.loads((tmp_path / "run" / "result.json").read_text())["final_digest"] == summary.final_digest
