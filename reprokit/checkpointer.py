"""Checkpointer: when to checkpoint (every N steps, every T seconds), in which thread, and how
many to keep. The format and the commit protocol are in :mod:`reprokit.checkpoint`."""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from reprokit.checkpoint import (
    CHECKPOINTS,
    TRASH_PREFIX,
    CheckpointError,
    Snapshot,
    clone_state,
    list_checkpoints,
    write_checkpoint,
)


def prune(run_dir: str | Path, keep: int, *, newest: Path) -> list[Path]:
    """Retire all but the ``keep`` newest checkpoints; call only after ``newest`` verified.

    ``newest`` is never retired, so the run always keeps at least one valid checkpoint. Retired
    directories are renamed to ``.tmp-trash-...`` at once (they stop counting as checkpoints);
    deleting their files is slow on ext4 and left to :func:`delete_trash`.
    """
    retired = []
    for path in list_checkpoints(run_dir)[keep:]:
        if path != newest:
            os.replace(path, path.with_name(f"{TRASH_PREFIX}{path.name}-{os.getpid()}"))
            retired.append(path)
    return retired


def delete_trash(run_dir: str | Path) -> None:
    """Delete checkpoint directories retired by :func:`prune`."""
    root = Path(run_dir) / CHECKPOINTS
    for p in root.glob(f"{TRASH_PREFIX}*"):
        shutil.rmtree(p, ignore_errors=True)


class Checkpointer:
    """Saves every ``every`` steps and/or ``seconds`` seconds, optionally in a background thread.

    With ``background=True`` the training step is blocked only while the state is cloned into
    memory; a thread serialises, writes, verifies and prunes. One save is in flight at a time.
    """

    def __init__(
        self, run_dir: str | Path, *, every: int, seconds: float, keep: int, background: bool,
        crash_during_save: int | None = None,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.every, self.seconds, self.keep, self.background = every, seconds, keep, background
        self.crash_during_save = crash_during_save
        self._last = time.monotonic()
        self._thread: threading.Thread | None = None
        self._cleaner: threading.Thread | None = None
        self._copy: Any = None
        self._error: BaseException | None = None
        self.saved: list[int] = []
        self.blocked_seconds: list[float] = []  # how long each save held up the training step

    def due(self, step: int) -> bool:
        if self.every and step % self.every == 0:
            return True
        return bool(self.seconds) and time.monotonic() - self._last >= self.seconds

    def save(self, make_snapshot: Callable[[], Snapshot]) -> None:
        """Take a snapshot and commit it (in the background: copy it to memory first)."""
        started = time.perf_counter()
        self.wait()
        snap = make_snapshot()
        crash = snap.meta.step == self.crash_during_save
        if self.background and not crash:
            # the previous copy is written (wait above), so its memory can take this one
            self._copy = clone_state(snap.state, self._copy)
            snap = Snapshot(snap.meta, self._copy)
            self._thread = threading.Thread(target=self._commit_in_thread, args=(snap,),
                                            name=f"reprokit-checkpoint-{snap.meta.step}", daemon=True)
            self._thread.start()
        else:
            self._commit(snap, crash)
        self._last = time.monotonic()
        self.blocked_seconds.append(time.perf_counter() - started)

    def wait(self) -> None:
        """Block until the save in flight (if any) is committed; re-raise its error here."""
        if self._thread is not None:
            self._thread.join()  # may start a cleaner, so joined first
            self._thread = None
        if self._cleaner is not None:
            self._cleaner.join()
            self._cleaner = None
        if self._error is not None:
            error, self._error = self._error, None
            raise CheckpointError(f"background checkpoint save failed: {error}") from error

    def _commit_in_thread(self, snap: Snapshot) -> None:
        try:
            self._commit(snap, False)
        except BaseException as e:  # handed to the training thread by wait()
            self._error = e

    def _commit(self, snap: Snapshot, crash: bool) -> None:
        path = write_checkpoint(self.run_dir, snap, crash_midway=crash)  # verified before commit
        self.saved.append(snap.meta.step)
        if self.keep and prune(self.run_dir, self.keep, newest=path):
            self._cleaner = threading.Thread(target=delete_trash, args=(self.run_dir,),
                                             name="reprokit-checkpoint-prune")
            self._cleaner.start()
