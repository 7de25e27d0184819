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
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import json
import math
import signal
import sys
import threading
import time
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import torch
from torch import nn

from reprokit.callbacks import Callback, TrainState, callback_keys
from reprokit.checkpoint import CALLBACKS_KEY, MODEL_KEY, RNG_KEY, CheckpointMeta, Snapshot, architecture
from reprokit.checkpointer import Checkpointer
from reprokit.datadigest import digest_data
from reprokit.digests import combine_digests, state_digests
from reprokit.errors import ConfigError, DataError, ReprokitError
from reprokit.faults import NO_FAULTS, Faults, flip_bit, kill_self
from reprokit.fingerprints import BatchHasher, grad_digests, loss_bits, stream_digests
from reprokit.ledger import LedgerEntry
from reprokit.overrides import Overrides, read_overrides
from reprokit.rundir import MANIFEST, METRIC_COLUMNS, RunWriter, read_json
from reprokit.runloader import RunLoader, loader_arguments, with_workers
from reprokit.runresume import (
    POSITION_KEY,
    TRACKED_KEY,
    Resumed,
    ResumeRefused,
    RunFinished,
    begin_differences,
    config_mapping,
    open_run_dir,
    record_begin,
    restore_tracked,
    settle,
)
from reprokit.seeding import (
    SOURCES,
    RngState,
    Seeds,
    capture_rng_state,
    derive_seed,
    restore_rng_state,
    seed_everything,
)
from reprokit.stateview import StateView
from reprokit.trace import Tracer

EXIT_STOPPED = 75  # EX_TEMPFAIL: stopped by SIGTERM/SIGINT with a checkpoint; relaunch to resume
_COLUMNS = frozenset(METRIC_COLUMNS) - {"step", "epoch", "kind", "metrics", "digest"}  # e.g. val_loss

__all__ = ["EXIT_STOPPED", "ResumeRefused", "Run", "RunFinished", "RunSummary"]


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


