"""Checkpointer: when to checkpoint (every N steps, every T seconds), in which thread, and how
many to keep. The format and the commit protocol are in :mod:`reprokit.checkpoint`.

An async save must write a consistent copy while training goes on. The step is held only while
the small, forward-mutated tensors (batch-norm statistics, RNG and callback state) are copied;
parameters and optimizer state change only in ``optimizer.step()``, so a background thread copies
them while the next batch is loaded and its forward and backward pass run, and the training loop
calls :meth:`Checkpointer.before_update` before the optimizer step to make sure that copy is done.
(A fork()-based copy-on-write snapshot was the alternative; it defers the same copy into page
faults in the next optimizer step instead of overlapping it, and forks an OpenMP process.)
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from reprokit.checkpoint import (
    CHECKPOINTS,
    TRASH_PREFIX,
    CheckpointError,
    Snapshot,
    drop_spare,
    keep_spare,
    write_checkpoint,
)
from reprokit.checkpointreader import list_checkpoints
from reprokit.diskerrors import DiskError, check_room, writing

_Copies = list[tuple[torch.Tensor, torch.Tensor]]  # (destination, source) pairs still to copy


def update_only(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> frozenset[int]:
    """Data pointers of the tensors only ``optimizer.step()`` changes: parameters and optimizer state."""
    tensors = [*model.parameters(), *(t for s in optimizer.state.values() for t in s.values()
                                      if isinstance(t, torch.Tensor))]
    return frozenset(t.data_ptr() for t in tensors)


def clone_state(obj: Any, into: Any = None, *, later: _Copies | None = None,
                unchanged: frozenset[int] = frozenset()) -> Any:
    """A deep copy in which every tensor is copied, so training can go on while it is written.

    With ``into`` (an earlier copy of the same structure) tensors are copied into its storage:
    reusing the memory avoids a fresh allocation's page faults, the larger part of the cost.
    With ``later``, the copy of each tensor whose data pointer is in ``unchanged`` is not made
    but appended to ``later`` (its destination is returned, still to be filled).
    """
    if isinstance(obj, torch.Tensor):
        t = obj.detach()
        same = isinstance(into, torch.Tensor) and (into.shape, into.dtype) == (t.shape, t.dtype)
        if not (same and into.device == t.device):
            if later is None or t.data_ptr() not in unchanged:
                return t.clone()
            into = torch.empty_like(t)
        if later is not None and t.data_ptr() in unchanged:
            later.append((into, t))
            return into
        return into.copy_(t)
    if isinstance(obj, dict):
        earlier = into if isinstance(into, dict) else {}
        return {k: clone_state(v, earlier.get(k), later=later, unchanged=unchanged) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        same_len = isinstance(into, list | tuple) and len(into) == len(obj)
        return type(obj)(clone_state(v, into[i] if same_len else None, later=later, unchanged=unchanged)
                         for i, v in enumerate(obj))
    return obj


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
    """Delete checkpoint directories retired by :func:`prune`; one tensors file is kept as the spare
    that the next save overwrites (:func:`reprokit.checkpoint.take_spare`)."""
    root = Path(run_dir) / CHECKPOINTS
    for p in root.glob(f"{TRASH_PREFIX}*"):
        keep_spare(root, p)
        shutil.rmtree(p, ignore_errors=True)


class Checkpointer:
    """Saves every ``every`` steps and/or ``seconds`` seconds, optionally in a background thread.

    With ``background=True`` the training step is blocked only while the state is cloned into
    memory (see the module docstring); a thread serialises, writes, verifies and prunes. One save
    is in flight at a time.
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
        self._copied: threading.Event | None = None  # set once the live tensors are no longer read
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
            later: _Copies = []
            self._copy = clone_state(snap.state, self._copy, later=later, unchanged=snap.update_only)
            self._copied = threading.Event()
            self._thread = threading.Thread(
                target=self._commit_in_thread, args=(Snapshot(snap.meta, self._copy), later, self._copied),
                name=f"reprokit-checkpoint-{snap.meta.step}", daemon=True)
            self._thread.start()
        else:
            self._commit(snap, crash)
        self._last = time.monotonic()
        self.blocked_seconds.append(time.perf_counter() - started)

    def before_update(self) -> None:
        """Call before ``optimizer.step()``: waits until an async save has copied what it changes."""
        if self._copied is not None:
            started = time.perf_counter()
            self._copied.wait()
            self._copied = None
            self.blocked_seconds[-1] += time.perf_counter() - started  # the step waited for the save

    def finish(self) -> None:
        """:meth:`wait`, then delete the spare tensors file kept for the next save: there is none."""
        self.wait()
        drop_spare(self.run_dir)

    def wait(self) -> None:
        """Block until the save in flight (if any) is committed; re-raise its error here."""
        if self._thread is not None:
            self._thread.join()  # may start a cleaner, so joined first
            self._thread = None
        self._copied = None
        if self._cleaner is not None:
            self._cleaner.join()
            self._cleaner = None
        if self._error is not None:
            error, self._error = self._error, None
            if isinstance(error, DiskError):  # already says what, where and what to do
                raise error
            raise CheckpointError(f"background checkpoint save failed: {error}") from error

    def _commit_in_thread(self, snap: Snapshot, later: _Copies, copied: threading.Event) -> None:
        try:
            try:
                for dst, src in later:
                    dst.copy_(src)
            finally:
                copied.set()  # even on error: the training thread must not wait forever
            self._commit(snap, False)
        except BaseException as e:  # handed to the training thread by wait()
            self._error = e

    def _commit(self, snap: Snapshot, crash: bool) -> None:
        where = self.run_dir / CHECKPOINTS
        with writing("checkpoint", f"the checkpoint of step {snap.meta.step}", where):
            path = write_checkpoint(self.run_dir, snap, crash_midway=crash)  # verified before commit
        if not self.saved:  # the first save: will keep_last of them fit?
            check_room(where, sum(f.stat().st_size for f in path.iterdir() if f.is_file()), self.keep)
        self.saved.append(snap.meta.step)
        if self.keep and prune(self.run_dir, self.keep, newest=path):
            self._cleaner = threading.Thread(target=delete_trash, args=(self.run_dir,),
                                             name="reprokit-checkpoint-prune")
            self._cleaner.start()
