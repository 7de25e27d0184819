"""The example script with reprokit added (examples/train_digits_reprokit.py), run as users run it:
as a subprocess, killed from outside at random moments, stopped with SIGTERM, relaunched.

It has its own model with dropout, Adadelta, StepLR per epoch, a torchvision random transform, a
train and a test DataLoader with two worker processes and an evaluation after every epoch.
"""

from __future__ import annotations

import difflib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from reprokit.checkpointreader import list_checkpoints
from reprokit.rundir import METRICS

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SCRIPT = EXAMPLES / "train_digits_reprokit.py"
ARGS = ["--epochs", "2"]  # 2 x 45 steps, a checkpoint every 10
TIMEOUT = 120.0


def _env(run_dir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("REPROKIT_")}
    return {**env, "REPROKIT_RUN_DIR": str(run_dir), "REPROKIT_PROGRESS": "0", "REPROKIT_TRACE_EVERY": "5",
            **extra}


def _run(run_dir: Path, *, script: Path = SCRIPT, **extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(script), *ARGS], env=_env(run_dir, **extra),
                          cwd=run_dir.parent, capture_output=True, text=True, timeout=TIMEOUT, check=False)


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("REPROKIT_")} | {"REPROKIT_PROGRESS": "0"}
    return subprocess.run([sys.executable, "-m", "reprokit", *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=TIMEOUT, check=False)


def _digest(run_dir: Path) -> str:
    return str(json.loads((run_dir / "result.json").read_text())["final_digest"])


def _steps_written(run_dir: Path) -> int:
    try:
        return max(0, len((run_dir / METRICS).read_text().splitlines()) - 2)
    except FileNotFoundError:
        return 0


def _assert_same_run(run_dir: Path, reference: Path) -> None:
    assert _digest(run_dir) == _digest(reference)
    for name in ("metrics.csv", "digests.csv", "trace.csv", "fingerprints.csv", "grads.csv"):
        assert (run_dir / name).read_bytes() == (reference / name).read_bytes(), name


def test_the_diff_is_at_most_ten_lines() -> None:
    """train_digits_reprokit.py adds or changes at most 10 lines of train_digits.py."""
    plain = (EXAMPLES / "train_digits.py").read_text().splitlines()
    added = [line for line in difflib.unified_diff(plain, SCRIPT.read_text().splitlines(), lineterm="", n=0)
             if line.startswith("+") and not line.startswith("+++")]
    assert 0 < len(added) <= 10, added


def test_two_runs_are_bitwise_identical_with_any_worker_count(reference: Path, tmp_path: Path) -> None:
    """A second run, with the loaders in the main process instead of 2 workers, gives the same bits."""
    done = _run(tmp_path / "again", REPROKIT_NUM_WORKERS="0")
    assert done.returncode == 0, done.stderr
    _assert_same_run(tmp_path / "again", reference)


def test_sigterm_stops_with_a_checkpoint_and_relaunch_is_exact(reference: Path, tmp_path: Path) -> None:
    """SIGTERM: exit status 75 after a checkpoint of that step; the relaunch gives the same bits."""
    run_dir = tmp_path / "term"
    proc = subprocess.Popen([sys.executable, str(SCRIPT), *ARGS], env=_env(run_dir), cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    while _steps_written(run_dir) < 33 and proc.poll() is None:
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 75, err
    assert "stopped by SIGTERM at step" in err
    stopped_at = int(err.split("stopped by SIGTERM at step ")[1].split()[0])
    assert list_checkpoints(run_dir)[0].name == f"step-{stopped_at:07d}"
    done = _run(run_dir)
    assert done.returncode == 0, done.stderr
    _assert_same_run(run_dir, reference)


def test_changed_script_is_refused_on_resume(tmp_path: Path) -> None:
    """After the script is edited, a relaunch and `reprokit resume` refuse; --force resumes."""
    script = tmp_path / "train.py"
    script.write_text(SCRIPT.read_text())
    run_dir = tmp_path / "run"
    killed = _run(run_dir, script=script, REPROKIT_CRASH_AT_STEP="25")
    assert killed.returncode == -signal.SIGKILL
    script.write_text(SCRIPT.read_text() + "# edited\n")
    relaunched = _run(run_dir, script=script)
    assert relaunched.returncode != 0 and "entry.script_digest" in relaunched.stderr
    resumed = _cli("resume", str(run_dir), cwd=tmp_path)
    assert resumed.returncode == 2 and "was edited" in resumed.stderr
    forced = _cli("resume", str(run_dir), "--force", cwd=tmp_path)
    assert forced.returncode == 0, forced.stderr
    assert json.loads((run_dir / "manifest.json").read_text())["resumes"][-1]["forced"]


def test_cli_reads_script_runs(reference: Path, tmp_path: Path) -> None:
    """verify, compare, runs and reproduce work on the example's run directory."""
    verify = _cli("verify", str(reference), cwd=tmp_path)
    assert verify.returncode == 0 and "3/3 checkpoints verify" in verify.stdout, verify.stderr
    out = tmp_path / "reproduced"
    reproduce = _cli("reproduce", str(reference), "--out", str(out), cwd=tmp_path)
    assert reproduce.returncode == 2 and "not running" in reproduce.stderr  # examples/ is not in tmp_path
    assert "pass --yes" in reproduce.stderr and not out.exists()
    reproduce = _cli("reproduce", str(reference), "--out", str(out), "--yes", cwd=tmp_path)
    assert reproduce.returncode == 0 and "verdict:    bitwise" in reproduce.stdout, reproduce.stderr
    compare = _cli("compare", str(reference), str(out), cwd=tmp_path)
    assert compare.returncode == 0 and "identical: yes" in compare.stdout
    runs = _cli("runs", "--ledger", str(reference.parent / "ledger.sqlite"), cwd=tmp_path)
    run_id = json.loads((reference / "manifest.json").read_text())["run_id"]
    assert runs.returncode == 0 and run_id in runs.stdout and "finished" in runs.stdout, runs.stdout
    finished = _run(reference)
    assert finished.returncode == 0 and "already finished" in finished.stderr
