"""``reprokit.Run``: every reprokit capability on a user's own model, data and loop.

    run = reprokit.Run("runs/a", seed=1, config=vars(args), checkpoint_every=50)
    run.track(model=model, optimizer=optimizer, scheduler=scheduler)
    train_loader = run.loader(train_loader)            # or run.loader(dataset, batch_size=64, ...)
    for epoch in run.epochs(args.epochs):
        for x, y in train_loader:
            ...; optimizer.step()
            run.step(loss=loss)
        run.log(val_accuracy=test(model, test_loader))
        scheduler.step()
    run.finish(val_accuracy=acc)

Constructing a Run seeds every RNG, pins the thread count and writes the manifest. Constructing it
on a directory holding an unfinished run of the same recipe resumes that run (relaunch = resume):
the newest checkpoint that verifies is loaded, the epoch loop starts at its epoch and the loader at
its batch, and the tracked objects and every RNG go back at the moment that makes the continuation
exact: when the resumed epoch's loader iterator exists (see :mod:`reprokit.runloader`). On a
finished run it exits with status 0 (:class:`RunFinished`). SIGTERM and SIGINT stop the run after
the current step with a verified checkpoint, exit status :data:`EXIT_STOPPED`. reprokit's built-in
trainer (:mod:`reprokit.trainer`) is a client of this class like any script.

Under ``torchrun --nproc-per-node N`` (N > 1) the same script runs distributed, reduction mode
"ddp" (:mod:`reprokit.runworld`): Run joins or creates the process group (and leaves one it created
at ``finish``), rank 0 records in the run directory and rank r in ``RUN_DIR/ranks/rank-r``
(``run.path``), each rank's parameter digests are compared with rank 0's after every digest step,
and a relaunch of the same command continues every rank from the same step. A relaunch at another
world size is refused. Wrap the model in ``DistributedDataParallel`` after constructing the Run and
track the wrapper (its module is saved; its bucket settings go in the manifest) or the inner module.
"""

from __future__ import annotations

import atexit
import dataclasses
import time
from collections.abc import Collection, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from reprokit.callbacks import Callback
from reprokit.checkpointer import Checkpointer
from reprokit.datadigest import digest_data
from reprokit.digests import combine_digests
from reprokit.distributed import leave_process_group, rank_seed
from reprokit.errors import ConfigError, DataError, ReprokitError
from reprokit.faults import NO_FAULTS, Faults, kill_self
from reprokit.loaderoptions import loader_arguments, with_workers
from reprokit.overrides import Overrides, read_overrides
from reprokit.runend import RunEnd, release
from reprokit.runloader import RunLoader
from reprokit.runrecorder import StepRecorder, csv_row, loss_value, number, put_metrics
from reprokit.runreduce import CanonicalReduction, check_reduction
from reprokit.runresume import (
    Opened,
    Resumed,
    ResumeRefused,
    RunFinished,
    config_mapping,
    open_run_dir,
)
from reprokit.runsettings import resolve_settings
from reprokit.runstop import EXIT_STOPPED, ResumeInfo, RunSummary, StopSignals, progress_bar
from reprokit.runtracked import Tracked
from reprokit.runworld import (
    agree_after_step,
    join_world,
    manifest_entry,
    open_in_rank_order,
    rank_path,
    stop_signal,
    track_ddp,
)
from reprokit.seeding import seed_everything
from reprokit.trace import Tracer

__all__ = ["EXIT_STOPPED", "ResumeInfo", "ResumeRefused", "Run", "RunFinished", "RunSummary"]


