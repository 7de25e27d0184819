"""The example script killed from outside at random moments and relaunched (a file of its own, so
that pytest-xdist runs it beside the rest of test_example.py)."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from test_example import ARGS, SCRIPT, TIMEOUT, _assert_same_run, _cli, _env, _run, _steps_written


def test_sigkill_at_random_moments_then_relaunch_is_bit_exact(reference: Path, tmp_path: Path) -> None:
    """Ten kills — SIGKILL from outside at random steps (some mid-save), and inside the checkpoint
    writer — each relaunched (plain relaunch or `reprokit resume`) finish with the reference's bits."""
    rng = random.Random(14)
    plan = [("outside", rng.randint(3, 88)) for _ in range(8)] + [("during-save", 20), ("during-save", 70)]
    for i, (how, step) in enumerate(plan):
        run_dir = tmp_path / f"kill-{i}"
        if how == "during-save":
            done = _run(run_dir, REPROKIT_CRASH_DURING_SAVE=str(step))
            assert done.returncode == -signal.SIGKILL, done.stderr
        else:
            proc = subprocess.Popen([sys.executable, str(SCRIPT), *ARGS], env=_env(run_dir), cwd=tmp_path,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            deadline = time.monotonic() + TIMEOUT
            while _steps_written(run_dir) < step and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.002)
            time.sleep(rng.random() * 0.02)  # anywhere in the next step or save
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=TIMEOUT)
        relaunched = _cli("resume", str(run_dir), "--yes", cwd=tmp_path) if i % 2 else _run(run_dir)
        assert relaunched.returncode == 0, (how, step, relaunched.stderr)
        _assert_same_run(run_dir, reference)
