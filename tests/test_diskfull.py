"""Disk full while a run writes: one clear error naming what and where, the run left resumable, a
relaunch after space is freed bit-exact. Injected at each kind of write (always), and for real on
a small tmpfs where this machine lets the tests mount one."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from reprokit.checkpointreader import verify_run
from reprokit.diskerrors import check_room, human

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "diskfull_run.py"
TIMEOUT = 120


def _run(run_dir: Path, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("REPROKIT_")}
    environ |= {"REPROKIT_PROGRESS": "0", "REPROKIT_LEDGER": str(run_dir.parent / "ledger.sqlite"), **env}
    return subprocess.run([sys.executable, str(FIXTURE), str(run_dir)], env=environ, capture_output=True,
                          text=True, timeout=TIMEOUT, check=False)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, bytes]:
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    done = _run(run_dir)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip(), (run_dir / "digests.csv").read_bytes()


def _left_consistent(run_dir: Path) -> None:
    """What a full disk must leave: no temporary checkpoint, every checkpoint verifying."""
    checkpoints = run_dir / "checkpoints"
    if checkpoints.is_dir():
        assert not [p for p in checkpoints.iterdir() if p.name.startswith(".tmp")]
        table = verify_run(run_dir)
        assert (table["status"] == "ok").all(), table


@pytest.mark.parametrize(("at", "what"), [
    ("checkpoint:3", r"the checkpoint of step 6"),
    ("metrics:2", r"the metrics rows, digests and fingerprints of steps? [\d-]+"),  # the 2nd write of rows
    ("manifest", r"the run directory and its manifest"),
    ("result", r"the final model and result\.json"),
])
def test_a_full_disk_at_each_kind_of_write_stops_cleanly_and_resumes_bit_exact(
    tmp_path: Path, reference: tuple[str, bytes], at: str, what: str
) -> None:
    run_dir = tmp_path / "run"
    full = _run(run_dir, REPROKIT_DISK_FULL_AT=at)
    assert full.returncode == 1
    last = full.stderr.strip().splitlines()[-1]
    assert re.match(f"reprokit.diskerrors.DiskError: cannot write {what} to ", last), last
    assert "the disk is full" in last and "free on its filesystem" in last and "run the same command" in last
    _left_consistent(run_dir)
    freed = _run(run_dir)  # space freed: the same command again
    assert freed.returncode == 0, freed.stderr
    assert freed.stdout.strip() == reference[0]
    assert (run_dir / "digests.csv").read_bytes() == reference[1]


def test_keep_last_that_cannot_fit_is_reported_at_the_first_save(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    free = shutil.disk_usage(tmp_path).free
    assert check_room(tmp_path, 1000, 3) is None  # fits
    one = free // 2 + 1  # two more would not fit
    message = check_room(tmp_path, one, 3)
    assert message is not None and f"each checkpoint takes {human(one)}" in message
    assert "room for 2 in all" in message and message in capsys.readouterr().err


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 700 kB tmpfs at tmp_path/disk, unmounted afterwards; skipped where mounting is not allowed."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=700k", "tmpfs", str(mount)],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({done.stderr.strip() or done.returncode}); the "
                    "injected disk-full cases above cover the same paths")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_a_real_full_disk_then_more_space_resumes_bit_exact(small_disk: Path,
                                                            reference: tuple[str, bytes]) -> None:
    """On a 700 kB tmpfs the checkpoints (290 kB each, keep 2) do not fit: a DiskError, the first
    save's keep_last warning, a consistent directory; the same command after the tmpfs grows
    finishes with the uninterrupted run's bits."""
    run_dir = small_disk / "run"
    full = _run(run_dir)
    assert full.returncode == 1, full.stderr
    assert "keep_last=2: each checkpoint takes" in full.stderr
    # the traceback's last line (a ledger warning on the same full disk may follow it, at exit)
    raised = [line for line in full.stderr.splitlines() if line.startswith("reprokit.diskerrors.DiskError")]
    assert raised and "DiskError: cannot write the checkpoint of step" in raised[-1], full.stderr
    _left_consistent(run_dir)
    subprocess.run(["mount", "-o", "remount,size=4m", str(small_disk)], check=True)
    freed = _run(run_dir)
    assert freed.returncode == 0, freed.stderr
    assert freed.stdout.strip() == reference[0]
    assert (run_dir / "digests.csv").read_bytes() == reference[1]