class Run:
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
        overrides: bool = True, grad_digest_every: int | None = None,
    ) -> None:
        started = time.perf_counter()
        env = read_overrides() if overrides else Overrides(progress=read_overrides().progress)
        for name, value, low in (("digest_every", digest_every, 0), ("trace_every", trace_every, 0),
                                 ("checkpoint_every", checkpoint_every, 0), ("keep_last", keep_last, 1),
                                 ("grad_digest_every", grad_digest_every or 0, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"{name} {value!r} must be an int >= {low}")
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
            raise ConfigError(f"steps {steps!r} must be an int >= 1, or None when the length is unknown")
        digest_every = _pick(env.digest_every, digest_every)
        grad_every = digest_every if grad_digest_every is None else grad_digest_every
        trace_every = _pick(env.trace_every, trace_every)
        checkpoint_every = _pick(env.checkpoint_every, checkpoint_every)
        path = env.run_dir or run_dir
        if path is None:
            raise ConfigError("Run needs a run directory: pass Run('runs/NAME', ...) or set REPROKIT_RUN_DIR")
        self.path = Path(path)
        sources = Seeds.parse(_pick(env.seed, seed))
        by_source = {s: v for s in SOURCES if (v := getattr(env, f"seed_{s}")) is not None}
        self.sources = sources.replace(**by_source) if by_source else sources  # which seed feeds what
        self.seed = self.sources.init
        self._num_workers = env.num_workers
        self._progress = _pick(env.progress, progress)
        crash_save = env.crash_during_save
        if crash_save is not None and (not checkpoint_every or crash_save % checkpoint_every):
            raise ConfigError(f"REPROKIT_CRASH_DURING_SAVE={crash_save} is not a checkpoint step: "
                              f"checkpoints are saved every {checkpoint_every or 'no'} steps; pick a "
                              "multiple of checkpoint_every")
        self.seeds = seed_everything(self.seed, deterministic=_pick(env.deterministic, deterministic),
                                     threads=_pick(env.threads, threads))
        if self.sources.per_source:
            self.seeds = dataclasses.replace(self.seeds, sources=self.sources.to_dict())
        settings = {"digest_every": digest_every, "trace_every": trace_every,
                    "grad_digest_every": grad_every,
                    "checkpoint_every": checkpoint_every, "checkpoint_seconds": checkpoint_seconds,
                    "keep_last": keep_last, "async_save": async_save}
        self.config = config
        opened = open_run_dir(self.path, config_mapping(config), self.seeds, settings, env,
                              force=bool(force or env.force), kind=kind, resume=resume,
                              ignore=frozenset(ignore), ledger=ledger)
        self._manifest, self._writer, self._ledger = opened.manifest, opened.writer, opened.ledger
        self._resumed: Resumed | None = opened.resumed
        self._force = bool(force or env.force)
        self._record_ledger = ledger
        self._ignore = frozenset(ignore)
        self.resuming = not opened.fresh  # the directory held a run that this one continues
        self._differences = opened.differences
        self._skipped = opened.skipped
        self._extra_data = digest_data(data) if data is not None else None
        self._described: dict[str, Any] = {}
        self.digest_every, self.trace_every, self.steps = digest_every, trace_every, steps
        self.grad_digest_every = grad_every
        # fingerprints of the next step, when it is a recorded one (reprokit.fingerprints)
        self._fingerprinting = False
        self._batch_hasher: BatchHasher | None = None
        self._streams: dict[str, str] | None = None
        self._grads: dict[str, str] | None = None
        # seconds inside reprokit's hooks: run.step(), the fingerprints of a loader's yield, the
        # gradient digests in the optimizer's step pre-hook
        self.hook_seconds = {"step": 0.0, "yield": 0.0, "update": 0.0}
        self.global_step = self._resumed.meta.step if self._resumed else 0
        self.epoch = self._resumed.meta.epoch if self._resumed else 0
        self.resumed_from = self.global_step if self.resuming else None
        self.digests: dict[str, str] | None = None  # the last step's per-tensor digests, if taken
        # kill points from the environment fire in a run's first process only, so a relaunch gets
        # past them; explicit faults (a harness's) always do
        self._crash_at_step = faults.crash_at_step or (env.crash_at_step if opened.fresh else None)
        self._flip = faults.flip_bit or env.flip_bit  # part of the run: applied whenever it starts at 0
        crash_save = faults.crash_during_save or (crash_save if opened.fresh else None)
        self._checkpointer = Checkpointer(self.path, every=checkpoint_every, seconds=checkpoint_seconds,
                                          keep=keep_last, background=async_save,
                                          crash_during_save=crash_save)
        self._tracked: dict[str, Any] = {}
        self._modules: dict[str, nn.Module] | None = None  # the tracked modules, once the run began
        self._view: StateView | None = None  # their state's tensors, for the per-step digests
        self._optimizer: torch.optim.Optimizer | None = None
        self._loaders: list[RunLoader] = []
        tracer = (Tracer(self.path, every=trace_every),) if trace_every else ()
        self._callbacks: tuple[Callback, ...] = (*tracer, *callbacks)
        self._state: Any = None  # the TrainState the callbacks see
        self._begun = self._pending = self._in_epochs = self._init_pending = False
        self._init_digests: dict[str, str] | None = None
        self._init_streams: dict[str, str] | None = None
        self._done = False
        self._stop: int | None = None
        self._last_logged: dict[str, float] = {}
        self._started = started
        self._latency: float | None = None
        self._bar: Any = None
        self._handlers = _install_signals(self._on_signal)
        atexit.register(self._at_exit)

    # --- what a checkpoint holds -------------------------------------------------------------
    def track(self, **objects: Any) -> None:
        """Name the objects a checkpoint holds: anything with ``state_dict``/``load_state_dict``."""
        if self._begun:
            raise ReprokitError("run.track() after the run began; track every object before the first "
                                "run.epochs()/run.step()")
        for name, obj in objects.items():
            if not all(callable(getattr(obj, m, None)) for m in ("state_dict", "load_state_dict")):
                raise ReprokitError(f"run.track({name}=...): a {type(obj).__name__} has no state_dict() and "
                                    "load_state_dict(), so a checkpoint cannot hold it; track the object "
                                    "that owns its state")
            if name in self._tracked:
                raise ReprokitError(f"run.track: {name!r} is tracked already; give each object its own name")
            self._tracked[name] = obj
            if isinstance(obj, torch.optim.Optimizer):
                obj.register_step_pre_hook(self._before_update)

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
                if self._stop is not None and self.epoch < n:
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
        step = self.global_step
        if step == self._crash_at_step:
            kill_self()
        row: dict[str, Any] = {"step": step, "epoch": self.epoch, "kind": "step", "lr": self._lr(),
                               "loss": _number("loss", loss) if loss is not None else math.nan}
        self._put_metrics(row, metrics)
        self.digests = None
        if self._fingerprinting:
            self.digests = state_digests(self._digest_view().tensors())
            row["digest"] = combine_digests(self.digests)
        self._files.step(_csv_row(row), self.digests)
        if self._fingerprinting:
            self._write_fingerprint(step, row["loss"] if loss is not None else None)
        self._state.step, self._state.digests = step, self.digests
        for cb in self._callbacks:
            cb.on_step_end(self._state)
        if step != self.steps and self._checkpointer.due(step):
            self._checkpointer.save(self._snapshot)
        self._expect_step()
        if self._bar is None:
            self._bar = _progress_bar(self._progress, self.steps, step - 1, self.path.name)
        self._bar.update()
        if self._stop is not None:
            self._stop_now()

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
        self._put_metrics(row, metrics)
        self._last_logged = {k: _number(k, v) for k, v in metrics.items()}
        self._files.step(_csv_row(row), None)

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
        values = {k: _number(k, v) for k, v in metrics.items()} or self._last_logged
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
            **(result or {}),
        })
        if self._ledger is not None:
            self._ledger.ledger.finish(self._ledger.run_id, final_digest, metric if name else None)
        self._close("finished")
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

    def __enter__(self) -> Run:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 tb: TracebackType | None) -> None:
        if error is not None:
            self._close("crashed")

    # --- internals ---------------------------------------------------------------------------
    def begin(self) -> None:
        """Start the run now: settle a relaunch's checkpoint (``global_step`` is then where it goes
        on from) and complete the manifest. It starts by itself at the first ``epochs()``, loader
        ``iter()``, ``step()`` or ``log()``."""
        self._begin()

    def _begin(self) -> None:
        if self._begun:
            return
        if not self._tracked:
            raise ReprokitError("nothing is tracked: call run.track(model=..., optimizer=...) before the "
                                "first run.epochs()/run.step(), so checkpoints can hold them")
        modules = list(self._tracked_modules().values())
        self._begun = True
        sources = {f"loader{ld.index}": ld.digest for ld in self._loaders if ld.digest is not None}
        if self._extra_data is not None:
            sources["data"] = self._extra_data
        self._state = TrainState(self.config, modules[0], self._first_optimizer(), None, self.steps or 0)
        if self.resuming:
            self._differences += begin_differences(self.path, self._manifest, sources, self._described,
                                                   force=self._force)
            self._resumed, self._writer = settle(
                self.path, self._resumed, architecture(self._module_state()), ignore=self._ignore,
                differences=self._differences, skipped=self._skipped, threads=self.seeds.threads)
        if self._resumed is None:  # a new run, or a relaunch with no checkpoint that fits: step 0
            self._begin_at_zero(sources)
            return
        self._resumed.check_names(list(self._tracked))
        self.global_step, self.epoch = self._resumed.meta.step, self._resumed.meta.epoch
        self.resumed_from = self.global_step
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
            self._manifest = record_begin(self._writer, self._manifest, sources,
                                          {n: type(o).__name__ for n, o in self._tracked.items()},
                                          self._described)
        if not self.resuming and self._record_ledger:
            self._ledger = LedgerEntry.open(self.path, self._manifest)
        # the step-0 row: θ_0's digests now, written with the initial model's metrics if a
        # run.log() comes before the first step
        self._init_pending = True
        self._init_digests = state_digests(self._module_state()) if self.digest_every else None
        if self.sources.per_source:  # dropout's stream, whatever initialisation consumed
            torch.manual_seed(derive_seed(self.sources.dropout, "dropout"))
        self._init_streams = stream_digests() if self.digest_every else None
        self._expect_step()
        for cb in self._callbacks:
            cb.on_train_start(self._state)

    def _write_init(self, metrics: Mapping[str, Any]) -> None:
        self._init_pending = False
        row: dict[str, Any] = {"step": 0, "epoch": 0, "kind": "init", "lr": self._lr()}
        self._put_metrics(row, metrics)
        self.digests = self._init_digests
        if self.digests is not None:
            row["digest"] = combine_digests(self.digests)
        self._files.step(_csv_row(row), self.digests)
        if self._init_streams is not None:
            self._files.fingerprint({"step": 0, **self._init_streams}, None)

    # --- fingerprints (reprokit.fingerprints) -------------------------------------------------
    def _expect_step(self) -> None:
        """After a step (or the start): is the next one recorded? Then gather what goes into it."""
        upcoming = self.global_step + 1
        self._fingerprinting = bool(self.digest_every) and upcoming % self.digest_every == 0
        self._batch_hasher, self._streams, self._grads = None, None, None
        if self._fingerprinting and not self._loaders:  # no loader yield will say: now, then
            self._streams = stream_digests()

    def _yielded(self, loader: int, indices: list[int], batch: Any) -> None:
        """A run.loader batch on its way to the next (recorded) step."""
        began = time.perf_counter()
        if self._batch_hasher is None:
            self._batch_hasher = BatchHasher()
        self._batch_hasher.add(loader, indices, batch)
        self._streams = stream_digests()  # the last yield before the step wins: the forward is next
        self.hook_seconds["yield"] += time.perf_counter() - began

    def _grads_due(self) -> bool:
        every = self.grad_digest_every
        return self._fingerprinting and bool(every) and (self.global_step + 1) % every == 0

    def _write_fingerprint(self, step: int, loss: float | None) -> None:
        if self._grads is None and self._grads_due():  # no tracked optimizer's pre-hook took them
            self._grads = grad_digests(self._digest_view().parameters())
        indices, batch = self._batch_hasher.digests() if self._batch_hasher is not None else ("", "")
        streams = self._streams if self._streams is not None else stream_digests()
        grads = self._grads
        self._files.fingerprint({
            "step": step, "indices": indices, "batch": batch, **streams,
            "loss": loss_bits(loss) if loss is not None else "",
            "grads": combine_digests(grads) if grads else "",
        }, grads)

    def _put_metrics(self, row: dict[str, Any], metrics: Mapping[str, Any]) -> None:
        """The columns metrics.csv has (val_loss, ...) go there, the rest into its ``metrics`` JSON."""
        own = {}
        for key, value in metrics.items():
            if key in _COLUMNS:
                row[key] = _number(key, value)
            else:
                own[key] = _number(key, value)
        if own:
            row["metrics"] = own

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
        saved = self._resumed.state
        restore_tracked(self._tracked, saved[MODEL_KEY], saved[TRACKED_KEY], saved[POSITION_KEY]["modules"],
                        self._resumed.meta, self.path)
        restore_rng_state(RngState.from_dict(saved[RNG_KEY]))
        for obj in self._tracked.values():
            if isinstance(obj, torch.optim.Optimizer) and self.global_step:
                # what the uninterrupted process has: an LR scheduler then does not warn that it
                # stepped before the optimizer (torch/optim/lr_scheduler.py)
                obj._opt_called = True  # type: ignore[attr-defined]
        states = saved.get(CALLBACKS_KEY, {})
        self._state.step = self.global_step
        for key, cb in zip(callback_keys(self._callbacks), self._callbacks, strict=True):
            cb.load_state_dict(states.get(key))
            cb.on_train_start(self._state)
        self._pending = False
        if self._fingerprinting and not self._loaders:  # the streams as restored go into the next step
            self._streams = stream_digests()

    @property
    def _files(self) -> RunWriter:
        """The run directory's writer (a relaunch opens it when it begins, at its checkpoint)."""
        assert self._writer is not None, "the run has not begun"
        return self._writer

    def _module_state(self) -> dict[str, torch.Tensor]:
        modules = self._tracked_modules()
        if len(modules) == 1:
            return next(iter(modules.values())).state_dict()
        return {f"{name}.{k}": v for name, m in modules.items() for k, v in m.state_dict().items()}

    def _digest_view(self) -> StateView:
        if self._view is None:
            self._view = StateView(self._tracked_modules())
        return self._view

    def _tracked_modules(self) -> dict[str, nn.Module]:
        if self._modules is not None:  # the tracked set is fixed once the run began: found once
            return self._modules
        modules = {n: o for n, o in self._tracked.items() if isinstance(o, nn.Module)}
        if not modules:
            raise ReprokitError("no nn.Module is tracked: pass the model too, run.track(model=model, ...)")
        if self._begun:
            self._modules = modules
            optimizers = (o for o in self._tracked.values() if isinstance(o, torch.optim.Optimizer))
            self._optimizer = next(optimizers, None)
        return modules

    def _first_optimizer(self) -> torch.optim.Optimizer | None:
        if self._modules is None:
            return next((o for o in self._tracked.values() if isinstance(o, torch.optim.Optimizer)), None)
        return self._optimizer

    def _lr(self) -> float:
        opt = self._first_optimizer()
        return float(opt.param_groups[0]["lr"]) if opt is not None and opt.param_groups else math.nan

    def _snapshot(self) -> Snapshot:
        modules = self._tracked_modules()
        active = [ld for ld in self._loaders if ld.active]
        keys = callback_keys(self._callbacks)
        state: dict[str, Any] = {
            MODEL_KEY: self._module_state(),
            TRACKED_KEY: {n: o.state_dict() for n, o in self._tracked.items()
                          if not isinstance(o, nn.Module)},
            RNG_KEY: capture_rng_state().to_dict(),
            CALLBACKS_KEY: dict(zip(keys, [cb.state_dict() for cb in self._callbacks], strict=True)),
            POSITION_KEY: {"loaders": {str(ld.index): ld.state() for ld in self._loaders},
                           "modules": list(modules), "tracked": list(self._tracked)},
        }
        meta = CheckpointMeta(
            step=self.global_step, epoch=self.epoch, batch=active[0].batch if active else 0,
            config=self._manifest["config"], data_digest=str(self._manifest["data"]["digest"]),
            code_version=str(self._manifest["fingerprint"]), manifest_digest=self._files.manifest_digest(),
            run_files=self._files.sync(), created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        )
        unchanged = [*(p for m in modules.values() for p in m.parameters()),
                     *(t for o in self._tracked.values() if isinstance(o, torch.optim.Optimizer)
                       for s in o.state.values() for t in s.values() if isinstance(t, torch.Tensor))]
        return Snapshot(meta, state, update_only=frozenset(t.data_ptr() for t in unchanged))

    def _before_update(self, *_: Any) -> None:
        self._checkpointer.before_update()  # an async save may still be copying the weights
        if self._grads is None and self._begun and self._grads_due():  # the gradients, complete
            began = time.perf_counter()
            self._grads = grad_digests(self._digest_view().parameters())
            self.hook_seconds["update"] += time.perf_counter() - began

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self._stop is not None or self._done:  # a second Ctrl-C: the usual KeyboardInterrupt
            previous = self._handlers.get(signum)
            if callable(previous):
                previous(signum, frame)
            raise KeyboardInterrupt
        self._stop = signum
        print(f"reprokit: {signal.Signals(signum).name} received; stopping after this step with a "
              "checkpoint", file=sys.stderr, flush=True)

    def _stop_now(self) -> None:
        """Save a verified checkpoint of where the run is, then exit with EXIT_STOPPED."""
        assert self._stop is not None
        name = signal.Signals(self._stop).name
        self._checkpointer.wait()
        self._checkpointer.save(self._snapshot)
        self._checkpointer.wait()
        self._close("crashed")
        print(f"reprokit: stopped by {name} at step {self.global_step} with a checkpoint; run the same "
              f"command again to resume (exit status {EXIT_STOPPED})", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_STOPPED)

    def _close(self, status: str) -> None:
        if self._done:
            return
        self._done = True
        if self._bar is not None:
            self._bar.close()
        with contextlib.suppress(Exception):  # a failing save must not hide the error that stopped the run
            self._checkpointer.wait()
        if self._writer is not None:
            self._writer.close()
        if self._view is not None:
            self._view.close()
        if status != "finished" and self._ledger is not None:
            self._ledger.ledger.mark(self._ledger.run_id, status)
        for signum, handler in self._handlers.items():
            signal.signal(signum, handler)
        atexit.unregister(self._at_exit)

    def _at_exit(self) -> None:
        """A script that raised (or returned without finish()) leaves the run crashed, resumable."""
        with contextlib.suppress(Exception):  # exiting anyway; the run directory is consistent
            self._close("crashed")


def _pick(override: Any, value: Any) -> Any:
    return override if override is not None else value


def _install_signals(handler: Any) -> dict[int, Any]:
    if threading.current_thread() is not threading.main_thread():
        return {}
    previous: dict[int, Any] = {}
    for signum in (signal.SIGTERM, signal.SIGINT):
        previous[signum] = signal.signal(signum, handler)
    return previous


def _number(name: str, value: Any) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ReprokitError(f"metric {name!r} is a tensor of {value.numel()} elements; pass one number")
        return float(value.item())
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ReprokitError(f"metric {name!r} = {value!r} is not a number; pass a float or a "
                            "one-element tensor") from None


def _csv_row(row: dict[str, Any]) -> dict[str, Any]:
    if "metrics" in row:
        row = {**row, "metrics": json.dumps(row["metrics"], sort_keys=False)}
    return row


def _progress_bar(progress: bool | None, total: int | None, initial: int, name: str) -> Any:
    from tqdm.auto import tqdm  # tqdm.auto looks for ipywidgets: only once a bar is wanted

    return tqdm(total=total, initial=initial, disable=progress is False, leave=False, desc=name)
