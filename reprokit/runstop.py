"""How a :class:`reprokit.Run` ends: its summary, how a relaunch resumed, SIGTERM/SIGINT, the bar.

SIGTERM (a scheduler's preemption notice) and SIGINT (Ctrl-C, a notebook's interrupt) do not stop
the process at once: :class:`StopSignals` records the request, and the run stops at the end of the
current step with a verified checkpoint and exit status :data:`EXIT_STOPPED`. A second signal while
stopping is the usual ``KeyboardInterrupt``.
"""

from __future__ import annotations

import signal
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

EXIT_STOPPED = 75  # EX_TEMPFAIL: stopped by SIGTERM/SIGINT with a checkpoint; relaunch to resume

__all__ = ["EXIT_STOPPED", "ResumeInfo", "RunSummary", "StopSignals", "progress_bar"]


@dataclass(frozen=True)
class RunSummary:
    """What :meth:`Run.finish` wrote to result.json."""

    run_dir: Path
    final_digest: str
    metric_name: str | None
    final_metric: float
    steps: int
    seconds: float
    resumed_from_step: int | None


@dataclass(frozen=True)
class ResumeInfo:
    """How a relaunched run got going again."""

    checkpoint: str | None  # the checkpoint it continued from; None = restarted from step 0
    from_step: int
    skipped: tuple[tuple[str, str], ...]  # (checkpoint, why it was not used), newest first
    latency_seconds: float  # from the Run() call to the first step: verify, load, restore
    differences: tuple[str, ...]  # recipe changes accepted with force
    forced: bool


class StopSignals:
    """SIGTERM and SIGINT handlers that ask the run to stop after the current step.

    Installed from the main thread only (Python delivers signals there); :meth:`restore` puts the
    previous handlers back. ``requested`` is the signal number once one arrived."""

    def __init__(self) -> None:
        self.requested: int | None = None
        self.closed = False
        self._previous: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._previous[signum] = signal.signal(signum, self._on_signal)

    @property
    def name(self) -> str:
        assert self.requested is not None
        return signal.Signals(self.requested).name

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self.requested is not None or self.closed:  # a second Ctrl-C: the usual KeyboardInterrupt
            previous = self._previous.get(signum)
            if callable(previous):
                previous(signum, frame)
            raise KeyboardInterrupt
        self.requested = signum
        print(f"reprokit: {signal.Signals(signum).name} received; stopping after this step with a "
              "checkpoint", file=sys.stderr, flush=True)

    def stopped(self, step: int) -> SystemExit:
        """The exit a stopped run raises, its message printed."""
        print(f"reprokit: stopped by {self.name} at step {step} with a checkpoint; run the same "
              f"command again to resume (exit status {EXIT_STOPPED})", file=sys.stderr, flush=True)
        return SystemExit(EXIT_STOPPED)

    def restore(self) -> None:
        """Put the previous handlers back (the run is closed)."""
        self.closed = True
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}


def progress_bar(progress: bool | None, total: int | None, initial: int, name: str) -> Any:
    """A tqdm bar over the run's steps (disabled when ``progress`` is False)."""
    from tqdm.auto import tqdm  # tqdm.auto looks for ipywidgets: only once a bar is wanted

    return tqdm(total=total, initial=initial, disable=progress is False, leave=False, desc=name)
