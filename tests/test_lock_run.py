"""One writer per run directory, through reprokit.Run: a second relaunch is refused naming the holder,
a SIGKILLed writer (and its orphaned DataLoader workers) blocks no relaunch, readers need no lock."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import reprokit
from reprokit.checkpointreader import verify_run
from reprokit.errors import RunLockedError
from reprokit.runlock import holder

# a user's script; with HOLD set it waits for a line before opening the run and, once the run is
# open (the lock taken), for another line before training
_SCRIPT = """
import os, sys
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset
import reprokit
from reprokit.errors import RunLockedError

hold = bool(os.environ.get("HOLD"))
if hold:
    print("ready", flush=True)
    sys.stdin.readline()
try:
    run = reprokit.Run(seed=1, config={"lr": 0.1}, checkpoint_every=3)
except RunLockedError as e:
    print("lost", e, flush=True)
    sys.exit(3)
if hold:
    print("won", flush=True)
    sys.stdin.readline()
g = torch.Generator().manual_seed(0)
x = torch.randn(96, 4, generator=g)
model = nn.Linear(4, 2)
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
run.track(model=model, optimizer=optimizer)
train = run.loader(TensorDataset(x, (x.sum(1) > 0).long()), batch_size=8, shuffle=True)
for _ in run.epochs(2):
    for xb, yb in train:
        optimizer.zero_grad()
        F.cross_entropy(model(xb), yb).backward()
        optimizer.step()
        run.step()
print("digest", run.finish().final_digest, flush=True)
"""


def _env(run_dir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("REPROKIT_") and k != "RANK"}
    # two DataLoader workers: forked while the lock is held, orphaned by a SIGKILL
    return env | {"REPROKIT_RUN_DIR": str(run_dir), "REPROKIT_PROGRESS": "0", "REPROKIT_NUM_WORKERS": "2",
                  **extra}


def _launch(script: Path, run_dir: Path, **extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, str(script)], env=_env(run_dir, **extra), stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _digest(child: subprocess.Popen[str]) -> str:
    out, err = child.communicate(timeout=120)
    assert child.returncode == 0, err
    return out.split("digest ")[-1].strip()


def _say(child: subprocess.Popen[str], line: str = "go") -> None:
    assert child.stdin is not None
    child.stdin.write(line + "\n")
    child.stdin.flush()


def _line(child: subprocess.Popen[str]) -> str:
    assert child.stdout is not None
    return child.stdout.readline().strip()


@pytest.fixture(scope="module")
def killed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path, str]:
    """The script, two runs of it SIGKILLed mid-epoch (at steps 7 and 5, checkpoints at 3 and 6,
    DataLoader workers alive), and the digest of an uninterrupted run; launched side by side."""
    root = tmp_path_factory.mktemp("lock")
    script = root / "train.py"
    script.write_text(_SCRIPT)
    reference = _launch(script, root / "reference")
    crashed = [_launch(script, root / name, REPROKIT_CRASH_AT_STEP=at)
               for name, at in (("a", "7"), ("b", "5"))]
    for child in crashed:
        child.communicate(timeout=120)
        assert child.returncode == -signal.SIGKILL
    return script, root / "a", root / "b", _digest(reference)


def test_two_relaunches_at_once_exactly_one_proceeds(killed: tuple[Path, Path, Path, str]) -> None:
    """Two relaunches of a killed run started together: one proceeds and finishes bit-exact, the
    other is refused with a message naming the winner's pid; nothing is left locked."""
    script, run_dir, _, reference = killed
    children = [_launch(script, run_dir, HOLD="1") for _ in range(2)]
    try:
        assert [_line(c) for c in children] == ["ready", "ready"]
        for child in children:
            _say(child)
        said = {child: _line(child) for child in children}
        winners = [c for c, line in said.items() if line == "won"]
        assert len(winners) == 1, said
        winner, loser = winners[0], next(c for c in children if c is not winners[0])
        assert loser.wait(timeout=60) == 3
        assert said[loser].startswith(f"lost run directory {str(run_dir)!r} is in use by pid {winner.pid} ")
        assert (holder(run_dir) or {}).get("pid") == winner.pid  # readers see who, without locking
        assert set(verify_run(run_dir)["status"]) == {"ok"}  # and need no lock to read
        _say(winner)
        assert _digest(winner) == reference
    finally:
        for child in children:
            child.kill()
            child.wait()
    assert holder(run_dir) is None


def test_a_sigkilled_writer_blocks_no_relaunch(killed: tuple[Path, Path, Path, str]) -> None:
    """A writer SIGKILLed mid-epoch, its DataLoader workers orphaned (they would outlive it by
    seconds), leaves no lock behind: a relaunch at once proceeds and finishes bit-exact."""
    script, _, run_dir, reference = killed
    assert holder(run_dir) is None
    assert _digest(_launch(script, run_dir)) == reference


def test_a_second_run_in_one_process_is_refused_until_the_first_closes(tmp_path: Path) -> None:
    """A notebook's second Run of a directory its open first Run writes is refused, naming this
    process; once the first is closed the second opens (and resumes it)."""
    first = reprokit.Run(tmp_path / "run", config={"lr": 0.1}, progress=False)
    with pytest.raises(RunLockedError, match=f"in use by pid {os.getpid()} .*release the earlier Run"):
        reprokit.Run(tmp_path / "run", config={"lr": 0.1}, progress=False)
    first.close()
    second = reprokit.Run(tmp_path / "run", config={"lr": 0.1}, progress=False)
    assert second.resuming
    second.close()
