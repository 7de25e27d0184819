"""How a :class:`reprokit.Run` begins: a new run's step 0, or a relaunch's checkpoint settled and put back.

A new run completes its manifest (the loaders' data digests, what a client described), opens its
ledger row and takes θ_0's digests. A relaunch that found a checkpoint compares the recipe, settles
which checkpoint it continues from, positions the loaders, and restores the tracked objects and every
RNG only when the resumed epoch's loader iterator exists (:meth:`RunStart._restore_now`), the moment
that makes the continuation exact (see :mod:`reprokit.runloader`).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from reprokit.callbacks import Callback, TrainState
from reprokit.checkpoint import CheckpointMeta, architecture
from reprokit.distributed import World
from reprokit.errors import DistributedError, ReprokitError
from reprokit.faults import flip_bit
from reprokit.ledgerentry import LedgerEntry
from reprokit.rundir import MANIFEST, RunWriter, read_json
from reprokit.runloader import RunLoader
from reprokit.runrecorder import StepRecorder, put_metrics
from reprokit.runresume import (
    POSITION_KEY,
    Resumed,
    begin_differences,
    fitting,
    newest_valid,
    record_begin,
    settle,
)
from reprokit.runsnapshot import REPLICA_KEY, restore_snapshot
from reprokit.runtracked import Tracked
from reprokit.runworld import agree_step, agreed_step
from reprokit.seeding import SeedRecord, Seeds, derive_seed

__all__ = ["RunStart"]


class RunStart:
    """The beginning half of :class:`reprokit.Run` (a mixin: the attributes are Run's)."""

    path: Path
    config: Any
    steps: int | None
    seeds: SeedRecord
    sources: Seeds
    global_step: int
    epoch: int
    resumed_from: int | None
    resuming: bool
    world: World
    _rank_seed: int | None
    _replica_mismatch: list[list[int]]
    digests: dict[str, str] | None
    _tracked: Tracked
    _recorder: StepRecorder
    _loaders: list[RunLoader]
    _callbacks: tuple[Callback, ...]
    _state: Any
    _manifest: dict[str, Any]
    _writer: RunWriter | None
    _ledger: LedgerEntry | None
    _resumed: Resumed | None
    _described: dict[str, Any]
    _extra_data: Any
    _differences: list[str]
    _skipped: list[tuple[str, str]]
    _flip: Any
    _force: bool
    _ignore: frozenset[str]
    _record_ledger: bool
    _begun: bool
    _pending: bool
    _in_epochs: bool
    _init_pending: bool
    _borrowed: int | None  # a rank new to the run: the torch seed it continues rank 0's state with
    _canonical: Any  # reprokit.runreduce.CanonicalReduction in reduction="canonical", else None

    @property
    def _files(self) -> RunWriter:
        """The run directory's writer (a relaunch opens it when it begins, at its checkpoint)."""
        assert self._writer is not None, "the run has not begun"
        return self._writer

    def _module_state(self) -> dict[str, torch.Tensor]:
        return self._tracked.module_state()

    def begin(self) -> None:
        """Start the run now: settle a relaunch's checkpoint (``global_step`` is then where it goes
        on from) and complete the manifest. It starts by itself at the first ``epochs()``, loader
        ``iter()``, ``step()`` or ``log()``."""
        self._begin()

    def _begin(self) -> None:
        if self._begun:
            return
        modules = self._tracked.fix()
        self._begun = True
        sources = {f"loader{ld.index}": ld.digest for ld in self._loaders if ld.digest is not None}
        if self._extra_data is not None:
            sources["data"] = self._extra_data
        self._state = TrainState(self.config, modules[0], self._tracked.optimizer(), None, self.steps or 0)
        layout = architecture(self._module_state())
        if self.resuming:
            self._differences += begin_differences(self.path, self._manifest, sources, self._described,
                                                   force=self._force)
        if self.world.world_size > 1:  # every rank takes part, a fresh one with step 0
            self._resumed = self._agree_checkpoint(layout)
        if self.resuming:
            self._resumed, self._writer = settle(
                self.path, self._resumed, layout, ignore=self._ignore,
                differences=self._differences, skipped=self._skipped, threads=self.seeds.threads,
                world_size=self.world.world_size)
        if self._resumed is None:  # a new run, or a relaunch with no checkpoint that fits: step 0
            self._begin_at_zero(sources)
            return
        self._resumed.check_names(list(self._tracked.objects))
        if self._borrowed is not None:  # a rank new to the run: its new manifest is completed now
            self._manifest = record_begin(self._files, self._manifest, sources, self._tracked_types(),
                                          self._described)
        self.global_step, self.epoch = self._resumed.meta.step, self._resumed.meta.epoch
        self.resumed_from = self.global_step
        self._replica_mismatch = _pairs(self._resumed.state[POSITION_KEY].get(REPLICA_KEY))
        self._pending = True
        for ld in self._loaders:
            saved = self._resumed.state[POSITION_KEY]["loaders"].get(str(ld.index))
            if saved is not None:
                ld.load_state(saved)
        self._expect_step()

    def _begin_at_zero(self, sources: dict[str, Any]) -> None:
        """Start from step 0: complete the manifest, the ledger row, θ_0's digests and streams."""
        self.global_step = self.epoch = 0
        assert self._writer is not None
        if self.resuming:  # the manifest as on disk now: its resumes log included
            self._manifest = read_json(self.path, MANIFEST)
        if self._flip is not None:  # the one-bit perturbation, before θ_0 is digested
            self._manifest["perturbation"] = flip_bit(self._module_state(), self._flip)
        if not self.resuming or self._manifest["data"].get("digest") is None:
            self._manifest = record_begin(self._writer, self._manifest, sources, self._tracked_types(),
                                          self._described)
        if not self.resuming and self._record_ledger:
            self._ledger = LedgerEntry.open(self.path, self._manifest)
        # the step-0 row: θ_0's digests now, written with the initial model's metrics if a
        # run.log() comes before the first step
        self._init_pending = True
        if self.sources.per_source:  # dropout's stream, whatever initialisation consumed
            torch.manual_seed(derive_seed(self.sources.dropout, "dropout"))
        if self._rank_seed is not None:  # rank r > 0 under torchrun: its own dropout masks
            torch.manual_seed(self._rank_seed)
        if self._canonical is not None:  # the replicas start equal, or nothing keeps them so
            self._canonical.check_replicas(self._module_state())
        self._recorder.take_init(self._module_state())
        self._expect_step()
        for cb in self._callbacks:
            cb.on_train_start(self._state)

    def _agree_checkpoint(self, layout: Mapping[str, Any]) -> Resumed | None:
        """The checkpoint this rank continues from at the step every rank holds (see
        :func:`reprokit.runworld.agree_step`); None: all ranks start over."""
        resumed = self._resumed
        if not self.resuming:  # this rank's directory is new: the world grew since the run started
            return self._borrow(agreed_step(self.world), layout)
        if resumed is None:
            agree_step(self.world, None, _step_of, lambda chosen, step: None)
            return None
        config, chosen = resumed.stored["config"], (resumed.meta, resumed.state, resumed.checkpoint)
        first = fitting(self.path, chosen, layout, config=config, ignore=self._ignore, skipped=self._skipped)

        def older(newer: _Chosen, step: int) -> _Chosen | None:
            self._skipped.append((newer[2], f"step {newer[0].step} is newer than step {step}, the newest "
                                            "step every rank holds a checkpoint of"))
            found, more = newest_valid(self.path, below=step + 1, config=config, ignore=self._ignore)
            self._skipped.extend(more)
            return fitting(self.path, found, layout, config=config, ignore=self._ignore,
                           skipped=self._skipped)

        agreed = agree_step(self.world, first, _step_of, older)
        return Resumed(*agreed, self._skipped, resumed.stored, resumed.force) if agreed else None

    def _tracked_types(self) -> dict[str, str]:
        return {n: type(o).__name__ for n, o in self._tracked.objects.items()}

    def _borrow(self, step: int, layout: Mapping[str, Any]) -> Resumed | None:
        """A rank new to the run continues from rank 0's checkpoint of the agreed step: every rank's
        model, optimizer and position are one state (replicas); its torch stream is derived anew
        from (seed, rank, step) and recorded (its own was never saved)."""
        if step == 0:
            return None
        root = self.path.parents[1]  # RUN_DIR/ranks/rank-R -> RUN_DIR
        found, skipped = newest_valid(root, below=step + 1, config=self._manifest["config"],
                                      ignore=self._ignore)
        chosen = fitting(root, found, layout, config=self._manifest["config"], ignore=self._ignore,
                         skipped=skipped)
        if chosen is None or chosen[0].step != step:
            raise DistributedError(f"rank {self.world.rank} is new to {str(root)!r} and continues from rank "
                                   f"0's checkpoint of step {step}, which does not verify here ({skipped}); "
                                   "relaunch at the world size the run had, or start a new run directory")
        self._borrowed = derive_seed(self.sources.dropout, "rank", self.world.rank, "resumed", step)
        self._manifest["borrowed"] = {"checkpoint": str(root / "checkpoints" / chosen[2]), "step": step,
                                      "torch_seed": self._borrowed}
        return Resumed(*chosen, skipped, self._manifest, self._force)

    def _write_init(self, metrics: Mapping[str, Any]) -> None:
        self._init_pending = False
        row: dict[str, Any] = {"step": 0, "epoch": 0, "kind": "init", "lr": self._tracked.lr()}
        put_metrics(row, metrics)
        self.digests = self._recorder.write_init(self._files, row)

    def _expect_step(self) -> None:
        self._recorder.expect(self.global_step + 1, loaders=bool(self._loaders))

    def _resumed_mid_epoch(self) -> bool:
        assert self._resumed is not None
        return any(s["active"] for s in self._resumed.state[POSITION_KEY]["loaders"].values())

    def _restore_now(self, *, in_loop: bool = True) -> None:
        """Put back the tracked objects, every RNG and the callbacks' state: called when the
        resumed epoch's loader iterator exists (or at the epoch's start when no loader was mid-pass)."""
        if not self._pending:
            return
        assert self._resumed is not None
        if in_loop and not self._in_epochs:
            raise ReprokitError(
                f"{str(self.path)!r} resumes at epoch {self.epoch}, but the loop is not run.epochs(): a "
                "resumed run must start at its saved epoch; write the epoch loop as `for epoch in "
                "run.epochs(n):`")
        restore_snapshot(self._resumed.state, self._resumed.meta, self._tracked, self._callbacks, self._state,
                         step=self.global_step, path=self.path)
        if self._borrowed is not None:  # rank 0's stream came with its state: this rank's own instead
            torch.manual_seed(self._borrowed)
        self._pending = False
        self._recorder.restored(loaders=bool(self._loaders))


_Chosen = tuple[CheckpointMeta, dict[str, Any], str]  # a checkpoint's meta, state and name


def _pairs(saved: Any) -> list[list[int]]:
    """The replica mismatches a checkpoint recorded before the relaunch ([] if none or not pairs)."""
    if not isinstance(saved, list):
        return []
    return [[int(p[0]), int(p[1])] for p in saved
            if isinstance(p, list) and len(p) == 2 and all(type(v) is int for v in p)]


def _step_of(chosen: _Chosen) -> int:
    return chosen[0].step
