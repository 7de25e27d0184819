"""How a :class:`reprokit.Run` ends: ``finish`` (the final model, result.json, the ledger row), a
stop on SIGTERM/SIGINT (a verified checkpoint, then :data:`reprokit.runstop.EXIT_STOPPED`), or a close
that leaves the run resumable (an exception in the loop, a script that returned without finishing).
"""

from __future__ import annotations

import atexit
import contextlib
import math
import time
from collections.abc import Mapping
from types import TracebackType
from typing import Any, Self

from reprokit.checkpoint import Snapshot
from reprokit.checkpointer import Checkpointer
from reprokit.digests import combine_digests, state_digests
from reprokit.distributed import leave_process_group
from reprokit.runrecorder import number
from reprokit.runresume import Opened
from reprokit.runsnapshot import take_snapshot
from reprokit.runstart import RunStart
from reprokit.runstop import ResumeInfo, RunSummary, StopSignals

__all__ = ["RunEnd", "release"]


class RunEnd(RunStart):
    """The ending half of :class:`reprokit.Run` (a mixin: the attributes are Run's)."""

    _checkpointer: Checkpointer
    _signals: StopSignals
    _last_logged: dict[str, float]
    _started: float
    _latency: float | None
    _bar: Any
    _done: bool

    def finish(self, *, result: Mapping[str, Any] | None = None, **metrics: Any) -> RunSummary:
        """Write the final model (model.pt, model.safetensors), result.json (with ``result``'s
        entries added) and the ledger row."""
        if not self._begun:
            self._begin()
        if self._pending:  # resumed where nothing was left to iterate
            self._restore_now(in_loop=False)
        if self._init_pending:
            self._write_init({})
        self._checkpointer.finish()
        final = {k: v.detach().clone() for k, v in self._module_state().items()}
        final_digest = combine_digests(state_digests(final))
        values = {k: number(k, v) for k, v in metrics.items()} or self._last_logged
        name = next(iter(values), None)
        metric = values[name] if name is not None else math.nan
        summary = RunSummary(self.path, final_digest, name, metric, self.global_step,
                             time.perf_counter() - self._started, self.resumed_from)
        for cb in self._callbacks:
            cb.on_train_end(self._state)
        self._files.finish(final, {
            "final_digest": final_digest, "final_metric": metric, "metric_name": name,
            "metrics": values, "steps": self.global_step, "seconds": round(summary.seconds, 3),
            "data_digest": self._manifest["data"]["digest"], "resumed_from_step": self.resumed_from,
            **({"replica_mismatch": self._replica_mismatch} if self.world.world_size > 1 else {}),
            **(result or {}),
        })
        if self._ledger is not None:
            self._ledger.finish(final_digest, metric if name else None)
        self._close("finished")
        leave_process_group(self.world)  # only a group Run created
        return summary

    @property
    def resume_info(self) -> ResumeInfo | None:
        """Where a relaunched run continued from and what it skipped; ``None`` for a new run."""
        if not self.resuming:
            return None
        resumed = self._resumed
        return ResumeInfo(resumed.checkpoint if resumed else None, self.resumed_from or 0,
                          tuple(self._skipped), self._latency or 0.0, tuple(self._differences),
                          bool(self._differences))

    @property
    def saved_steps(self) -> tuple[int, ...]:
        """The steps this process committed a checkpoint at."""
        return tuple(self._checkpointer.saved)

    @property
    def save_blocked_seconds(self) -> tuple[float, ...]:
        """How long each save held up training."""
        return tuple(self._checkpointer.blocked_seconds)

    def close(self) -> None:
        """Leave the run unfinished (resumable), its files closed: what an exception in the loop does."""
        self._close("crashed")

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 tb: TracebackType | None) -> None:
        if error is not None:
            self._close("crashed")

    def _snapshot(self) -> Snapshot:
        return take_snapshot(self._tracked, self._loaders, self._callbacks, step=self.global_step,
                             epoch=self.epoch, manifest=self._manifest, files=self._files,
                             replica_mismatch=self._replica_mismatch if self.world.world_size > 1 else None)

    def _stop_now(self) -> None:
        """Save a verified checkpoint of where the run is, then exit with EXIT_STOPPED."""
        self._checkpointer.wait()
        self._checkpointer.save(self._snapshot)
        self._checkpointer.wait()
        self._close("crashed")
        raise self._signals.stopped(self.global_step)

    def _close(self, status: str) -> None:
        if self._done:
            return
        self._done = self._signals.closed = True  # a signal from now on: the usual KeyboardInterrupt
        if self._bar is not None:
            self._bar.close()
        with contextlib.suppress(Exception):  # a failing save must not hide the error that stopped the run
            self._checkpointer.wait()
        if self._writer is not None:
            self._writer.close()
        self._tracked.close()
        if status != "finished" and self._ledger is not None:
            self._ledger.mark(status)
        self._signals.restore()
        atexit.unregister(self._at_exit)

    def _at_exit(self) -> None:
        """A script that raised (or returned without finish()) leaves the run crashed, resumable."""
        with contextlib.suppress(Exception):  # exiting anyway; the run directory is consistent
            self._close("crashed")


def release(opened: Opened) -> None:
    """Close a run directory opened on this rank when another rank could not open its own."""
    if opened.writer is not None:
        opened.writer.close()
    if opened.ledger is not None:
        opened.ledger.mark("crashed")
