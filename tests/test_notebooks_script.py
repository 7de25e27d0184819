"""Notebooks 01-03 on the example script: a command (01, 03) or an existing run directory (02) in
place of the built-in trainer, run by the report runner, which checks the parameters first."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from reprokit.report import run_report

ROOT = Path(__file__).resolve().parents[1]
# one epoch of 45 steps, a checkpoint every 10, loaders in the main process
EXAMPLE = [sys.executable, str(ROOT / "examples" / "train_digits_reprokit.py"), "--epochs", "1",
           "--workers", "0"]
NOTEBOOKS = ("01_seed_determinism", "02_traceability", "03_recoverability")
CELL_TIMEOUT = 600.0  # generous: a hung notebook fails instead of holding the suite


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> pd.DataFrame:
    """The three notebooks run once on the example, under a profile that names it."""
    root = tmp_path_factory.mktemp("notebooks-script")
    run_dir = root / "traced-example"
    env = {k: v for k, v in os.environ.items() if not k.startswith("REPROKIT_")}
    done = subprocess.run(EXAMPLE, env={**env, "REPROKIT_RUN_DIR": str(run_dir), "REPROKIT_PROGRESS": "0",
                                        "REPROKIT_TRACE_EVERY": "5"},
                          capture_output=True, text=True, timeout=CELL_TIMEOUT, check=False)
    assert done.returncode == 0, done.stderr
    notebooks = root / "notebooks"
    notebooks.mkdir()
    for name in NOTEBOOKS:
        shutil.copy(ROOT / "notebooks" / f"{name}.ipynb", notebooks)
    command = shlex.join(EXAMPLE)
    profile = {"example": {
        "01_seed_determinism": {"command": command, "seeds": [0], "repeats": 2, "factor_seeds": 1,
                                "vary": {"deterministic": [True, False]}, "jobs": 2},
        "02_traceability": {"run_dir": str(run_dir)},
        "03_recoverability": {"command": command, "steps": 45, "kill_steps": [5], "save_kills": [20],
                              "external_kills": 1, "resume_threads": [None], "jobs": 2},
    }}
    (notebooks / "profiles.yaml").write_text(yaml.safe_dump(profile))
    runs = run_report("example", root / "out", notebooks_dir=notebooks, cell_timeout=CELL_TIMEOUT)
    return runs.set_index("notebook")


def test_notebook_01_audits_the_script(report: pd.DataFrame) -> None:
    """01 with a command: runs without error and finds the script's plain repeats bitwise identical."""
    run = report.loc["01_seed_determinism"]
    assert run["status"] == "ok", run["error"]
    assert run["headline"]["repeats_identical"] == "2/2 repeats bitwise identical"
    assert run["headline"]["metric"].startswith("test_accuracy ")


def test_notebook_02_analyses_an_existing_script_run(report: pd.DataFrame) -> None:
    """02 with run_dir: reads the script run's trace (45 steps traced every 5) and splits a rerun
    of its recorded command with 2 threads from it at the first update."""
    run = report.loc["02_traceability"]
    assert run["status"] == "ok", run["error"]
    assert run["headline"]["traced_steps"] == 9  # steps 5, 10, ..., 45
    assert run["headline"]["split"] == "threads: first divergence at step 1"


def test_notebook_03_kills_and_relaunches_the_script(report: pd.DataFrame) -> None:
    """03 with a command: every kill point relaunched gives the reference's bits; the corruption
    table of the built-in trainer is skipped, not failed."""
    run = report.loc["03_recoverability"]
    assert run["status"] == "ok", run["error"]
    assert run["headline"]["resumed with 1 thread(s)"] == "3/3 resumes bitwise identical"
    assert "damaged_checkpoints_refused" not in run["headline"]
    assert "skipped: the corruption table" in run["html"].read_text()
