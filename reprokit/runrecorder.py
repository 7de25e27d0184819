"""What a step of a :class:`reprokit.Run` writes: its metrics.csv row, its per-tensor digests and
its fingerprints (:mod:`reprokit.fingerprints`), and the seconds reprokit spent doing so.

A recorded step (every ``digest_every``-th) gathers its fingerprint as the loop runs: the batch
and the RNG streams at the loader's last yield before the step (the forward comes next), the
gradients in the optimizer's step pre-hook (complete, not yet applied), the parameters and the
loss at ``run.step()``. Step 0 holds the initial parameters and streams.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch

from reprokit.digests import DigestMemo, combine_digests, state_digests
from reprokit.errors import ReprokitError
from reprokit.fingerprints import BatchHasher, grad_digests, loss_bits, stream_digests
from reprokit.rundir import METRIC_COLUMNS, RunWriter
from reprokit.stateview import StateView

_COLUMNS = frozenset(METRIC_COLUMNS) - {"step", "epoch", "kind", "metrics", "digest"}  # e.g. val_loss


class StepRecorder:
    """The recording side of a run: one per :class:`reprokit.Run`, told each step's number."""

    def __init__(self, digest_every: int, grad_every: int, view: Callable[[], StateView]) -> None:
        self.digest_every, self.grad_every = digest_every, grad_every
        self._view = view  # the tracked modules' tensors (known once the run began)
        # seconds inside reprokit's hooks: run.step(), the fingerprints of a loader's yield, the
        # gradient digests in the optimizer's step pre-hook
        self.hook_seconds = {"step": 0.0, "yield": 0.0, "update": 0.0}
        self.recording = False  # whether the upcoming step is a recorded one
        self._upcoming = 1
        self._hasher: BatchHasher | None = None
        self._streams: dict[str, str] | None = None
        self._grads: dict[str, str] | None = None
        self._init_digests: dict[str, str] | None = None
        self._init_streams: dict[str, str] | None = None
        self._params_memo, self._grads_memo = DigestMemo(), DigestMemo()

    def expect(self, upcoming: int, *, loaders: bool) -> None:
        """After a step (or the start): is step ``upcoming`` recorded? Then gather what goes into it."""
        self._upcoming = upcoming
        self.recording = bool(self.digest_every) and upcoming % self.digest_every == 0
        self._hasher, self._streams, self._grads = None, None, None
        if self.recording and not loaders:  # no loader yield will say: now, then
            self._streams = stream_digests()

    def restored(self, *, loaders: bool) -> None:
        """A resume put the RNGs back: without a loader, the streams as restored go into the step."""
        if self.recording and not loaders:
            self._streams = stream_digests()

    def yielded(self, loader: int, indices: list[int], batch: Any) -> None:
        """A run.loader batch on its way to the next (recorded) step."""
        began = time.perf_counter()
        if self._hasher is None:
            self._hasher = BatchHasher()
        self._hasher.add(loader, indices, batch)
        self._streams = stream_digests()  # the last yield before the step wins: the forward is next
        self.hook_seconds["yield"] += time.perf_counter() - began

    def before_update(self) -> None:
        """The optimizer's step pre-hook: the gradients are complete, not yet applied."""
        if self._grads is None and self._grads_due():
            began = time.perf_counter()
            self._grads = grad_digests(self._view().parameters(), self._grads_memo)
            self.hook_seconds["update"] += time.perf_counter() - began

    def take_init(self, module_state: Mapping[str, torch.Tensor]) -> None:
        """θ_0's digests and the streams at the start, written with the step-0 row."""
        self._init_digests = state_digests(module_state) if self.digest_every else None
        self._init_streams = stream_digests() if self.digest_every else None

    def write_init(self, files: RunWriter, row: dict[str, Any]) -> dict[str, str] | None:
        """The step-0 row; returns θ_0's digests."""
        digests = self._init_digests
        if digests is not None:
            row["digest"] = combine_digests(digests)
        files.step(csv_row(row), digests)
        if self._init_streams is not None:
            files.fingerprint({"step": 0, **self._init_streams}, None)
        return digests

    def write_step(self, files: RunWriter, row: dict[str, Any], loss: float | None) -> dict[str, str] | None:
        """A step's row (and, when recorded, its digests and fingerprint); returns the digests."""
        digests = None
        if self.recording:
            digests = self._params_memo.digests(self._view().tensors().items())
            row["digest"] = combine_digests(digests)
        files.step(csv_row(row), digests)
        if self.recording:
            self._write_fingerprint(files, row["step"], loss)
        return digests

    def _grads_due(self) -> bool:
        return self.recording and bool(self.grad_every) and self._upcoming % self.grad_every == 0

    def _write_fingerprint(self, files: RunWriter, step: int, loss: float | None) -> None:
        if self._grads is None and self._grads_due():  # no tracked optimizer's pre-hook took them
            self._grads = grad_digests(self._view().parameters(), self._grads_memo)
        indices, batch = self._hasher.digests() if self._hasher is not None else ("", "")
        streams = self._streams if self._streams is not None else stream_digests()
        grads = self._grads
        files.fingerprint({
            "step": step, "indices": indices, "batch": batch, **streams,
            "loss": loss_bits(loss) if loss is not None else "",
            "grads": combine_digests(grads) if grads else "",
        }, grads)


def put_metrics(row: dict[str, Any], metrics: Mapping[str, Any]) -> None:
    """The columns metrics.csv has (val_loss, ...) go there, the rest into its ``metrics`` JSON."""
    own = {}
    for key, value in metrics.items():
        if key in _COLUMNS:
            row[key] = number(key, value)
        else:
            own[key] = number(key, value)
    if own:
        row["metrics"] = own


def number(name: str, value: Any) -> float:
    """A metric as a float: a number or a one-element tensor."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ReprokitError(f"metric {name!r} is a tensor of {value.numel()} elements; pass one number")
        return float(value.item())
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ReprokitError(f"metric {name!r} = {value!r} is not a number; pass a float or a "
                            "one-element tensor") from None


def csv_row(row: dict[str, Any]) -> dict[str, Any]:
    """A row as metrics.csv holds it: the extra metrics as one JSON cell."""
    if "metrics" in row:
        row = {**row, "metrics": json.dumps(row["metrics"], sort_keys=False)}
    return row


def loss_value(loss: Any) -> float:
    """run.step's loss as a float (NaN when none was passed)."""
    return number("loss", loss) if loss is not None else math.nan
