"""Training: ``train(config) -> RunResult``, one straight loop with callbacks.

build (seed, data, model, optimizer, loader) -> loop over steps -> evaluate -> write the result.
Per-step work is kept small: a loss ``.item()``, a CSV row and, every ``digest_every`` steps,
one xxh3 digest per tensor. ``reprokit.resumer`` rebuilds the same session from a checkpoint and
re-enters the same loop.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from reprokit.callbacks import Callback, TrainState, callback_keys
from reprokit.checkpoint import (
    CALLBACKS_KEY,
    MODEL_KEY,
    OPTIMIZER_KEY,
    RNG_KEY,
    SCHEDULER_KEY,
    CheckpointMeta,
    Snapshot,
)
from reprokit.checkpointer import Checkpointer, update_only
from reprokit.config import TrainConfig
from reprokit.data import DatasetBundle, EpochBatchSampler, batches_per_epoch, load_dataset, make_loader
from reprokit.digests import combine_digests, source_digest, state_digests
from reprokit.errors import ConfigError
from reprokit.factories import code_version, factory_digests
from reprokit.faults import NO_FAULTS, Faults, kill_self
from reprokit.finetuning import finetune_callbacks, prepare
from reprokit.ledger import LedgerEntry
from reprokit.models import build_model, build_optimizer, build_scheduler
from reprokit.provenance import build_manifest, code_state, save_code_diff
from reprokit.rundir import RunWriter
from reprokit.seeding import SeedRecord, capture_rng_state, seed_everything
from reprokit.trace import Tracer

EVAL_BATCH = 512  # validation batch size: evaluation has no gradient, so a large batch is cheap


@dataclass(frozen=True)
class ResumeInfo:
    """How a resumed run got going again."""

    checkpoint: str | None  # the checkpoint it continued from; None = restarted from step 0
    from_step: int
    skipped: tuple[tuple[str, str], ...]  # (checkpoint, why it was not used), newest first
    latency_seconds: float  # from the resume call to the first step: verify, load, restore
    differences: tuple[str, ...]  # environment/config changes accepted with force
    forced: bool


@dataclass
class RunResult:
    """Everything a finished run produced."""

    config: TrainConfig
    seed_record: SeedRecord
    data_digest: str
    metric_name: str
    final_metric: float
    final_val_loss: float
    final_digest: str
    steps: int
    seconds: float
    rows: list[dict[str, Any]] = field(repr=False)
    tensor_digests: list[tuple[int, dict[str, str]]] = field(repr=False)
    final_state: dict[str, torch.Tensor] = field(repr=False)
    run_dir: Path | None = None
    resume: ResumeInfo | None = None
    checkpoints: tuple[int, ...] = ()  # steps at which a checkpoint was committed in this process
    save_blocked_seconds: tuple[float, ...] = ()  # how long each save held up training

    @property
    def losses(self) -> list[float]:
        return [r["loss"] for r in self.rows]

    @property
    def metrics(self) -> pd.DataFrame:
        """One row per step: step, epoch, loss, lr, digest, val_loss, val_metric."""
        return pd.DataFrame(self.rows)

    def summary(self) -> dict[str, Any]:
        """The content of result.json."""
        return {
            "final_digest": self.final_digest,
            "final_metric": self.final_metric,
            "metric_name": self.metric_name,
            "final_val_loss": self.final_val_loss,
            "steps": self.steps,
            "seconds": round(self.seconds, 3),
            "data_digest": self.data_digest,
            "resumed_from_step": self.resume.from_step if self.resume else None,
        }


@dataclass
class Session:
    """The built objects of one run: what a checkpoint saves and a resume rebuilds."""

    config: TrainConfig
    seeds: SeedRecord
    data: DatasetBundle
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler | None
    loader: DataLoader[tuple[torch.Tensor, torch.Tensor]]
    sampler: EpochBatchSampler
    total_steps: int
    parent: dict[str, Any] | None = None  # the manifest's lineage entry of a fine-tune (reprokit.finetuning)

    def generators(self) -> dict[str, torch.Generator]:
        """The torch.Generators in use besides the global one."""
        gen = self.loader.generator
        return {"loader": gen} if gen is not None else {}


def build_session(config: TrainConfig) -> Session:
    """Seed, load the data and build model, optimizer, scheduler and loader, in a fixed order
    (the model's initial weights come from the global RNG right after seeding; a fine-tune then
    loads its parent over all but the head)."""
    seeds = seed_everything(config.seed, deterministic=config.deterministic, threads=config.threads)
    data = load_dataset(config.dataset, split_seed=config.split_seed, val_fraction=config.val_fraction,
                        train_limit=config.train_limit)
    per_epoch = batches_per_epoch(len(data.x_train), config.batch_size)
    total = config.steps if config.steps is not None else config.epochs * per_epoch
    model = build_model(config.model, data.input_shape, data.num_outputs)
    params, parent = prepare(config, model, total)
    optimizer = build_optimizer(config.optimizer, params, lr=config.lr, momentum=config.momentum,
                                weight_decay=config.weight_decay)
    loader = make_loader(
        data.x_train, data.y_train,
        batch_size=config.batch_size, seed=config.seed, num_workers=config.num_workers,
    )
    sampler = loader.sampler
    assert isinstance(sampler, EpochBatchSampler)
    scheduler = build_scheduler(config.lr_schedule, optimizer, total)
    return Session(config, seeds, data, model, optimizer, scheduler, loader, sampler, total, parent)


def train(
    config: TrainConfig,
    run_dir: str | Path | None = None,
    *,
    callbacks: tuple[Callback, ...] = (),
    progress: bool | None = None,
    faults: Faults = NO_FAULTS,
) -> RunResult:
    """Train ``config`` from scratch; with ``run_dir``, write the run directory as it goes.

    Args:
        config: the run.
        run_dir: a new or empty directory for manifest, metrics, digests, checkpoints, model, result.
        callbacks: hooks called at start, after every step and at the end.
        progress: show a progress bar; ``None`` shows one unless ``REPROKIT_PROGRESS=0``.
        faults: kill points for fault-injection experiments (needs ``run_dir``).
    """
    started = time.perf_counter()
    session = build_session(config)
    faults.check(config.checkpoint_every, session.total_steps)
    callbacks = (*callbacks, *config_callbacks(config, run_dir))
    writer, entry = None, None
    if run_dir is not None:
        code = code_state()  # one look at the checkout: the manifest and code.diff agree
        manifest = build_manifest(config, session.seeds, session.data, code=code, parent=session.parent,
                                  factories=factory_digests(config.model, config.dataset))
        writer = RunWriter(run_dir, manifest)
        save_code_diff(writer.path, code)
        entry = LedgerEntry.open(writer.path, manifest)
    state = TrainState(config, session.model, session.optimizer, session.data, session.total_steps)
    return run_loop(session, state, writer, callbacks=callbacks, progress=progress, faults=faults,
                    started=started, ledger=entry)


def run_loop(
    session: Session,
    state: TrainState,
    writer: RunWriter | None,
    *,
    callbacks: tuple[Callback, ...] = (),
    progress: bool | None = None,
    faults: Faults = NO_FAULTS,
    started: float,
    rows: list[dict[str, Any]] | None = None,
    history: list[tuple[int, dict[str, str]]] | None = None,
    resume: ResumeInfo | None = None,
    ledger: LedgerEntry | None = None,
) -> RunResult:
    """Train from ``state`` (step 0, or where a checkpoint left off) to the last step.

    ``rows`` and ``history`` hold what earlier processes recorded before ``state.step``.
    """
    config, model, optimizer, data = session.config, session.model, session.optimizer, session.data
    scheduler, loader, sampler = session.scheduler, session.loader, session.sampler
    total = session.total_steps
    loss_fn = F.cross_entropy if data.task == "classification" else F.mse_loss
    rows = [] if rows is None else rows
    history = [] if history is None else history
    checkpointer = _checkpointer(config, writer, faults)
    manifest_digest = writer.manifest_digest() if writer is not None else ""
    keys = callback_keys(callbacks)

    def record(row: dict[str, Any]) -> None:
        every = config.digest_every
        digests = state_digests(model) if every and row["step"] % every == 0 else None
        state.digests = digests
        if digests is not None:
            history.append((row["step"], digests))
            row["digest"] = combine_digests(digests)
        rows.append(row)
        if writer is not None:
            writer.step(row, digests)

    def snapshot() -> Snapshot:
        assert writer is not None
        saved: dict[str, Any] = {
            MODEL_KEY: model.state_dict(),
            OPTIMIZER_KEY: optimizer.state_dict(),
            SCHEDULER_KEY: scheduler.state_dict() if scheduler is not None else None,
            RNG_KEY: capture_rng_state(session.generators()).to_dict(),
            CALLBACKS_KEY: dict(zip(keys, [cb.state_dict() for cb in callbacks], strict=True)),
        }
        meta = CheckpointMeta(
            step=state.step, epoch=state.epoch, batch=state.batch, config=config.to_dict(),
            data_digest=data.digest, code_version=code_version(source_digest(), config.model, config.dataset),
            manifest_digest=manifest_digest,
            run_files=writer.sync(), created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        )
        return Snapshot(meta, saved, update_only=update_only(model, optimizer))

    bar = tqdm(total=total, initial=state.step, disable=not show_progress(progress), leave=False,
               desc=f"{config.model} seed {config.seed}")
    try:
        model.train()
        for cb in callbacks:
            cb.on_train_start(state)
        if state.step == 0:  # step 0 is the initial model: runs whose seeds differ already diverge here
            val_loss, val_metric = evaluate(model, data)
            record({"step": 0, "epoch": 0, "loss": float("nan"), "lr": _lr(optimizer),
                    "val_loss": val_loss, "val_metric": val_metric})
        while state.step < total:
            # the order of an epoch is computed from (seed, epoch): resuming mid-epoch costs nothing
            sampler.set_epoch(state.epoch, state.batch)
            for xb, yb in loader:
                optimizer.zero_grad(set_to_none=True)
                loss = loss_fn(model(xb), yb)
                loss.backward()
                if checkpointer is not None:
                    checkpointer.before_update()  # an async save may still be copying the weights
                optimizer.step()
                if scheduler is not None:
                    scheduler.step()
                state.step += 1
                state.batch += 1
                if state.step == faults.crash_at_step:
                    kill_self()
                state.loss = loss.item()
                row = {"step": state.step, "epoch": state.epoch, "loss": state.loss, "lr": _lr(optimizer)}
                if state.step == total or (config.eval_every and state.step % config.eval_every == 0):
                    row["val_loss"], row["val_metric"] = evaluate(model, data)
                record(row)
                for cb in callbacks:
                    cb.on_step_end(state)
                if checkpointer is not None and state.step < total and checkpointer.due(state.step):
                    checkpointer.save(snapshot)
                bar.update()
                if state.step == total:
                    break
            else:
                state.epoch, state.batch = state.epoch + 1, 0
        if checkpointer is not None:
            checkpointer.finish()
    except BaseException:
        if writer is not None:
            writer.close()  # every row so far is on disk; result.json stays absent
        if ledger is not None:
            ledger.ledger.mark(ledger.run_id, "crashed")
        raise
    finally:
        bar.close()
    final_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    final_digests = history[-1][1] if history and history[-1][0] == total else state_digests(final_state)
    result = RunResult(
        config=config,
        seed_record=session.seeds,
        data_digest=data.digest,
        metric_name=metric_name(data),
        final_metric=rows[-1]["val_metric"],
        final_val_loss=rows[-1]["val_loss"],
        final_digest=combine_digests(final_digests),
        steps=total,
        seconds=time.perf_counter() - started,
        rows=rows,
        tensor_digests=history,
        final_state=final_state,
        run_dir=writer.path if writer is not None else None,
        resume=resume,
        checkpoints=tuple(checkpointer.saved) if checkpointer else (),
        save_blocked_seconds=tuple(checkpointer.blocked_seconds) if checkpointer else (),
    )
    for cb in callbacks:
        cb.on_train_end(state)
    if writer is not None:
        writer.finish(final_state, result.summary())
    if ledger is not None:
        ledger.ledger.finish(ledger.run_id, result.final_digest, result.final_metric)
    return result


def config_callbacks(config: TrainConfig, run_dir: str | Path | None) -> tuple[Callback, ...]:
    """The callbacks the config asks for (``trace_every``: a Tracer writing into the run dir; a
    fine-tune's Freezer); appended after the caller's, so a resume rebuilds them at the same place."""
    tracer = (Tracer(run_dir, every=config.trace_every),) if config.trace_every else ()
    return (*tracer, *finetune_callbacks(config))


def pretrain(config: TrainConfig, run_dir: str | Path, **kwargs: Any) -> RunResult:
    """Train the upstream model into ``run_dir``: its ``model.safetensors`` and manifest are the
    pretrained artifact :func:`finetune` starts from. ``kwargs`` go to ``train``."""
    return train(config, run_dir, **kwargs)


def finetune(
    config: TrainConfig, parent: str | Path, strategy: str = "two_stage",
    run_dir: str | Path | None = None, **kwargs: Any,
) -> RunResult:
    """Train ``config`` (the downstream task) starting from ``parent`` with ``strategy``.

    Args:
        config: the downstream run; its ``init_from`` and ``finetune`` are set from the next two.
        parent: a finished run directory or a weights file (see :func:`load_parent`).
        strategy: ``"full"``, ``"feature_extraction"`` or ``"two_stage"``.
        run_dir, kwargs: as for ``train``.
    """
    changes = {"init_from": str(Path(parent).resolve()), "finetune": strategy}
    return train(config.replace(**changes), run_dir, **kwargs)


def _checkpointer(config: TrainConfig, writer: RunWriter | None, faults: Faults) -> Checkpointer | None:
    if not (config.checkpoint_every or config.checkpoint_seconds):
        return None
    if writer is None:
        raise ConfigError(
            "checkpoint_every/checkpoint_seconds need a run directory to write to; pass run_dir"
        )
    return Checkpointer(writer.path, every=config.checkpoint_every, seconds=config.checkpoint_seconds,
                        keep=config.keep_last, background=config.async_save,
                        crash_during_save=faults.crash_during_save)


def show_progress(progress: bool | None) -> bool:
    """Resolve a ``progress`` argument: ``None`` means on unless ``REPROKIT_PROGRESS=0``."""
    return progress if progress is not None else os.environ.get("REPROKIT_PROGRESS", "1") != "0"


def metric_name(data: DatasetBundle) -> str:
    """``val_accuracy`` for classification, ``val_r2`` for regression: higher is better for both."""
    return "val_accuracy" if data.task == "classification" else "val_r2"


@torch.no_grad()
def evaluate(model: nn.Module, data: DatasetBundle) -> tuple[float, float]:
    """Validation loss and metric (accuracy or R²) in eval mode; restores the previous mode."""
    was_training = model.training
    model.eval()
    outputs = torch.cat([model(xb) for xb in data.x_val.split(EVAL_BATCH)])
    model.train(was_training)
    if data.task == "classification":
        loss = F.cross_entropy(outputs, data.y_val)
        metric = (outputs.argmax(dim=1) == data.y_val).double().mean()
    else:
        loss = F.mse_loss(outputs, data.y_val)
        metric = 1 - ((outputs - data.y_val) ** 2).sum() / ((data.y_val - data.y_val.mean()) ** 2).sum()
    return float(loss), float(metric)


def _lr(optimizer: torch.optim.Optimizer) -> float:
    return float(optimizer.param_groups[0]["lr"])
