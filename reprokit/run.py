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
the current step with a verified checkpoint, exit status :data:`EXIT_STOPPED`.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import math
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from reprokit.callbacks import TrainState
from reprokit.checkpoint import CALLBACKS_KEY, MODEL_KEY, RNG_KEY, CheckpointMeta, Snapshot
from reprokit.checkpointer import Checkpointer
from reprokit.datadigest import digest_data
from reprokit.digests import combine_digests, state_digests
from reprokit.errors import ConfigError, DataError, ReprokitError
from reprokit.faults import kill_self
from reprokit.overrides import read_overrides
from reprokit.runloader import RunLoader, loader_arguments, with_workers
from reprokit.runresume import (
    POSITION_KEY,
    TRACKED_KEY,
    Resumed,
    ResumeRefused,
    RunFinished,
    config_mapping,
    open_run_dir,
    record_begin,
    restore_tracked,
)
from reprokit.seeding import RngState, capture_rng_state, restore_rng_state, seed_everything
from reprokit.trace import Tracer

EXIT_STOPPED = 75  # EX_TEMPFAIL: stopped by SIGTERM/SIGINT with a checkpoint; relaunch to resume
_TRACER_KEY = "Tracer:0"

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


class Run:
    """A run of the user's own loop. See the module docstring; arguments as in DESIGN.md.

    Args:
        run_dir: the run directory (``REPROKIT_RUN_DIR`` wins, so a harness can redirect a script).
        seed: seeds python, numpy, torch (+CUDA), the data order and per-sample augmentation.
        config: the user's settings (a mapping, dataclass or ``argparse.Namespace``), recorded.
        threads: intra-op threads, pinned (they change the bits on CPU); ``None`` leaves torch's.
        deterministic: torch's deterministic algorithms and the cuDNN/cuBLAS knobs.
        digest_every: per-tensor digests every N steps (0 = off); trace_every: the tracer.
        checkpoint_every / checkpoint_seconds / keep_last / async_save: checkpoints.
        data: extra data to digest into the manifest (tensors, arrays, datasets, files).
        force: resume even if the recipe changed (recorded in the manifest).
        progress: a progress bar; ``None`` = on unless ``REPROKIT_PROGRESS=0``.
    """

    def __init__(
        self, run_dir: str | Path | None = None, *, seed: int = 0, config: Any = None,
        threads: int | None = 1, deterministic: bool = True, digest_every: int = 1, trace_every: int = 0,
        checkpoint_every: int = 0, checkpoint_seconds: float = 0.0, keep_last: int = 3,
        async_save: bool = False, data: Any = None, force: bool = False, progress: bool | None = None,
    ) -> None:
        started = time.perf_counter()
        env = read_overrides()
        for name, value, low in (("digest_every", digest_every, 0), ("trace_every", trace_every, 0),
                                 ("checkpoint_every", checkpoint_every, 0), ("keep_last", keep_last, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"{name} {value!r} must be an int >= {low}")
        digest_every = env.digest_every if env.digest_every is not None else digest_every
        trace_every = env.trace_every if env.trace_every is not None else trace_every
        checkpoint_every = env.checkpoint_every if env.checkpoint_every is not None else checkpoint_every
        path = env.run_dir or run_dir
        if path is None:
            raise ConfigError("Run needs a run directory: pass Run('runs/NAME', ...) or set REPROKIT_RUN_DIR")
        self.path = Path(path)
        self.seed = env.seed if env.seed is not None else seed
        threads = env.threads if env.threads is not None else threads
        deterministic = env.deterministic if env.deterministic is not None else deterministic
        self._num_workers = env.num_workers
        self._progress = env.progress if env.progress is not None else progress
        crash_save = env.crash_during_save
        if crash_save is not None and (not checkpoint_every or crash_save % checkpoint_every):
            raise ConfigError(f"REPROKIT_CRASH_DURING_SAVE={crash_save} is not a checkpoint step: "
                              f"checkpoints are saved every {checkpoint_every or 'no'} steps; pick a "
                              "multiple of checkpoint_every")
        self.seeds = seed_everything(self.seed, deterministic=deterministic, threads=threads)
        settings = {"digest_every": digest_every, "trace_every": trace_every,
                    "checkpoint_every": checkpoint_every, "checkpoint_seconds": checkpoint_seconds,
                    "keep_last": keep_last, "async_save": async_save}
        opened = open_run_dir(self.path, config_mapping(config), self.seeds, settings, env,
                              force=bool(force or env.force))
        self._manifest, self._writer, self._ledger = opened.manifest, opened.writer, opened.ledger
        self._resumed: Resumed | None = opened.resumed
        self._fresh = opened.fresh
        self._extra_data = digest_data(data) if data is not None else None
        self.digest_every, self.trace_every = digest_every, trace_every
        self.global_step = self._resumed.meta.step if self._resumed else 0
        self.epoch = self._resumed.meta.epoch if self._resumed else 0
        self.resumed_from = self.global_step if self._resumed else None
        # kill points fire in a run's first process only, so a relaunch gets past them
        self._crash_at_step = env.crash_at_step if self._fresh else None
        crash_save = crash_save if self._fresh else None
        self._checkpointer = Checkpointer(self.path, every=checkpoint_every, seconds=checkpoint_seconds,
                                          keep=keep_last, background=async_save,
                                          crash_during_save=crash_save)
        self._tracked: dict[str, Any] = {}
        self._loaders: list[RunLoader] = []
        self._tracer: Tracer | None = None
        self._state: Any = None  # the TrainState the tracer sees
        self._begun = self._pending = self._in_epochs = False
        self._done = False
        self._stop: int | None = None
        self._stepped = 0  # optimizer steps since the last run.step()
        self._last_logged: dict[str, float] = {}
        self._started, self._setup_seconds = started, time.perf_counter() - started
        self._bar: Any = None
        self._total: int | None = None
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
                obj.register_step_post_hook(self._after_update)

    def loader(self, source: Any, *, digest: bool = True, **kwargs: Any) -> RunLoader:
        """A loader whose order and per-sample randomness are a function of (seed, epoch, index),
        from a dataset and DataLoader arguments or from an existing DataLoader (taken over).
        ``digest=False`` leaves the dataset out of the manifest (digest what it reads with ``data=``)."""
        if self._begun:
            raise ReprokitError("run.loader() after the run began; create loaders before run.epochs()")
        dataset, batch_size, shuffle, drop_last, options = loader_arguments(source, kwargs)
        try:
            content = digest_data(dataset) if digest else "not digested"
        except DataError as e:
            raise DataError(f"{e}; or pass run.loader(..., digest=False) and Run(data=...) what it "
                            "reads") from e
        loader = RunLoader(self, len(self._loaders), dataset, batch_size=batch_size, shuffle=shuffle,
                           drop_last=drop_last, options=with_workers(options, self._num_workers),
                           digest=content)
        self._loaders.append(loader)
        return loader

    # --- the loop ----------------------------------------------------------------------------
    def epochs(self, n: int, *, start: int = 0) -> Iterator[int]:
        """Epochs ``start .. start+n-1``; a resumed run starts at its saved epoch."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ConfigError(f"run.epochs({n!r}): pass the number of epochs, an int >= 0")
        self._begin()
        if self._loaders:
            self._total = n * len(self._loaders[0])
        self._in_epochs = True
        try:
            while self.epoch < n:
                if self._pending and not self._resumed_mid_epoch():
                    self._restore_now()
                yield self.epoch + start
                self.epoch += 1
                if self._stop is not None and self.epoch < n:
                    self._stop_now()
        finally:
            self._in_epochs = False

    def step(self, loss: Any = None, **metrics: Any) -> None:
        """After each optimizer step: a metrics row, digests, trace, checkpoint when due, kill points."""
        if not self._begun:
            self._begin()
        if self._pending:
            raise ReprokitError("run.step() came before the resumed epoch's loader was iterated; iterate "
                                "the run.loader inside run.epochs() and call run.step() after each update")
        self.global_step += 1
        step = self.global_step
        if step == self._crash_at_step:
            kill_self()
        row: dict[str, Any] = {"step": step, "epoch": self.epoch, "kind": "step", "lr": self._lr(),
                               "loss": _number("loss", loss) if loss is not None else math.nan}
        if metrics:
            row["metrics"] = {k: _number(k, v) for k, v in metrics.items()}
        digests = None
        if self.digest_every and step % self.digest_every == 0:
            digests = state_digests(self._module_state())
            row["digest"] = combine_digests(digests)
        self._writer.step(_csv_row(row), digests)
        if self._tracer is not None:
            self._state.step, self._state.digests = step, digests
            self._tracer.on_step_end(self._state)
        if self._checkpointer.due(step):
            self._checkpointer.save(self._snapshot)
        if self._bar is None:
            self._bar = _progress_bar(self._progress, self._total, self.global_step - 1, self.path.name)
        self._bar.update()
        self._stepped = 0
        if self._stop is not None:
            self._stop_now()

    def log(self, **metrics: Any) -> None:
        """A row of metrics between steps (e.g. an epoch's validation accuracy)."""
        values = {k: _number(k, v) for k, v in metrics.items()}
        self._last_logged = values
        self._writer.step(_csv_row({"step": self.global_step, "epoch": self.epoch, "kind": "log",
                                    "metrics": values}), None)

    def finish(self, **metrics: Any) -> RunSummary:
        """Write the final model (model.pt, model.safetensors), result.json and the ledger row."""
        if not self._begun:
            self._begin()
        if self._pending:  # resumed where nothing was left to iterate
            self._restore_now(in_loop=False)
        self._checkpointer.finish()
        final = {k: v.detach().clone() for k, v in self._module_state().items()}
        final_digest = combine_digests(state_digests(final))
        values = {k: _number(k, v) for k, v in metrics.items()} or self._last_logged
        name = next(iter(values), None)
        metric = values[name] if name is not None else math.nan
        summary = RunSummary(self.path, final_digest, name, metric, self.global_step,
                             time.perf_counter() - self._started, self.resumed_from)
        if self._tracer is not None:
            self._tracer.on_train_end(self._state)
        self._writer.finish(final, {
            "final_digest": final_digest, "final_metric": metric, "metric_name": name,
            "metrics": values, "steps": self.global_step, "seconds": round(summary.seconds, 3),
            "data_digest": self._manifest["data"]["digest"], "resumed_from_step": self.resumed_from,
        })
        if self._ledger is not None:
            self._ledger.ledger.finish(self._ledger.run_id, final_digest, metric if name else None)
        self._close("finished")
        return summary

    # --- internals ---------------------------------------------------------------------------
    def _begin(self) -> None:
        if self._begun:
            return
        if not self._tracked:
            raise ReprokitError("nothing is tracked: call run.track(model=..., optimizer=...) before the "
                                "first run.epochs()/run.step(), so checkpoints can hold them")
        self._begun = True
        sources = {f"loader{ld.index}": ld.digest for ld in self._loaders}
        if self._extra_data is not None:
            sources["data"] = self._extra_data
        self._tracked_modules()  # refuses a tracked set without a module now, not at the first digest
        modules = [o for o in self._tracked.values() if isinstance(o, nn.Module)]
        if self.trace_every:
            self._tracer = Tracer(self.path, every=self.trace_every)
        self._state = TrainState(self._manifest["config"], modules[0], self._first_optimizer(), None, 0)
        if self._resumed is None:
            self._manifest = self._writer_begin(sources)
            initial = state_digests(self._module_state())  # step 0: the initial parameters
            self._writer.step(_csv_row({"step": 0, "epoch": 0, "kind": "init"}), initial)
            if self._tracer is not None:
                self._tracer.on_train_start(self._state)
            return
        self._resumed.check_begin(self, sources)
        self._pending = True
        for ld in self._loaders:
            saved = self._resumed.state[POSITION_KEY]["loaders"].get(str(ld.index))
            if saved is not None:
                ld.load_state(saved)

    def _writer_begin(self, sources: dict[str, str]) -> dict[str, Any]:
        return record_begin(self._writer, self._manifest, sources,
                            {n: type(o).__name__ for n, o in self._tracked.items()})

    def _resumed_mid_epoch(self) -> bool:
        assert self._resumed is not None
        return any(s["active"] for s in self._resumed.state[POSITION_KEY]["loaders"].values())

    def _restore_now(self, *, in_loop: bool = True) -> None:
        """Put back the tracked objects, every RNG and the tracer: called when the resumed epoch's
        loader iterator exists (or at the epoch's start when no loader was mid-pass)."""
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
        if self._tracer is not None:
            self._tracer.load_state_dict(saved.get(CALLBACKS_KEY, {}).get(_TRACER_KEY))
            self._state.step = self.global_step
            self._tracer.on_train_start(self._state)
        self._pending = False

    def _module_state(self) -> dict[str, torch.Tensor]:
        modules = self._tracked_modules()
        if len(modules) == 1:
            return next(iter(modules.values())).state_dict()
        return {f"{name}.{k}": v for name, m in modules.items() for k, v in m.state_dict().items()}

    def _tracked_modules(self) -> dict[str, nn.Module]:
        modules = {n: o for n, o in self._tracked.items() if isinstance(o, nn.Module)}
        if not modules:
            raise ReprokitError("no nn.Module is tracked: pass the model too, run.track(model=model, ...)")
        return modules

    def _first_optimizer(self) -> torch.optim.Optimizer | None:
        return next((o for o in self._tracked.values() if isinstance(o, torch.optim.Optimizer)), None)

    def _lr(self) -> float:
        opt = self._first_optimizer()
        return float(opt.param_groups[0]["lr"]) if opt is not None and opt.param_groups else math.nan

    def _snapshot(self) -> Snapshot:
        modules = self._tracked_modules()
        active = [ld for ld in self._loaders if ld.active]
        state: dict[str, Any] = {
            MODEL_KEY: self._module_state(),
            TRACKED_KEY: {n: o.state_dict() for n, o in self._tracked.items()
                          if not isinstance(o, nn.Module)},
            RNG_KEY: capture_rng_state().to_dict(),
            CALLBACKS_KEY: {_TRACER_KEY: self._tracer.state_dict()} if self._tracer is not None else {},
            POSITION_KEY: {"loaders": {str(ld.index): ld.state() for ld in self._loaders},
                           "modules": list(modules), "tracked": list(self._tracked)},
        }
        meta = CheckpointMeta(
            step=self.global_step, epoch=self.epoch, batch=active[0].batch if active else 0,
            config=self._manifest["config"], data_digest=str(self._manifest["data"]["digest"]),
            code_version=str(self._manifest["fingerprint"]), manifest_digest=self._writer.manifest_digest(),
            run_files=self._writer.sync(), created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        )
        unchanged = [*(p for m in modules.values() for p in m.parameters()),
                     *(t for o in self._tracked.values() if isinstance(o, torch.optim.Optimizer)
                       for s in o.state.values() for t in s.values() if isinstance(t, torch.Tensor))]
        return Snapshot(meta, state, update_only=frozenset(t.data_ptr() for t in unchanged))

    def _before_update(self, *_: Any) -> None:
        self._checkpointer.before_update()  # an async save may still be copying the weights

    def _after_update(self, *_: Any) -> None:
        self._stepped += 1

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
        self._writer.close()
        if status != "finished" and self._ledger is not None:
            self._ledger.ledger.mark(self._ledger.run_id, status)
        for signum, handler in self._handlers.items():
            signal.signal(signum, handler)
        atexit.unregister(self._at_exit)

    def _at_exit(self) -> None:
        """A script that raised (or returned without finish()) leaves the run crashed, resumable."""
        with contextlib.suppress(Exception):  # exiting anyway; the run directory is consistent
            self._close("crashed")


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
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=progress is False, leave=False, desc=name)
