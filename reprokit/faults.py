"""Fault injection: kill the training process with SIGKILL at an exact, reproducible point.

SIGKILL, not an exception: nothing in the process gets to clean up, flush or close, which is what
a power cut, an OOM kill or a pre-empted node does to a real run.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass

from reprokit.errors import ConfigError


@dataclass(frozen=True)
class Faults:
    """Where to kill the run (each ``None`` = never).

    crash_at_step: die right after optimizer step K updated the weights in memory, before step K's
        metrics row or checkpoint reach the disk (the work of step K is lost).
    crash_during_save: die half-way through writing the checkpoint of step K (its tensors file is half
        written, nothing is committed).
    """

    crash_at_step: int | None = None
    crash_during_save: int | None = None

    def check(self, checkpoint_every: int, total_steps: int) -> None:
        """Raise :class:`ConfigError` if a kill point can never be reached in this run."""
        k = self.crash_at_step
        if k is not None and not 1 <= k <= total_steps:
            raise ConfigError(f"--crash-at-step {k} is outside the run's steps [1, {total_steps}]")
        k = self.crash_during_save
        if k is None:
            return
        every = checkpoint_every
        if not every:
            raise ConfigError(
                f"--crash-during-save {k} needs checkpoints by step; set checkpoint_every in the config"
            )
        if k % every or not 1 <= k < total_steps:
            raise ConfigError(
                f"--crash-during-save {k} is not a checkpoint step: checkpoints are saved every "
                f"{every} steps before the last step {total_steps}; pick a multiple of {every} below it"
            )


NO_FAULTS = Faults()


def kill_self() -> None:
    """SIGKILL this process (does not return)."""
    os.kill(os.getpid(), signal.SIGKILL)
