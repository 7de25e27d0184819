"""What a :class:`reprokit.Run` checkpoint holds, and putting it back.

A snapshot holds the tracked modules' tensors, the other tracked objects' state dicts, every RNG,
the callbacks' state and the position (each loader's epoch and batch, the names tracked), with the
:class:`~reprokit.checkpoint.CheckpointMeta` that ties it to the run. :func:`restore_snapshot` is
called when the resumed epoch's loader iterator exists, so the continuation is exact.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from reprokit.callbacks import Callback, TrainState, callback_keys
from reprokit.checkpoint import CALLBACKS_KEY, MODEL_KEY, RNG_KEY, CheckpointMeta, Snapshot
from reprokit.rundir import RunWriter
from reprokit.runloader import RunLoader
from reprokit.runresume import POSITION_KEY, TRACKED_KEY, restore_tracked
from reprokit.runtracked import Tracked
from reprokit.seeding import RngState, capture_rng_state, restore_rng_state

__all__ = ["REPLICA_KEY", "restore_snapshot", "take_snapshot"]

REPLICA_KEY = "replica_mismatch"  # state.pt position, under torchrun: [[step, rank], ...] so far


def take_snapshot(tracked: Tracked, loaders: Sequence[RunLoader], callbacks: tuple[Callback, ...], *,
                  step: int, epoch: int, manifest: Mapping[str, Any], files: RunWriter,
                  replica_mismatch: list[list[int]] | None = None) -> Snapshot:
    """The run's state after ``step``: what the checkpointer writes (and verifies); under torchrun
    also the (step, rank) pairs whose parameters differed from rank 0's so far."""
    modules = tracked.modules()
    active = [ld for ld in loaders if ld.active]
    keys = callback_keys(callbacks)
    state: dict[str, Any] = {
        MODEL_KEY: tracked.module_state(),
        TRACKED_KEY: tracked.others(),
        RNG_KEY: capture_rng_state().to_dict(),
        CALLBACKS_KEY: dict(zip(keys, [cb.state_dict() for cb in callbacks], strict=True)),
        POSITION_KEY: {"loaders": {str(ld.index): ld.state() for ld in loaders},
                       "modules": list(modules), "tracked": list(tracked.objects),
                       **({REPLICA_KEY: replica_mismatch} if replica_mismatch is not None else {})},
    }
    meta = CheckpointMeta(
        step=step, epoch=epoch, batch=active[0].batch if active else 0,
        config=manifest["config"], data_digest=str(manifest["data"]["digest"]),
        code_version=str(manifest["fingerprint"]), manifest_digest=files.manifest_digest(),
        run_files=files.sync(), created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    )
    return Snapshot(meta, state, update_only=tracked.updated_in_place())


def restore_snapshot(saved: Mapping[str, Any], meta: CheckpointMeta, tracked: Tracked,
                     callbacks: tuple[Callback, ...], state: TrainState, *, step: int, path: Path) -> None:
    """Put back the tracked objects (by name), every RNG and the callbacks' state."""
    restore_tracked(tracked.objects, saved[MODEL_KEY], saved[TRACKED_KEY], saved[POSITION_KEY]["modules"],
                    meta, path)
    restore_rng_state(RngState.from_dict(saved[RNG_KEY]))
    for opt in tracked.optimizers() if step else ():
        # what the uninterrupted process has: an LR scheduler then does not warn that it
        # stepped before the optimizer (torch/optim/lr_scheduler.py)
        opt._opt_called = True  # type: ignore[attr-defined]
    states = saved.get(CALLBACKS_KEY, {})
    state.step = step
    for key, cb in zip(callback_keys(callbacks), callbacks, strict=True):
        cb.load_state_dict(states.get(key))
        cb.on_train_start(state)
