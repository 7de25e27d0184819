"""The reprokit command: train from a config file, one-line errors, python -m entry point."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from reprokit.cli import main
from reprokit.rundir import read_json

ISSUE_EXAMPLE = {"model": "cnn", "dataset": "digits", "seed": 0, "steps": 60, "threads": 1}


def test_train_from_a_minimal_json_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`reprokit train` with the issue's five-field config writes a finished run directory."""
    config = tmp_path / "cfg.json"
    config.write_text(json.dumps(ISSUE_EXAMPLE))
    assert main(["train", "--config", str(config), "--run-dir", str(tmp_path / "run")]) == 0
    result = read_json(tmp_path / "run", "result.json")
    assert result["steps"] == 60
    assert result["final_digest"] in capsys.readouterr().out


def test_bad_config_exits_2_with_one_line_reason(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An unknown key gives exit code 2, one stderr line naming the key, and no run directory."""
    config = tmp_path / "cfg.yaml"
    config.write_text("model: cnn\nlearning_rate: 0.1\n")
    assert main(["train", "--config", str(config), "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "unknown config key(s) ['learning_rate']" in err[0]
    assert not (tmp_path / "run").exists()


def test_python_dash_m_runs_the_same_command(tmp_path: Path) -> None:
    """`python -m reprokit` is the same command (missing config file -> exit 2 naming the file)."""
    missing = tmp_path / "nope.yaml"
    proc = subprocess.run(
        [sys.executable, "-m", "reprokit", "train", "--config", str(missing), "--run-dir", str(tmp_path)],
        capture_output=True, text=True, env={**os.environ, "REPROKIT_PROGRESS": "0"}, check=False,
    )
    assert proc.returncode == 2
    assert "nope.yaml' does not exist" in proc.stderr


def _train(config: Path, run_dir: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "reprokit", "train", "--config", str(config), "--run-dir", str(run_dir)]
    return subprocess.run([*command, *extra], capture_output=True, text=True, check=False, timeout=120,
                          env={**os.environ, "REPROKIT_PROGRESS": "0"})


def test_relaunching_train_resumes_then_says_finished(tmp_path: Path) -> None:
    """The same `reprokit train` command after a SIGKILL finishes bit-exact; once more, exit 0 'finished'."""
    config = tmp_path / "cfg.json"
    config.write_text(json.dumps({**ISSUE_EXAMPLE, "steps": 40, "checkpoint_every": 10}))
    assert _train(config, tmp_path / "ref").returncode == 0
    killed = _train(config, tmp_path / "run", "--crash-at-step", "25")
    assert killed.returncode == -9
    relaunched = _train(config, tmp_path / "run")
    assert relaunched.returncode == 0, relaunched.stderr
    assert "resumed from step-0000020" in relaunched.stdout
    ref, run = read_json(tmp_path / "ref", "result.json"), read_json(tmp_path / "run", "result.json")
    assert run["final_digest"] == ref["final_digest"]
    again = _train(config, tmp_path / "run")
    assert again.returncode == 0 and "already finished" in again.stdout


def test_relaunching_train_with_another_config_is_refused(tmp_path: Path) -> None:
    """A relaunch with another lr on a killed run exits 2 naming the field; --force resumes, recorded."""
    config = tmp_path / "cfg.json"
    config.write_text(json.dumps({**ISSUE_EXAMPLE, "steps": 30, "checkpoint_every": 10}))
    assert _train(config, tmp_path / "run", "--crash-at-step", "15").returncode == -9
    config.write_text(json.dumps({**ISSUE_EXAMPLE, "steps": 30, "checkpoint_every": 10, "lr": 0.01}))
    refused = _train(config, tmp_path / "run")
    assert refused.returncode == 2 and "lr" in refused.stderr
    forced = _train(config, tmp_path / "run", "--force")
    assert forced.returncode == 0, forced.stderr
    assert read_json(tmp_path / "run", "manifest.json")["resumes"][-1]["forced"]