class Run(RunEnd):
    """A run of the user's own loop. See the module docstring; arguments as in DESIGN.md.

    Args:
        run_dir: the run directory (``REPROKIT_RUN_DIR`` wins, so a harness can redirect a script).
        seed: seeds python, numpy, torch (+CUDA), the data order and per-sample augmentation: one
            int, or per-source seeds ``{"init", "data_order", "augmentation", "dropout"}`` (and
            ``"base"`` for those not given; :class:`reprokit.seeding.Seeds`), recorded in the manifest.
        config: the user's settings (a mapping, dataclass or ``argparse.Namespace``), recorded.
        threads: intra-op threads, pinned (they change the bits on CPU); ``None`` leaves torch's.
        deterministic: torch's deterministic algorithms and the cuDNN/cuBLAS knobs.
        digest_every: per-tensor digests every N steps (0 = off); trace_every: the tracer.
        checkpoint_every / checkpoint_seconds / keep_last / async_save: checkpoints.
        data: extra data to digest into the manifest (tensors, arrays, datasets, files).
        force: resume even if the recipe changed (recorded in the manifest).
        progress: a progress bar; ``None`` = on unless ``REPROKIT_PROGRESS=0``.
        steps: the run's length in optimizer steps, when known: loaders stop there, the progress
            bar has a total, and no checkpoint is taken at the last step (finish follows).
        callbacks: hooks (:class:`reprokit.Callback`) called at start, after each step, at the end;
            their ``state_dict`` goes into every checkpoint.
        faults: kill points for fault-injection experiments (the ``REPROKIT_CRASH_*`` variables
            set them too, in a run's first process only).
        kind, resume, ignore, ledger, overrides: how a client like the built-in trainer identifies
            its runs: ``kind="builtin"`` compares recipes by config (minus the ``ignore`` fields,
            which only say how the run is recorded), data and reprokit's code instead of by script;
            ``resume`` is ``"auto"`` (relaunch = resume), ``"never"`` or ``"required"``;
            ``ledger=False`` keeps the run out of the ledger; ``overrides=False`` ignores ``REPROKIT_*``.
    """

    def __init__(
        self, run_dir: str | Path | None = None, *, seed: int | Mapping[str, int] = 0, config: Any = None,
        threads: int | None = 1, deterministic: bool = True, digest_every: int = 1, trace_every: int = 0,
        checkpoint_every: int = 0, checkpoint_seconds: float = 0.0, keep_last: int = 3,
        async_save: bool = False, data: Any = None, force: bool = False, progress: bool | None = None,
        steps: int | None = None, callbacks: Sequence[Callback] = (), faults: Faults = NO_FAULTS,
        kind: str = "script", resume: str = "auto", ignore: Collection[str] = (), ledger: bool = True,
        overrides: bool = True, grad_digest_every: int | None = None, reduction: str = "ddp",
        micro_batches: int | None = None,
    ) -> None:
        started = time.perf_counter()
        env = read_overrides() if overrides else Overrides(progress=read_overrides().progress)
        reduction, micro_batches = env.reduce(reduction, micro_batches)  # REPROKIT_REDUCTION wins
        cfg = resolve_settings(
            env, run_dir, seed=seed, threads=threads, deterministic=deterministic, digest_every=digest_every,
            grad_digest_every=grad_digest_every, trace_every=trace_every, checkpoint_every=checkpoint_every,
            checkpoint_seconds=checkpoint_seconds, keep_last=keep_last, async_save=async_save, steps=steps,
            progress=progress, force=force)
        # under torchrun (WORLD_SIZE > 1) rank 0 records in run_dir, rank r in run_dir/ranks/rank-r
        self.world = join_world()
        check_reduction(reduction, micro_batches, self.world.world_size)
        self.reduction, self.micro_batch_count = reduction, micro_batches
        ledger = ledger and self.world.is_main
        self.path, self.sources, self.config = rank_path(cfg.path, self.world), cfg.sources, config
        self.seed = self.sources.init
        self._num_workers, self._progress = cfg.num_workers, cfg.progress if self.world.is_main else False
        self.seeds = seed_everything(self.seed, deterministic=cfg.deterministic, threads=cfg.threads)
        if self.sources.per_source:
            self.seeds = dataclasses.replace(self.seeds, sources=self.sources.to_dict())
        self._rank_seed = rank_seed(self.sources.dropout, self.world.rank) if self.world.rank else None
        self._canonical = (CanonicalReduction(self.world, micro_batches, self.sources.dropout)
                           if micro_batches is not None else None)
        self._distributed = manifest_entry(self.world, cfg.threads, self._rank_seed, reduction,
                                           self._canonical.manifest() if self._canonical else None)
        self._borrowed: int | None = None  # set by a rank new to a resumed run (RunStart._borrow)
        self._replica_mismatch: list[list[int]] = []  # [step, rank] whose parameters differ from rank 0's
        opened = self._open(config, cfg.recorded(), env, force=cfg.force, kind=kind, resume=resume,
                            ignore=frozenset(ignore), ledger=ledger)
        self._manifest, self._writer, self._ledger = opened.manifest, opened.writer, opened.ledger
        self._resumed: Resumed | None = opened.resumed
        self._force, self._record_ledger, self._ignore = cfg.force, ledger, frozenset(ignore)
        self.resuming = not opened.fresh  # the directory held a run that this one continues
        self._differences, self._skipped = opened.differences, opened.skipped
        self._extra_data = digest_data(data) if data is not None else None
        self._described: dict[str, Any] = {}
        self.digest_every, self.trace_every, self.steps = cfg.digest_every, cfg.trace_every, steps
        self.grad_digest_every = cfg.grad_every
        self._tracked = Tracked(self._before_update)
        self._recorder = StepRecorder(cfg.digest_every, cfg.grad_every, self._tracked.view)
        self.hook_seconds = self._recorder.hook_seconds  # seconds in run.step, loader yields, updates
        self.global_step = self._resumed.meta.step if self._resumed else 0
        self.epoch = self._resumed.meta.epoch if self._resumed else 0
        self.resumed_from = self.global_step if self.resuming else None
        self.digests: dict[str, str] | None = None  # the last step's per-tensor digests, if taken
        # kill points from the environment fire in a run's first process only, so a relaunch gets
        # past them; explicit faults (a harness's) always do
        self._crash_at_step = faults.crash_at_step or (env.crash_at_step if opened.fresh else None)
        self._flip = faults.flip_bit or env.flip_bit  # part of the run: applied whenever it starts at 0
        crash_save = faults.crash_during_save or (cfg.crash_during_save if opened.fresh else None)
        self._checkpointer = Checkpointer(self.path, every=cfg.checkpoint_every, seconds=checkpoint_seconds,
                                          keep=keep_last, background=async_save,
                                          crash_during_save=crash_save)
        self._loaders: list[RunLoader] = []
        tracer = (Tracer(self.path, every=cfg.trace_every),) if cfg.trace_every else ()
        self._callbacks: tuple[Callback, ...] = (*tracer, *callbacks)
        self._state: Any = None  # the TrainState the callbacks see
        self._begun = self._pending = self._in_epochs = self._init_pending = False
        self._done = False
        self._last_logged: dict[str, float] = {}
        self._started = started
        self._latency: float | None = None
        self._bar: Any = None
        self._signals = StopSignals()
        atexit.register(self._at_exit)

    def _open(self, config: Any, settings: dict[str, Any], env: Overrides, *, force: bool, kind: str,
              resume: str, ignore: frozenset[str], ledger: bool) -> Opened:
        """Open this rank's run directory (rank 0's first); a failure leaves the group Run made."""
        try:
            return open_in_rank_order(self.world, lambda: open_run_dir(
                self.path, config_mapping(config), self.seeds, settings, env, force=force, kind=kind,
                resume=resume, ignore=ignore, ledger=ledger, distributed=self._distributed), release)
        except BaseException:
            if self.world.world_size > 1:  # every rank fails here together
                leave_process_group(self.world)
            raise

    # --- what a checkpoint holds -------------------------------------------------------------
    def track(self, **objects: Any) -> None:
        """Name the objects a checkpoint holds: anything with ``state_dict``/``load_state_dict``."""
        if self._begun:
            raise ReprokitError("run.track() after the run began; track every object before the first "
                                "run.epochs()/run.step()")
        self._tracked.add(track_ddp(objects, None if self.resuming else self._manifest))

    def loader(self, source: Any, *, digest: bool = True, **kwargs: Any) -> RunLoader:
        """A loader whose order and per-sample randomness are a function of (seed, epoch, index),
        from a dataset and DataLoader arguments or from an existing DataLoader (taken over).
        ``digest=False`` leaves the dataset out of the manifest (digest what it reads with ``data=``)."""
        if self._begun:
            raise ReprokitError("run.loader() after the run began; create loaders before run.epochs()")
        dataset, batch_size, shuffle, drop_last, options = loader_arguments(source, kwargs)
        try:
            content = digest_data(dataset) if digest else None
        except DataError as e:
            raise DataError(f"{e}; or pass run.loader(..., digest=False) and Run(data=...) what it "
                            "reads") from e
        loader = RunLoader(self, len(self._loaders), dataset, batch_size=batch_size, shuffle=shuffle,
                           drop_last=drop_last, options=with_workers(options, self._num_workers),
                           digest=content)
        self._loaders.append(loader)
        return loader

    def describe(self, *, data: Mapping[str, Any] | None = None, parent: Mapping[str, Any] | None = None,
                 factories: Mapping[str, Any] | None = None) -> None:
        """Before the first step, what a client knows better than the loaders: the manifest's data
        entry (a mapping with a ``digest``), the parent model a fine-tune starts from, the model and
        dataset factories with their source digests."""
        if self._begun:
            raise ReprokitError("run.describe() after the run began; describe it before the first step")
        self._described = {"data": data, "parent": parent, "factories": factories}

    # --- the loop ----------------------------------------------------------------------------
    def epochs(self, n: int, *, start: int = 0) -> Iterator[int]:
        """Epochs ``start .. start+n-1``; a resumed run starts at its saved epoch."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ConfigError(f"run.epochs({n!r}): pass the number of epochs, an int >= 0")
        self._begin()
        self._in_epochs = True
        try:
            while self.epoch < n and not self.at_end:
                if self._pending and not self._resumed_mid_epoch():
                    self._restore_now()
                yield self.epoch + start
                if self.at_end:  # the step limit ended the epoch early: it is not over
                    break
                self.epoch += 1
                if self.epoch < n and self._stop_requested():
                    self._stop_now()
        finally:
            self._in_epochs = False

    @property
    def at_end(self) -> bool:
        """Whether the run took its ``steps`` (loaders yield nothing more then)."""
        return self.steps is not None and self.global_step >= self.steps

    def step(self, loss: Any = None, **metrics: Any) -> None:
        """After each optimizer step: a metrics row, digests, trace, checkpoint when due, kill points."""
        began = time.perf_counter()
        try:
            self._step(loss, metrics)
        finally:
            self.hook_seconds["step"] += time.perf_counter() - began

    def _step(self, loss: Any, metrics: Mapping[str, Any]) -> None:
        self._enter_step()
        self.global_step += 1
        if self._canonical is not None:
            self._canonical.stepped()
        step = self.global_step
        if step == self._crash_at_step:  # the rows so far reach the OS first, as they would within a second
            self._files.flush()
            kill_self()
        row: dict[str, Any] = {"step": step, "epoch": self.epoch, "kind": "step", "lr": self._tracked.lr(),
                               "loss": loss_value(loss)}
        put_metrics(row, metrics)
        self.digests = self._recorder.write_step(self._files, row, row["loss"] if loss is not None else None)
        due = step != self.steps and self._checkpointer.due(step)
        if self.world.world_size > 1:  # one collective: replicas, rank 0's clock, a stop at any rank
            agreed = agree_after_step(self.world, step, self._signals.requested, due,
                                      combine_digests(self.digests) if self.digests is not None else None)
            self._replica_mismatch += [[step, rank] for rank in agreed.mismatched]
            due = step != self.steps and (agreed.due if self._checkpointer.seconds else due)
            self._signals.requested = agreed.signal
        self._state.step, self._state.digests = step, self.digests
        for cb in self._callbacks:
            cb.on_step_end(self._state)
        stopping = self._signals.requested is not None
        if due and not stopping:  # a stop saves this step's checkpoint itself
            self._checkpointer.save(self._snapshot)
        self._expect_step()
        if self._bar is None:
            self._bar = progress_bar(self._progress, self.steps, step - 1, self.path.name)
        self._bar.update()
        if stopping:
            self._stop_now()

    def _stop_requested(self) -> bool:
        """A SIGTERM/SIGINT arrived; under torchrun, at any rank (the ranks stop after the same step)."""
        if self.world.world_size > 1:
            self._signals.requested = stop_signal(self._signals.requested)
        return self._signals.requested is not None

    def _enter_step(self) -> None:
        """What must hold before a step: the run began, a resume restored, the step-0 row written."""
        if not self._begun:
            self._begin()
        if self._pending:
            raise ReprokitError("run.step() came before the resumed epoch's loader was iterated; iterate "
                                "the run.loader inside run.epochs() and call run.step() after each update")
        if self._init_pending:
            self._write_init({})
        if self._latency is None:
            self._latency = time.perf_counter() - self._started

    def log(self, **metrics: Any) -> None:
        """A row of metrics between steps (e.g. an epoch's validation accuracy); before the first
        step, the metrics of the initial model (the step-0 row)."""
        if not self._begun:
            self._begin()
        if self._init_pending:
            self._write_init(metrics)
            return
        row = {"step": self.global_step, "epoch": self.epoch, "kind": "log"}
        put_metrics(row, metrics)
        self._last_logged = {k: number(k, v) for k, v in metrics.items()}
        self._files.step(csv_row(row), None)

    def flush(self) -> None:
        """Write the rows waiting in memory (they reach the files within a second by themselves,
        and at every checkpoint): for a reader of the run directory while the run is open."""
        if self._writer is not None:
            self._writer.flush()

    def micro_batches(self, *tensors: Any) -> Iterator[Any]:
        """reduction='canonical': this rank's micro-batches of a ``run.loader`` batch (one tensor, or a
        tuple for several); run forward and backward on each, then ``optimizer.step()`` once."""
        canonical: CanonicalReduction | None = self._canonical
        if canonical is None:
            raise ReprokitError("run.micro_batches() belongs to reduction='canonical'; pass "
                                "Run(..., reduction='canonical', micro_batches=M), or run one forward and "
                                "backward per batch")
        self._begin()
        params = [p for p in self._tracked.view().parameters().values() if p.requires_grad]
        return canonical.split(self.global_step + 1, params, tensors)

    def _before_update(self, *_: Any) -> None:
        self._checkpointer.before_update()  # an async save may still be copying the weights
        if self._canonical is not None:  # the micro-batch gradients, reduced, become .grad
            self._canonical.reduce()
        self._recorder.before_update()
