"""Replay one step of a run twice in this process's environment: is that step deterministic here?

``compare --replay`` uses it when the records say ``nondeterminism`` or ``environment``. Both
replays start from the same state: the newest checkpoint before the step (copied with the run's
files into a scratch directory, so the run itself is never touched), or the start when there is
none. A built-in run is replayed by the built-in trainer (resume from the copy, or train from
step 0, stopping after the step); a script run by re-executing its recorded command with
``REPROKIT_RUN_DIR`` on the copy (its ``reprokit.Run`` resumes there; from the start, a kill point
right after the step ends it early). Every step is fingerprinted (``digest_every=1``), then the
two replays' fingerprints and parameters at the step are compared.

What it proves: two replays that differ show nondeterminism in this process on this machine (a
kernel, or randomness reprokit does not see). Two that agree show the step is deterministic here,
so the original difference came from the environment (threads, versions, hardware) or from
something the replay does not redo (a callback of the original process, another machine). It does
not replay the other run's machine, and a nondeterminism that shows only rarely can pass twice.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from reprokit.callbacks import Callback, TrainState
from reprokit.checkpoint import CHECKPOINTS, PREFIX
from reprokit.checkpointreader import list_checkpoints
from reprokit.errors import ReprokitError
from reprokit.fingerprints import FINGERPRINT_COLUMNS
from reprokit.ledger import LEDGER_ENV
from reprokit.relaunch import run_recorded
from reprokit.rundir import MANIFEST, MODEL, RESULT, WEIGHTS, read_digests, read_fingerprints, read_json

_COMPARED = tuple(c for c in FINGERPRINT_COLUMNS if c != "step")
# how the replays are recorded: every step fingerprinted, nothing else written
_QUIET = {"digest_every": 1, "checkpoint_every": 0, "trace_every": 0}
_QUIET_ENV = {"REPROKIT_DIGEST_EVERY": "1", "REPROKIT_CHECKPOINT_EVERY": "0", "REPROKIT_TRACE_EVERY": "0",
              "REPROKIT_PROGRESS": "0"}


class ReplayError(ReprokitError):
    """A step could not be replayed (the command failed, the script changed, the step was not reached)."""


@dataclass(frozen=True)
class Replayed:
    """What :func:`replay_step` found."""

    step: int
    checkpoint: str | None  # the checkpoint both replays started from; None = from step 0
    equal: bool  # the two replays agree at ``step``: fingerprints and parameters
    differing: tuple[str, ...]  # what differs between them ("parameters" for the digests)
    matches_original: bool | None  # the replays' parameters at ``step`` equal the original run's
    # (None: the original recorded no digests there)

    def detail(self) -> str:
        start = f"from {self.checkpoint}" if self.checkpoint else "from the start (no checkpoint before it)"
        verdict = "the two replays agree bit for bit" if self.equal else \
            f"the two replays differ in {', '.join(self.differing)}"
        match = "match" if self.matches_original else "do not match"
        original = "" if self.matches_original is None else \
            f"; their parameters {match} the original run's there"
        return f"step {self.step} replayed twice {start}: {verdict}{original}"


def replay_step(run_dir: str | Path, step: int) -> Replayed:
    """Replay step ``step`` of the run in ``run_dir`` twice, from the same state; compare the two."""
    run_dir = Path(run_dir)
    if step < 1:
        raise ReplayError(f"step {step} cannot be replayed: pass an optimizer step >= 1")
    manifest = read_json(run_dir, MANIFEST)
    before = [p for p in list_checkpoints(run_dir) if int(p.name[len(PREFIX):]) < step]
    checkpoint = before[0] if before else None
    with tempfile.TemporaryDirectory(prefix="reprokit-replay-") as scratch:
        outs = []
        for n in (1, 2):
            out = Path(scratch) / f"replay-{n}"
            if checkpoint is not None:
                _copy_run(run_dir, checkpoint, out)
            ledger = Path(scratch) / "ledger.sqlite"  # the replays stay out of the user's ledger
            if manifest.get("kind") == "script":
                _replay_script(run_dir, out, step, fresh=checkpoint is None, ledger=ledger)
            else:
                _replay_builtin(manifest, out, step, fresh=checkpoint is None, ledger=ledger)
            outs.append(out)
        return _compare(run_dir, outs[0], outs[1], step, checkpoint.name if checkpoint else None)


def _copy_run(run_dir: Path, checkpoint: Path, out: Path) -> None:
    """The run's files and one checkpoint, without the results: an unfinished run to resume."""
    shutil.copytree(run_dir, out, ignore=lambda d, names: [
        n for n in names if Path(d) == run_dir and n in (CHECKPOINTS, RESULT, MODEL, WEIGHTS)])
    shutil.copytree(checkpoint, out / CHECKPOINTS / checkpoint.name)


class _Stop(Exception):
    pass


class _StopAfter(Callback):
    """Ends a built-in replay right after step ``step`` (its fingerprints are written by then)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, state: TrainState) -> None:
        if state.step >= self.step:
            raise _Stop


def _replay_builtin(manifest: dict[str, Any], out: Path, step: int, *, fresh: bool, ledger: Path) -> None:
    from reprokit.config import TrainConfig
    from reprokit.resumer import resume
    from reprokit.trainer import train

    config = TrainConfig.from_dict(manifest["config"])
    with _process_state(ledger), contextlib.suppress(_Stop):
        if fresh:
            train(config.replace(**_QUIET), out, callbacks=(_StopAfter(step),), progress=False)
        else:
            resume(out, changes=dict(_QUIET), callbacks=(_StopAfter(step),), progress=False)


def _replay_script(run_dir: Path, out: Path, step: int, *, fresh: bool, ledger: Path) -> None:
    env = {**_QUIET_ENV, LEDGER_ENV: str(ledger)}
    if fresh:  # a resumed run ignores kill points from the environment: it runs to its end
        env["REPROKIT_CRASH_AT_STEP"] = str(step + 1)
    status = run_recorded(run_dir, out, env=env)
    if status not in (0, -9):  # -9: the kill point after the step
        raise ReplayError(f"replaying step {step}: the recorded command exited with status {status}; see "
                          "its output above")


@contextlib.contextmanager
def _process_state(ledger: Path) -> Iterator[None]:
    """The ledger variable and torch's global knobs, put back after an in-process replay."""
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    previous = os.environ.get(LEDGER_ENV)
    os.environ[LEDGER_ENV] = str(ledger)
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(LEDGER_ENV, None)
        else:
            os.environ[LEDGER_ENV] = previous
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)


def _compare(original: Path, one: Path, two: Path, step: int, checkpoint: str | None) -> Replayed:
    rows, params = [], []
    for out in (one, two):
        frame = read_fingerprints(out)
        at = frame[frame["step"] == step]
        digests = dict(read_digests(out)).get(step)
        if at.empty or digests is None:
            raise ReplayError(f"the replay in {out} did not reach step {step}; is the run shorter, or did "
                              "the command stop early?")
        rows.append(at.iloc[0])
        params.append(digests)
    differing = [c for c in _COMPARED if rows[0][c] != rows[1][c]]
    if params[0] != params[1]:
        differing.append("parameters")
    recorded = dict(read_digests(original)).get(step)
    return Replayed(step, checkpoint, not differing, tuple(differing),
                    None if recorded is None else recorded == params[0])
